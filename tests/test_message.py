"""SIP messages: header values (RFC 3261 §7.3, §20, §25), framing (§7.4, §7.5, §18.3),
the stream framer, limits, and properties of parse/serialise over generated messages."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import (Address, Via, canonical_name, parse_address, parse_cseq,
                                 parse_header_params, parse_via, quote_string, split_list,
                                 unquote_string)
from sipmesh.sip.message import Headers, Limits, Request, Response, make_response, parse_message
from sipmesh.sip.transport.framing import StreamFramer
from sipmesh.sip.uri import AbsoluteURI, SipURI
from tests.peers.strategies import hostnames, sip_uris

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)
OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;received=192.0.2.1\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def with_header(message: bytes, line: bytes, body: bytes | None = None) -> bytes:
    """`message` with one more header line (and optionally another body)."""
    head, _, old_body = message.partition(b"\r\n\r\n")
    return head + b"\r\n" + line + b"\r\n\r\n" + (old_body if body is None else body)


def replace_header(message: bytes, name: bytes, line: bytes) -> bytes:
    lines = message.split(b"\r\n")
    return b"\r\n".join(line if x.lower().startswith(name.lower() + b":") else x for x in lines)


# -- addresses: name-addr vs addr-spec ----------------------------------------------------------

def test_name_addr_with_quoted_display_name() -> None:
    a = parse_address('"Doe, \\"John\\"" <sip:j.doe@example.com;transport=tcp>;tag=88;q=0.5')
    assert a.display_name == 'Doe, "John"'
    assert isinstance(a.uri, SipURI) and a.uri.params == {"transport": "tcp"}
    assert a.params == {"tag": "88", "q": "0.5"} and a.tag == "88" and a.q == 0.5
    assert str(a) == '"Doe, \\"John\\"" <sip:j.doe@example.com;transport=tcp>;tag=88;q=0.5'


def test_name_addr_with_token_display_name() -> None:
    a = parse_address("Alice  Liddell <sip:alice@example.com>")
    assert a.display_name == "Alice  Liddell" and a.params == {}


def test_name_addr_without_display_name() -> None:
    a = parse_address("<sip:alice@example.com>;expires=60")
    assert a.display_name is None and a.expires == 60


def test_addr_spec_parameters_belong_to_the_header() -> None:
    a = parse_address("sip:alice@example.com;tag=xyz;transport=tcp")
    assert a.params == {"tag": "xyz", "transport": "tcp"} and a.uri.params == {}
    b = parse_address("<sip:alice@example.com;transport=tcp>;tag=xyz")
    assert b.params == {"tag": "xyz"} and b.uri.params == {"transport": "tcp"}


def test_addr_spec_with_other_scheme() -> None:
    a = parse_address("tel:+1-201-555-0123;tag=1")
    assert a.uri == AbsoluteURI("tel:+1-201-555-0123") and a.tag == "1"


def test_display_name_control_characters_are_quoted_pairs() -> None:
    a = Address(SipURI("example.com"), "a\x00b\x07c\\d\"e\tf")
    text = str(a)
    assert text == '"a\\\x00b\\\x07c\\\\d\\"e\tf" <sip:example.com>'
    assert parse_address(text).display_name == "a\x00b\x07c\\d\"e\tf"
    with pytest.raises(ValueError):
        quote_string("line\r\nbreak")
    assert unquote_string(quote_string('x"y\\z')) == 'x"y\\z'


@pytest.mark.parametrize("value, problem", [
    ('"unterminated <sip:a@b>', "unbalanced quotes"),
    ('"name" sip:a@b', "display name without <URI>"),
    ("Bell, Alexander <sip:a@b>", "display name"),
    ("<sip:a@b", "missing '>'"),
    ("< sip:a@b >", "whitespace inside <>"),
    ("sip:a@b?subject=x", "must be enclosed in <>"),
    ("sip:a@b, sip:c@d", "must be enclosed in <>"),
    ("<sip:a@b> junk", "bad header parameters"),
    ("<sip:a@b>;=x", "bad header parameter name"),
    ("<sip:a@b>;tag=", "bad header parameter value"),
    ('<sip:a@b>;x="open', "unbalanced quotes"),
    ("<sip:a@@b>", "userinfo"),
])
def test_malformed_addresses(value: str, problem: str) -> None:
    with pytest.raises(ParseError, match=problem):
        parse_address(value)


def test_header_params_with_lws_and_quoted_values() -> None:
    assert parse_header_params(' ;  a = 1 ; B ;c="x;y\\"z" ') == {"a": "1", "b": None, "c": '"x;y\\"z"'}


# -- Via --------------------------------------------------------------------------------------

def test_via_with_received_and_rport() -> None:
    via = parse_via("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK74bf9;received=198.51.100.7;rport=40123")
    assert (via.protocol, via.transport, via.host, via.port) == ("SIP/2.0", "UDP", "192.0.2.1", 5060)
    assert via.branch == "z9hG4bK74bf9" and via.received == "198.51.100.7" and via.rport == 40123
    assert str(via) == "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK74bf9;received=198.51.100.7;rport=40123"


def test_via_rport_without_value() -> None:
    via = parse_via("SIP/2.0/TCP client.example.com;branch=z9hG4bKx;rport")
    assert via.rport is None and "rport" in via.params and via.port is None


def test_via_ipv6() -> None:
    via = parse_via("SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas3;received=2001:db8::9:255;rport=5070")
    assert (via.host, via.port, via.received, via.rport) == ("2001:db8::9:1", 5070, "2001:db8::9:255", 5070)
    assert str(via).startswith("SIP/2.0/UDP [2001:db8::9:1]:5070;")
    # RFC 5118 §4.5: some peers bracket the received address
    assert parse_via("SIP/2.0/UDP [::1];branch=z9hG4bKa;received=[2001:db8::1]").received == "2001:db8::1"


def test_via_lws_everywhere() -> None:
    via = parse_via("SIP / 2.0 / tcp   host.example.com : 5061 ; branch = z9hG4bK1 ; maddr=x.example.com")
    assert (via.transport, via.host, via.port, via.branch) == ("TCP", "host.example.com", 5061, "z9hG4bK1")
    assert via.params["maddr"] == "x.example.com"


def test_via_built_in_code() -> None:
    via = Via("TLS", "2001:db8::1", 5061, {"branch": "z9hG4bKq", "rport": None})
    assert str(via) == "SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKq;rport"
    assert parse_via(str(via)) == via


@pytest.mark.parametrize("value", [
    "SIP/2.0 host", "SIP/2.0/UDP", "SIP/2.0/UDP ;branch=x", "SIP/2.0/UDP host:99999",
    "SIP/2.0/UDP host;received=not-an-ip", "SIP/2.0/UDP host;rport=abc", "SIP/2.0/UDP host;rport=70000",
    "SIP/2.0/UDP host;ttl=256", "SIP/2.0/UDP host;ttl", "SIP/2.0/UDP host;branch",
    "SIP/2.0/UDP host junk", "SIP/2.0/UDP [::1", "SIP/2.0/UDP host;;", "SIP/2.0/UDP host;rport=\u00b2",
])
def test_malformed_vias(value: str) -> None:
    with pytest.raises(ParseError):
        parse_via(value)


# -- CSeq -------------------------------------------------------------------------------------

def test_cseq() -> None:
    assert parse_cseq("0009 INVITE") == (9, "INVITE")
    assert parse_cseq(" 2147483647\tACK ") == (2**31 - 1, "ACK")
    for bad in ("2147483648 INVITE", "1 2 INVITE", "INVITE", "-1 INVITE", "9" * 5000 + " INVITE",
                "\u00b2 INVITE", "1 INV/ITE"):
        with pytest.raises(ParseError):
            parse_cseq(bad)


# -- header names, compact forms, folding, lists -------------------------------------------------

def test_compact_forms_are_stored_under_long_names() -> None:
    data = (b"INVITE sip:bob@example.com SIP/2.0\r\n"
            b"v: SIP/2.0/UDP h.example.com;branch=z9hG4bK1\r\n"
            b"f: <sip:a@example.com>;tag=1\r\n"
            b"t: <sip:bob@example.com>\r\n"
            b"i: call-1\r\n"
            b"CSEQ: 1 INVITE\r\n"
            b"m: <sip:a@h.example.com>\r\n"
            b"c: application/sdp\r\n"
            b"s: hello\r\n"
            b"k: timer\r\n"
            b"e: gzip\r\n"
            b"o: presence\r\n"
            b"l: 3\r\n"
            b"\r\nabc")
    m = parse_message(data)
    assert [n for n, _ in m.headers] == ["Via", "From", "To", "Call-ID", "CSeq", "Contact",
                                         "Content-Type", "Subject", "Supported", "Content-Encoding",
                                         "Event", "Content-Length"]
    assert m.body == b"abc" and m.call_id == "call-1"
    for short, long in (("v", "Via"), ("F", "From"), ("i", "call-id"), ("l", "CONTENT-LENGTH")):
        assert m.headers.get(short) == m.headers.get(long)
    assert canonical_name("x-custom") == "x-custom" and canonical_name("WWW-AUTHENTICATE") == "WWW-Authenticate"
    assert b"\r\nVia: SIP/2.0/UDP" in m.to_bytes()


def test_folded_header_values() -> None:
    data = with_header(INVITE, b"Subject: I know you're there,\r\n\tpick up the phone\r\n   and talk to me!")
    m = parse_message(data)
    assert m.headers.get("Subject") == "I know you're there, pick up the phone and talk to me!"
    folded = INVITE.replace(b"To: Bob <sip:bob@biloxi.example.com>",
                            b"To:\r\n Bob\r\n  <sip:bob@biloxi.example.com>")
    assert str(parse_message(folded).to) == '"Bob" <sip:bob@biloxi.example.com>'


def test_continuation_without_header_is_refused() -> None:
    with pytest.raises(ParseError):
        parse_message(INVITE.replace(b"\r\nVia:", b"\r\n Via:", 1))


def test_multi_value_headers_with_quoted_commas() -> None:
    data = with_header(INVITE, b'Contact: "Doe, John" <sip:j@x.example.com>, <sip:k@y.example.com;a=b>,'
                               b' sip:l@z.example.com;q=0.1')
    data = with_header(data, b"Route: <sip:p1.example.com;lr>,<sip:p2.example.com;lr>")
    data = with_header(data, b"Via: SIP/2.0/UDP a.example.com;branch=z9hG4bKa, SIP/2.0/TCP b.example.com")
    data = with_header(data, b'Accept: application/sdp, text/plain;q="0,5"')
    m = parse_message(data)
    assert [c.display_name for c in m.contacts] == [None, "Doe, John", None, None]
    assert [str(c.uri) for c in m.contacts][1:] == ["sip:j@x.example.com", "sip:k@y.example.com;a=b",
                                                     "sip:l@z.example.com"]
    assert m.headers.get_all("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert [v.host for v in m.vias] == ["pc33.atlanta.example.com", "a.example.com", "b.example.com"]
    assert m.headers.get_all("Accept") == ['application/sdp, text/plain;q="0,5"']  # not a list header
    assert split_list('"a,b" <sip:x>, <sip:y,z>') == ['"a,b" <sip:x>', "<sip:y,z>"]
    for bad in ('"a, <sip:x>', "<sip:a>,,<sip:b>", "<sip:a>, "):
        with pytest.raises(ParseError):
            split_list(bad)


def test_contact_star() -> None:
    data = replace_header(INVITE, b"Contact", b"Contact: *").replace(b"INVITE", b"REGISTER")
    m = parse_message(data)
    assert m.headers.get_all("Contact") == ["*"] and m.contacts == []


def test_malformed_header_line_names_the_problem_and_keeps_the_rest() -> None:
    with pytest.raises(ParseError, match="malformed header line") as info:
        parse_message(with_header(INVITE, b"this is no header"))
    assert info.value.partial.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    with pytest.raises(ParseError, match="malformed header line"):
        parse_message(with_header(INVITE, b"Bad Name: x"))


def test_bare_cr_in_the_head_is_refused_and_never_copied() -> None:
    with pytest.raises(ParseError, match="CR without LF") as info:
        parse_message(with_header(INVITE, b"Subject: a\rInjected: b"))
    response = make_response(info.value.partial, 400)
    assert b"\rInjected" not in response.to_bytes()


def test_headers_api() -> None:
    h = Headers([("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b"), ("x-A", "1"), ("X-a", "2")])
    assert len(h) == 4 and h.count("via") == 2 and h.get_all("X-A") == ["1", "2"]
    h.add("Via", "SIP/2.0/UDP top;branch=z9hG4bK0", first=True)
    assert h.get("v") == "SIP/2.0/UDP top;branch=z9hG4bK0"
    assert h.pop_first("Via") == "SIP/2.0/UDP top;branch=z9hG4bK0" and h.count("Via") == 2
    h.set("x-a", "3")
    assert list(h)[2:] == [("x-a", "3")]  # replaced in place, spelled as given
    copy = h.copy()
    copy.remove("Via")
    assert "Via" in h and "via" not in copy and copy.get("nope", "d") == "d"
    h.add("Subject", "nul \x00 is fine")
    with pytest.raises(ValueError):
        h.add("Subject", "x\r\nInjected: 1")
    with pytest.raises(ValueError):
        h.add("Subject", "x\ny")


# -- framing: Content-Length, bodies ---------------------------------------------------------------

BINARY_BODY = b"\xff\xfe\x00\x80\r\n\r\n\xc3(\x00end"


def test_body_with_non_utf8_octets() -> None:
    data = replace_header(INVITE, b"Content-Length", b"Content-Length: %d" % len(BINARY_BODY))
    data = data[: data.index(b"\r\n\r\n") + 4] + BINARY_BODY
    m = parse_message(data)
    assert m.body == BINARY_BODY
    assert parse_message(m.to_bytes()).body == BINARY_BODY
    assert parse_message(m.to_bytes(), stream=True).body == BINARY_BODY


def test_non_utf8_header_octets_round_trip() -> None:
    data = with_header(INVITE, b"Subject: caf\xe9 \xff")
    m = parse_message(data)
    assert m.to_bytes().count(b"Subject: caf\xe9 \xff\r\n") == 1


def test_datagram_without_content_length_takes_the_rest() -> None:
    data = replace_header(INVITE, b"Content-Length", b"X-Nothing: 1")
    assert parse_message(data).body == b"v=0\n"
    with pytest.raises(ParseError, match="missing Content-Length"):
        parse_message(data, stream=True)


def test_content_length_shorter_than_datagram_truncates() -> None:
    assert parse_message(INVITE + b"garbage after the body").body == b"v=0\n"


@pytest.mark.parametrize("line, problem", [
    (b"Content-Length: 5", "larger than the body"),
    (b"Content-Length: -1", "bad Content-Length"),
    (b"Content-Length: 4x", "bad Content-Length"),
    (b"Content-Length: " + b"9" * 5000, "bad Content-Length"),
    (b"Content-Length: \xc2\xb2", "bad Content-Length"),
    (b"Content-Length: 4\r\nl: 4", "more than one Content-Length"),
])
def test_bad_content_length(line: bytes, problem: str) -> None:
    with pytest.raises(ParseError, match=problem) as info:
        parse_message(replace_header(INVITE, b"Content-Length", line))
    assert isinstance(info.value.partial, Request)


def test_leading_crlf_and_bare_lf_line_ends() -> None:
    assert parse_message(b"\r\n\r\n" + INVITE).method == "INVITE"
    lf = INVITE.replace(b"\r\n", b"\n")
    assert parse_message(lf).body == b"v=0\n"


# -- the stream framer -----------------------------------------------------------------------------

def _stream() -> tuple[bytes, list[bytes]]:
    body_msg = replace_header(INVITE, b"Content-Length", b"Content-Length: %d" % len(BINARY_BODY))
    body_msg = body_msg[: body_msg.index(b"\r\n\r\n") + 4] + BINARY_BODY
    folded = OK.replace(b"Content-Length: 0", b"l:\r\n 0")
    messages = [body_msg, OK, folded]
    return b"\r\n\r\n" + body_msg + OK + b"\r\n\r\n" + folded + b"\r\n", messages


def test_stream_framer_whole() -> None:
    stream, messages = _stream()
    assert StreamFramer().feed(stream) == messages


def test_stream_framer_split_at_every_byte_boundary() -> None:
    stream, messages = _stream()
    for cut in range(len(stream) + 1):
        framer = StreamFramer()
        out = framer.feed(stream[:cut]) + framer.feed(stream[cut:])
        assert out == messages, cut
    for cut in range(0, len(stream), 7):  # and three pieces
        framer = StreamFramer()
        out = framer.feed(stream[:cut]) + framer.feed(stream[cut:cut + 13]) + framer.feed(stream[cut + 13:])
        assert out == messages, cut


def test_stream_framer_byte_by_byte() -> None:
    stream, messages = _stream()
    framer = StreamFramer()
    out = [m for i in range(len(stream)) for m in framer.feed(stream[i:i + 1])]
    assert out == messages
    assert [parse_message(m, stream=True).body for m in out] == [BINARY_BODY, b"", b""]


def test_stream_framer_keepalives_only() -> None:
    framer = StreamFramer()
    for piece in (b"\r", b"\n\r", b"\n", b"\r\n\r\n"):
        assert framer.feed(piece) == []
    assert framer.feed(OK) == [OK]


@pytest.mark.parametrize("head", [
    b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n",  # no Content-Length
    b"SIP/2.0 200 OK\r\nContent-Length: 1\r\nl: 1\r\n\r\n",
    b"SIP/2.0 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"SIP/2.0 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
])
def test_stream_framer_unframeable(head: bytes) -> None:
    with pytest.raises(ParseError):
        StreamFramer().feed(head)


# -- limits ------------------------------------------------------------------------------------

def test_message_over_the_size_limit_is_513_with_an_answerable_partial() -> None:
    limits = Limits(max_message_size=600)
    big = replace_header(INVITE, b"Content-Length", b"Content-Length: 1000")
    big = big[: big.index(b"\r\n\r\n") + 4] + b"x" * 1000
    with pytest.raises(ParseError) as info:
        parse_message(big, limits=limits)
    assert info.value.status == 513
    assert isinstance(info.value.partial, Request)
    assert make_response(info.value.partial, 513).reason == "Message Too Large"
    with pytest.raises(ParseError) as info:
        parse_message(b"x" * 700, limits=limits)
    assert info.value.status == 513 and info.value.partial is None
    with pytest.raises(ParseError) as info:
        StreamFramer(limits).feed(big)
    assert info.value.status == 513
    with pytest.raises(ParseError) as info:
        StreamFramer(limits).feed(b"INVITE sip:x SIP/2.0\r\n" + b"X: y\r\n" * 200)
    assert info.value.status == 513


def test_header_count_limit() -> None:
    data = INVITE
    for i in range(20):
        data = with_header(data, b"X-H%d: v" % i)
    parse_message(data)
    with pytest.raises(ParseError, match="too many header fields") as info:
        parse_message(data, limits=Limits(max_headers=15))
    assert info.value.status == 400 and isinstance(info.value.partial, Request)


def test_header_length_limit() -> None:
    data = with_header(INVITE, b"X-Long: " + b"a" * 300)
    parse_message(data)
    with pytest.raises(ParseError, match="header field too long"):
        parse_message(data, limits=Limits(max_header_length=200))
    folded = with_header(INVITE, b"X-Long: a" + b"\r\n a" * 150)
    with pytest.raises(ParseError, match="header field too long"):
        parse_message(folded, limits=Limits(max_header_length=200))


def test_start_line_limit() -> None:
    data = INVITE.replace(b"sip:bob@biloxi.example.com SIP", b"sip:" + b"b" * 300 + b"@x.example.com SIP", 1)
    with pytest.raises(ParseError) as info:
        parse_message(data, limits=Limits(max_start_line=200))
    assert info.value.status == 414


# -- start lines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, problem, status", [
    (b"INVITE sip:bob@biloxi.example.com SIP/3.0", "SIP/3.0 not supported", 505),
    (b"INVITE sip:bob@biloxi.example.com HTTP/1.1", "bad SIP-Version", 400),
    (b"INVITE sip:bob@biloxi.example.com\tSIP/2.0", "tab in the Request-Line", 400),
    (b"INVITE sip:bob@biloxi.example.com", "malformed Request-Line", 400),
    (b"INVITE sip:bob@biloxi.example.com SIP/2.0 extra", "malformed Request-Line", 400),
    (b"INVITE bad uri SIP/2.0", "whitespace in the Request-URI", 400),
    (b"INVITE sip:bob@@x SIP/2.0", "bad Request-URI", 400),
])
def test_bad_request_lines(line: bytes, problem: str, status: int) -> None:
    data = line + INVITE[INVITE.index(b"\r\n"):]
    with pytest.raises(ParseError, match=problem) as info:
        parse_message(data)
    assert info.value.status == status
    assert info.value.partial.method == "INVITE"


@pytest.mark.parametrize("data", [b"", b"\r\n\r\n", b"hello", b"<xml/>\r\n\r\n", b"SIP/2.0 2000 OK\r\n\r\n",
                                  b"SIP/2.0 099 Low\r\n\r\n", b"SIP/2.0\r\n\r\n", b"\x00\x01\x02"])
def test_unrecognisable_start_lines(data: bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.partial is None


def test_sip_version_is_case_insensitive() -> None:
    assert parse_message(INVITE.replace(b"SIP/2.0\r\n", b"sip/2.0\r\n", 1)).method == "INVITE"


def test_response_reason_phrases() -> None:
    m = parse_message(OK.replace(b"200 OK", "200 Très bien, merci".encode()))
    assert isinstance(m, Response) and m.reason == "Très bien, merci"
    assert parse_message(OK.replace(b"200 OK", b"183 ")).reason == ""


# -- mandatory headers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Via", "From", "To", "Call-ID", "CSeq"])
def test_missing_mandatory_header(name: str) -> None:
    data = b"\r\n".join(x for x in INVITE.split(b"\r\n") if not x.startswith(name.encode() + b":"))
    with pytest.raises(ParseError, match=f"missing {name} header") as info:
        parse_message(data)
    assert make_response(info.value.partial, 400).status == 400


def test_max_forwards_range() -> None:
    assert parse_message(replace_header(INVITE, b"Max-Forwards", b"Max-Forwards: 0")).method == "INVITE"
    for bad in (b"256", b"-1", b"x", b"1" * 20):
        with pytest.raises(ParseError, match="Max-Forwards"):
            parse_message(replace_header(INVITE, b"Max-Forwards", b"Max-Forwards: " + bad))


# -- make_response -----------------------------------------------------------------------------------

def test_make_response_copies_and_tags() -> None:
    req = parse_message(with_header(INVITE, b"Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>"))
    assert isinstance(req, Request)
    ringing = make_response(req, 180, to_tag="t1")
    assert ringing.reason == "Ringing" and ringing.to.tag == "t1"
    assert ringing.headers.get_all("Record-Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert ringing.headers.get("Call-ID") == req.headers.get("Call-ID") and ringing.cseq == req.cseq
    busy = make_response(req, 486, to_tag="t2")
    assert "Record-Route" not in busy.headers and busy.to.tag == "t2"
    trying = make_response(req, 100, to_tag="t3")
    assert trying.to.tag is None  # §8.2.6.1: no tag on 100
    again = parse_message(busy.to_bytes())
    assert again.status == 486 and again.from_.tag == "1928301774"


def test_make_response_leaves_the_request_untagged() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request) and req.to.tag is None
    ok = make_response(req, 200, to_tag="t1")
    assert ok.to.tag == "t1" and req.to.tag is None and ";tag=" not in (req.headers.get("To") or "")


def test_typed_views_follow_every_change_of_the_headers() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    assert req.via is req.via  # parsed once, shared
    first = req.via.branch
    req.headers.add("Via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKnew", first=True)
    assert req.via.branch == "z9hG4bKnew" and [v.branch for v in req.vias] == ["z9hG4bKnew", first]
    assert req.headers.pop_first("Via") is not None and req.via.branch == first
    req.headers.set("To", "<sip:carol@example.com>;tag=x")
    assert req.to.uri.user == "carol" and req.to.tag == "x"
    req.headers.set("CSeq", "7 INVITE")
    assert req.cseq == (7, "INVITE")
    req.headers.remove("Contact")
    assert req.contacts == []
    req.headers.add("Contact", "<sip:c@192.0.2.1>")
    assert [str(c.uri) for c in req.contacts] == ["sip:c@192.0.2.1"]
    copy = req.headers.copy()
    copy.set("From", "<sip:mallory@example.com>;tag=m")
    assert req.from_.uri.user != "mallory"
    ours = Via("UDP", "192.0.2.9", 5060, {"branch": "z9hG4bKours"})
    req.push_via(ours)
    assert req.via is ours and req.headers.get("Via") == str(ours)
    assert [v.branch for v in req.vias] == ["z9hG4bKours", first]


# -- properties over generated messages ---------------------------------------------------------------

_TOKEN_CHARS = string.ascii_letters + string.digits + "-.!%*_+`'~"
tokens = st.text(_TOKEN_CHARS, min_size=1, max_size=16)
_KNOWN = {"via", "from", "to", "call-id", "cseq", "contact", "content-length", "route",
          "record-route", "path", "max-forwards", "content-type"}
extension_names = st.text(_TOKEN_CHARS, min_size=2, max_size=16).filter(
    lambda n: n.lower() not in _KNOWN and canonical_name(n) == n and len(n) > 1)
# Header values: anything but CR/LF, without the leading/trailing LWS that parsing drops.
header_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                        max_size=40).map(lambda v: v.strip(" \t"))
display_names = st.none() | st.text(st.characters(blacklist_categories=("Cs",),
                                                  blacklist_characters="\r\n"), min_size=1, max_size=20)


# Plain URIs mostly (cheap to generate); the full range of URIs in a share of the cases.
plain_uris = st.builds(SipURI, host=hostnames, user=st.none() | tokens,
                       port=st.none() | st.integers(1, 65535))
any_uris = st.one_of(plain_uris, plain_uris, sip_uris())


@st.composite
def addresses(draw) -> Address:
    return Address(draw(any_uris), draw(display_names), {"tag": draw(tokens)})


@st.composite
def vias(draw) -> Via:
    params: dict[str, str | None] = {"branch": "z9hG4bK" + draw(tokens)}
    if draw(st.booleans()):
        params["rport"] = None
    if draw(st.booleans()):
        params["received"] = draw(st.sampled_from(["192.0.2.1", "10.0.0.254", "2001:db8::1", "::1"]))
    host = draw(st.sampled_from(["client.example.com", "192.0.2.7", "2001:db8::7"]))
    return Via(draw(st.sampled_from(["UDP", "TCP", "TLS", "SCTP"])), host,
               draw(st.none() | st.integers(1, 65535)), params)


@st.composite
def messages(draw) -> Request | Response:
    method = draw(tokens | st.sampled_from(["INVITE", "ACK", "BYE", "REGISTER", "OPTIONS"]))
    headers = Headers()
    for via in draw(st.lists(vias(), min_size=1, max_size=2)):
        headers.add("Via", str(via))
    headers.add("From", str(draw(addresses())))
    headers.add("To", str(draw(addresses())))
    headers.add("Call-ID", draw(tokens) + "@" + draw(tokens))
    headers.add("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}")
    headers.add("Max-Forwards", str(draw(st.integers(0, 255))))
    for contact in draw(st.lists(addresses(), max_size=1)):
        headers.add("Contact", str(contact))
    for name, value in draw(st.lists(st.tuples(extension_names, header_values), max_size=3)):
        headers.add(name, value)
    body = draw(st.binary(max_size=200))
    if draw(st.booleans()):
        return Request(headers=headers, body=body, method=method,
                       uri=draw(sip_uris(with_headers=False) | st.just(AbsoluteURI("tel:+123"))))
    reason = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                          max_size=20))
    return Response(headers=headers, body=body, status=draw(st.integers(100, 699)), reason=reason)


def _same(a: Request | Response, b: Request | Response) -> None:
    assert type(a) is type(b)
    if isinstance(a, Request):
        assert (a.method, a.uri) == (b.method, b.uri)
    else:
        assert (a.status, a.reason) == (b.status, b.reason)
    assert [h for h in a.headers if h[0] != "Content-Length"] == \
        [h for h in b.headers if h[0] != "Content-Length"]
    assert a.body == b.body


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_generated_messages_round_trip(message: Request | Response) -> None:
    data = message.to_bytes()
    parsed = parse_message(data)
    _same(message, parsed)
    assert parse_message(data, stream=True).body == message.body
    assert StreamFramer().feed(data + data) == [data, data]
    assert parsed.from_.tag == message.from_.tag and parsed.to.uri == message.to.uri
    assert [str(v) for v in parsed.vias] == [str(v) for v in message.vias]
    assert parsed.to_bytes() == data


SEEDS = [INVITE, OK, _stream()[1][0], with_header(INVITE, b'Contact: "a,b" <sip:x@y>;q=0.5, <sip:z@w>'),
         with_header(OK, b"Subject: folded\r\n value")]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.randoms(use_true_random=False), st.integers(1, 4))
def test_mutated_messages_only_raise_parse_error(seed: bytes, rnd: random.Random, rounds: int) -> None:
    data = bytearray(seed)
    for _ in range(rounds):
        op = rnd.randrange(5)
        at = rnd.randrange(len(data) + 1)
        if op == 0:
            del data[at:]  # truncation
        elif op == 1:
            data[at:at] = rnd.choice([b"\r\n", b"\r", b"\n", b" ", b":", b";", b",", b'"', b"<", b">",
                                      b"%", b"\x00", b"\xff", b"\r\n ", b"\r\n\r\n", b"=", b"@", b"["])
        elif op == 2 and data:
            data[min(at, len(data) - 1)] = rnd.randrange(256)  # replacement
        elif op == 3:
            del data[at:at + rnd.randrange(1, 20)]  # deletion
        else:
            data[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 8)))  # insertion
    data = bytes(data)
    for stream in (False, True):
        try:
            message = parse_message(data, stream=stream)
        except ParseError as exc:
            if exc.partial is not None:
                exc.partial.to_bytes()
            continue
        # What parses serialises, and parses again to the same message.
        _same(message, parse_message(message.to_bytes()))
    try:
        for raw in StreamFramer().feed(data):
            try:
                parse_message(raw, stream=True)
            except ParseError:
                pass
    except ParseError:
        pass
