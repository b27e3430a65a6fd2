"""Tests for sipmesh.sip.sdp: the SDP (RFC 8866) parser and serialiser."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipmesh.sip.sdp import (
    MAX_LINES,
    MAX_SIZE,
    Attribute,
    Connection,
    MediaDescription,
    Origin,
    SDPError,
    SessionDescription,
    parse_sdp,
)

# The body from the seeds (the paper), with its k= line before c=.
PAPER = """\
v=0
o=2500 1169538046 1169538046 IN IP4 202.26.159.136
s=-
t=0 0
m=application/vpn 8000 OpenVPN 0
k=DH:crypt code
c=IN IP4 202.26.159.136
a=IP4:202.26.159.136
a=PORT:8000
a=VPN_LOCAL_ADDR:192.168.234.1
a=VPN_REMOTE_ADDR:192.168.234.2
"""
PAPER_CRLF = PAPER.replace("\n", "\r\n").encode()

# What the serialiser emits for it: CRLF and RFC 8866 order (c= before k=).
PAPER_SERIALISED = (
    b"v=0\r\n"
    b"o=2500 1169538046 1169538046 IN IP4 202.26.159.136\r\n"
    b"s=-\r\n"
    b"t=0 0\r\n"
    b"m=application/vpn 8000 OpenVPN 0\r\n"
    b"c=IN IP4 202.26.159.136\r\n"
    b"k=DH:crypt code\r\n"
    b"a=IP4:202.26.159.136\r\n"
    b"a=PORT:8000\r\n"
    b"a=VPN_LOCAL_ADDR:192.168.234.1\r\n"
    b"a=VPN_REMOTE_ADDR:192.168.234.2\r\n"
)


def paper_from_scratch() -> SessionDescription:
    address = "202.26.159.136"
    vpn = MediaDescription(
        "application/vpn", 8000, "OpenVPN", ["0"],
        connection=Connection.for_address(address),
        attributes=[
            Attribute("IP4", address),
            Attribute("PORT", "8000"),
            Attribute("VPN_LOCAL_ADDR", "192.168.234.1"),
            Attribute("VPN_REMOTE_ADDR", "192.168.234.2"),
        ],
        other=[("k", "DH:crypt code")],
    )
    origin = Origin("2500", 1169538046, 1169538046, "IN", "IP4", address)
    return SessionDescription(origin=origin, media=[vpn])


# -- the paper's body -------------------------------------------------------

def test_paper_body_parses_with_every_value() -> None:
    sdp = parse_sdp(PAPER)
    assert sdp.version == 0
    assert sdp.origin == Origin("2500", 1169538046, 1169538046, "IN", "IP4", "202.26.159.136")
    assert sdp.session_name == "-"
    assert sdp.connection is None
    assert sdp.times == [(0, 0)]
    assert sdp.attributes == [] and sdp.other == []
    [m] = sdp.media
    assert (m.media, m.port, m.port_count, m.proto, m.formats) == (
        "application/vpn", 8000, None, "OpenVPN", ["0"])
    assert m.connection == Connection("IN", "IP4", "202.26.159.136")
    assert m.other == [("k", "DH:crypt code")]
    assert m.attributes == [
        Attribute("IP4", "202.26.159.136"),
        Attribute("PORT", "8000"),
        Attribute("VPN_LOCAL_ADDR", "192.168.234.1"),
        Attribute("VPN_REMOTE_ADDR", "192.168.234.2"),
    ]
    assert sdp.attribute("PORT") == "8000"
    assert sdp.attribute("VPN_REMOTE_ADDR") == "192.168.234.2"


@pytest.mark.parametrize("body", [PAPER, PAPER.encode(), PAPER_CRLF, PAPER_CRLF.rstrip(),
                                  PAPER_CRLF + b"\r\n", PAPER.encode() + b"\n"])
def test_line_endings_and_one_trailing_empty_line(body: bytes | str) -> None:
    assert parse_sdp(body) == parse_sdp(PAPER_CRLF)


def test_round_trip() -> None:
    sdp = parse_sdp(PAPER)
    data = sdp.to_bytes()
    assert parse_sdp(data) == sdp
    assert parse_sdp(data).to_bytes() == data
    assert str(sdp).encode() == data


def test_paper_body_from_scratch() -> None:
    sdp = paper_from_scratch()
    assert sdp.to_bytes() == PAPER_SERIALISED
    assert sdp == parse_sdp(PAPER)


def test_new() -> None:
    sdp = SessionDescription.new("alice", "192.0.2.1", sess_id=42)
    sdp.media.append(MediaDescription("application", 9, "TCP", ["x"],
                                      attributes=[Attribute("setup", "active")]))
    assert sdp.to_bytes() == (
        b"v=0\r\no=alice 42 42 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\n"
        b"t=0 0\r\nm=application 9 TCP x\r\na=setup:active\r\n")
    assert SessionDescription.new("a", "h.example").connection == Connection("IN", "IP4", "h.example")
    assert SessionDescription.new("a", "::1", session_name="x y").session_name == "x y"
    assert SessionDescription.new("a", "::1").origin.sess_id > 1_600_000_000


def test_ipv6() -> None:
    sdp = SessionDescription.new("bob", "::1", sess_id=1)
    assert sdp.connection == Connection("IN", "IP6", "::1")
    assert sdp.origin.addrtype == "IP6"
    assert b"\r\nc=IN IP6 ::1\r\n" in sdp.to_bytes()
    parsed = parse_sdp("v=0\no=bob 1 1 IN IP6 ::1\ns=-\nc=IN IP6 ::1\nt=0 0\n")
    assert parsed.connection == Connection("IN", "IP6", "::1") and parsed == sdp


# -- attributes -------------------------------------------------------------

def test_attribute_split_at_first_colon_and_flags() -> None:
    body = ("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nt=0 0\n"
            "a=recvonly\na=fingerprint:sha-256 AB:CD:EF\na=empty:\na=IP4:1.2.3.4\n")
    sdp = parse_sdp(body)
    assert sdp.attributes == [Attribute("recvonly"), Attribute("fingerprint", "sha-256 AB:CD:EF"),
                              Attribute("empty", ""), Attribute("IP4", "1.2.3.4")]
    assert sdp.attribute("recvonly") == ""  # present without a value
    assert sdp.attribute("fingerprint") == "sha-256 AB:CD:EF"
    assert sdp.attribute("missing") is None
    assert parse_sdp(sdp.to_bytes()) == sdp


def test_session_and_media_level_lookup() -> None:
    body = ("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nt=0 0\na=tool:s\na=X:1\n"
            "m=audio 1 RTP/AVP 0\na=X:2\na=only-media:m1\na=X:3\n"
            "m=video 2/2 RTP/AVP 31 32\na=X:4\na=only-media:m2\n")
    sdp = parse_sdp(body)
    assert sdp.attribute("X") == "1"  # session level first
    assert sdp.attributes_named("X") == ["1", "2", "3", "4"]  # then media, in order
    assert sdp.attribute("only-media") == "m1"
    audio, video = sdp.media
    assert audio.attribute("X") == "2" and audio.attributes_named("X") == ["2", "3"]
    assert video.attribute("only-media") == "m2" and video.attribute("tool") is None
    assert (video.port, video.port_count, video.formats) == (2, 2, ["31", "32"])


def test_attribute_names_are_case_sensitive() -> None:
    sdp = parse_sdp("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nt=0 0\na=PORT:1\na=port:2\n")
    assert sdp.attribute("PORT") == "1" and sdp.attribute("port") == "2"
    assert sdp.attribute("Port") is None


def test_other_lines_kept_in_their_section() -> None:
    body = ("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nu=http://x\ni=info\nt=0 0\nr=7d 1h 0 25h\n"
            "a=s\nb=AS:64\nx=unknown\nm=audio 1 RTP/AVP 0\nb=AS:8\ni=media info\n"
            "c=IN IP4 1.2.3.4\nc=IN IP4 5.6.7.8\n")
    sdp = parse_sdp(body)
    # kept in RFC 8866 order, same-type lines in their original order
    assert sdp.other == [("i", "info"), ("u", "http://x"), ("b", "AS:64"),
                         ("r", "7d 1h 0 25h"), ("x", "unknown")]
    assert sdp.media[0].other == [("i", "media info"), ("c", "IN IP4 5.6.7.8"), ("b", "AS:8")]
    assert sdp.media[0].connection == Connection("IN", "IP4", "1.2.3.4")
    assert str(sdp) == (
        "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\ni=info\r\nu=http://x\r\nb=AS:64\r\n"
        "t=0 0\r\nr=7d 1h 0 25h\r\nx=unknown\r\na=s\r\n"
        "m=audio 1 RTP/AVP 0\r\ni=media info\r\nc=IN IP4 1.2.3.4\r\nc=IN IP4 5.6.7.8\r\n"
        "b=AS:8\r\n")
    assert parse_sdp(str(sdp)) == sdp


# -- errors and limits ------------------------------------------------------

HEAD = "v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nt=0 0\n"


@pytest.mark.parametrize("body", [
    b"", b"\n", "v=1\n", " v=0\n", "v=0 \n", "o=- 1 1 IN IP4 1.2.3.4\nv=0\n",
    "v=0\ns=-\nt=0 0\n",                                  # no o=
    "v=0\no=- 1 1 IN IP4 1.2.3.4\nt=0 0\n",               # no s=
    HEAD + "o=- 1 1 IN IP4 1.2.3.4\n", HEAD + "s=x\n", HEAD + "v=0\n",
    "v=0\no=- 1 IN IP4 1.2.3.4\ns=-\n", "v=0\no=- x 1 IN IP4 1.2.3.4\ns=-\n",
    "v=0\no=- 1 1 IN IP4 1.2.3.4 extra\ns=-\n", HEAD + "c=IN IP4\n", HEAD + "t=0\n",
    HEAD + "t=now 0\n", HEAD + "m=audio 65536 RTP/AVP 0\n", HEAD + "m=audio -1 RTP/AVP 0\n",
    HEAD + "m=audio x RTP/AVP 0\n", HEAD + "m=audio 1/0 RTP/AVP 0\n", HEAD + "m=audio 1/ RTP 0\n",
    HEAD + "m=audio 1\n", HEAD + "m=audio 1 RTP\no=- 1 1 IN IP4 1.2.3.4\n",
    HEAD + "m=audio 1 RTP\nt=0 0\n", HEAD + "m=audio \u0661 RTP 0\n", HEAD + "a=\n",
    HEAD + "a=:value\n", HEAD + "novalue\n", HEAD + "ab=c\n", HEAD + "1=x\n", HEAD + "=x\n",
    HEAD + "a\n", HEAD + "\n\n", HEAD + "\n\r\n", HEAD + "\na=x\n", HEAD + "a=x\rb\n", HEAD + "a=x\0\n",
    HEAD.encode() + b"a=\xff\xfe\n", HEAD + "\u0130=x\n", HEAD + "a=\udc80\n",
    HEAD + "m=audio 1 RTP 0\nc=IN IP4 1.2.3.4\nc=bad\n",
])
def test_invalid_bodies_raise_sdp_error(body: bytes | str) -> None:
    with pytest.raises(SDPError):
        parse_sdp(body)


def test_sdp_error_is_value_error() -> None:
    assert issubclass(SDPError, ValueError)


def test_size_limit() -> None:
    assert MAX_SIZE == 64 * 1024
    body = HEAD + "a=" + "x" * (MAX_SIZE - len(HEAD) - 3) + "\n"
    assert len(body) == MAX_SIZE and parse_sdp(body)
    with pytest.raises(SDPError, match="larger"):
        parse_sdp(body + "\n")
    with pytest.raises(SDPError, match="larger"):
        parse_sdp(PAPER, max_size=len(PAPER) - 1)
    assert parse_sdp(PAPER, max_size=len(PAPER))
    with pytest.raises(SDPError, match="larger"):  # counted in UTF-8 bytes
        parse_sdp(HEAD + "a=\u00e9\n", max_size=len(HEAD) + 4)


def test_line_limit() -> None:
    assert MAX_LINES == 1024
    body = HEAD + "a=x\n" * (MAX_LINES - 4)
    assert len(parse_sdp(body).attributes) == MAX_LINES - 4
    with pytest.raises(SDPError, match="lines"):
        parse_sdp(body + "a=x\n")
    with pytest.raises(SDPError, match="lines"):
        parse_sdp(PAPER, max_lines=10)
    assert parse_sdp(PAPER, max_lines=11)


# -- no line injection ------------------------------------------------------

ORIGIN = Origin("-", 1, 1, "IN", "IP4", "1.2.3.4")
EVIL = "x\r\nm=audio 1 RTP/AVP 0"


@pytest.mark.parametrize("build", [
    lambda: Attribute("name", EVIL),
    lambda: Attribute("name", "x\n"),
    lambda: Attribute("name", "x\0"),
    lambda: Attribute(EVIL),
    lambda: Attribute("a:b", "c"),
    lambda: Attribute(""),
    lambda: Origin(EVIL, 1, 1, "IN", "IP4", "1.2.3.4"),
    lambda: Origin("two words", 1, 1, "IN", "IP4", "1.2.3.4"),
    lambda: Origin("-", -1, 1, "IN", "IP4", "1.2.3.4"),
    lambda: Connection("IN", "IP4", "1.2.3.4\n"),
    lambda: SessionDescription(origin=ORIGIN, session_name=EVIL),
    lambda: SessionDescription(origin=ORIGIN, other=[("i", EVIL)]),
    lambda: SessionDescription(origin=ORIGIN, other=[("m", "audio 1 RTP/AVP 0")]),
    lambda: SessionDescription(origin=ORIGIN, other=[("ii", "x")]),
    lambda: SessionDescription(origin=ORIGIN, times=[(0, -1)]),
    lambda: SessionDescription(origin=ORIGIN, version=1),
    lambda: MediaDescription("audio", 1, "RTP/AVP", ["0\r\na=x"]),
    lambda: MediaDescription("audio", 1, "RTP AVP", ["0"]),
    lambda: MediaDescription("audio", 65536, "RTP/AVP", ["0"]),
    lambda: MediaDescription("audio", 1, "RTP/AVP", ["0"], port_count=0),
    lambda: MediaDescription("audio", 1, "RTP/AVP", ["0"], other=[("a", "x")]),
])
def test_construct_refuses_bad_values(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        build()


def test_serialise_refuses_values_changed_after_construction() -> None:
    sdp = paper_from_scratch()
    sdp.session_name = EVIL
    with pytest.raises(ValueError):
        sdp.to_bytes()
    sdp = paper_from_scratch()
    sdp.media[0].other.append(("i", "x\ny=z"))
    with pytest.raises(ValueError):
        str(sdp)
    sdp = paper_from_scratch()
    sdp.media[0].formats.append("0\r\n")
    with pytest.raises(ValueError):
        sdp.to_bytes()


# -- properties -------------------------------------------------------------

TEXT = st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\0")
TOKEN = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
                min_size=1, max_size=12).filter(lambda s: s.split() == [s])
VALUE = st.text(TEXT, max_size=30)
NAME = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\0:"),
               min_size=1, max_size=12)
ATTRIBUTE = st.builds(Attribute, NAME, st.none() | VALUE)
CONNECTION = st.builds(Connection, TOKEN, TOKEN, TOKEN)
# c= is left out: without a connection an extra c= line would become it.
OTHER_KIND = st.sampled_from([c for c in string.ascii_letters if c not in "vostmac"])
OTHER = st.lists(st.tuples(OTHER_KIND, VALUE), max_size=4)
NUMBER = st.integers(0, 2**64)
MEDIA = st.builds(
    MediaDescription, TOKEN, st.integers(0, 65535), TOKEN, st.lists(TOKEN, max_size=3),
    port_count=st.none() | st.integers(1, 65535), connection=st.none() | CONNECTION,
    attributes=st.lists(ATTRIBUTE, max_size=5), other=OTHER)
SESSION = st.builds(
    SessionDescription,
    origin=st.builds(Origin, TOKEN, NUMBER, NUMBER, TOKEN, TOKEN, TOKEN),
    session_name=VALUE, connection=st.none() | CONNECTION,
    times=st.lists(st.tuples(NUMBER, NUMBER), max_size=2),
    attributes=st.lists(ATTRIBUTE, max_size=5), media=st.lists(MEDIA, max_size=3), other=OTHER)


@given(SESSION)
def test_generated_descriptions_round_trip(sdp: SessionDescription) -> None:
    data = sdp.to_bytes()
    parsed = parse_sdp(data)
    assert parsed == sdp
    assert parsed.to_bytes() == data
    for attribute in reversed(sdp.attributes):  # the first of each name counts
        assert sdp.attributes_named(attribute.name)[0] == sdp.attribute(attribute.name)
    for name in {attribute.name for attribute in sdp.attributes}:
        first = next(a for a in sdp.attributes if a.name == name)
        assert sdp.attribute(name) == (first.value or "")


def accepts_or_sdp_error(data: bytes | str) -> None:
    """The only allowed failure is SDPError; whatever is accepted round-trips."""
    try:
        sdp = parse_sdp(data)
    except SDPError:
        return
    assert parse_sdp(sdp.to_bytes()) == sdp


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    accepts_or_sdp_error(data)
    accepts_or_sdp_error(b"v=0\n" + data)


@given(st.text(max_size=300))
def test_random_text(data: str) -> None:
    accepts_or_sdp_error(data)
    accepts_or_sdp_error("v=0\n" + data)


PIECES = [b"\r\n", b"\n", b"\r", b"\0", b"=", b":", b"/", b" ", b"\xff", b"\xc3", b"v=0",
          b"m=", b"c=", b"o=", b"a=", b"t=", b"65536", b"-1", b"\xd9\xa1"]


@settings(max_examples=500)
@given(st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace"]),
                          st.integers(0, len(PAPER_CRLF)),
                          st.binary(min_size=1, max_size=4) | st.sampled_from(PIECES)),
                min_size=1, max_size=6))
def test_mutated_paper_body(mutations: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(PAPER_CRLF)
    for operation, position, piece in mutations:
        position %= len(data) + 1
        if operation == "insert":
            data[position:position] = piece
        elif operation == "delete":
            del data[position:position + len(piece)]
        else:
            data[position:position + len(piece)] = piece
    accepts_or_sdp_error(bytes(data))


LINES = PAPER.splitlines()
BAD_LINES = ["", " ", "v=0", "o=- 1 1 IN IP4 1.2.3.4", "s=x", "t=0 0", "m=audio 1 RTP 0",
             "m=a 70000 b", "c=IN IP6 ::1", "c=IN", "a=", "a=x:y:z", "k=", "z=0 -1h", "x"]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(LINES)), st.sampled_from(LINES + BAD_LINES),
                          st.booleans()), max_size=5))
def test_line_level_mutations(edits: list[tuple[int, str, bool]]) -> None:
    lines = list(LINES)
    for position, line, replace in edits:
        position %= len(lines) + 1
        lines[position:position + replace] = [line]
    accepts_or_sdp_error("\r\n".join(lines))
