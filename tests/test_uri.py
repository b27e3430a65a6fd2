"""SIP URIs (RFC 3261 §19.1, §25.1; IPv6 references per RFC 5118) and other absolute URIs."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipmesh.sip.errors import ParseError
from sipmesh.sip import uri as uri_module
from sipmesh.sip.uri import AbsoluteURI, SipURI, format_host, parse_sip_uri, parse_uri
from tests.peers.strategies import sip_uris

# -- structure --------------------------------------------------------------------------------


def test_full_sip_uri() -> None:
    uri = parse_uri("sips:alice:secret@atlanta.example.com:5061;transport=tcp;lr"
                    "?subject=project%20x&priority=urgent")
    assert isinstance(uri, SipURI)
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == \
        ("sips", "alice", "secret", "atlanta.example.com", 5061)
    assert uri.params == {"transport": "tcp", "lr": None}
    assert uri.headers == {"subject": "project x", "priority": "urgent"}
    assert uri.secure and uri.lr and uri.transport == "tcp"
    assert str(uri) == ("sips:alice:secret@atlanta.example.com:5061;transport=tcp;lr"
                        "?subject=project%20x&priority=urgent")


def test_minimal_and_scheme_case() -> None:
    uri = parse_uri("SIP:example.com")
    assert isinstance(uri, SipURI)
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("sip", None, "example.com", None)
    assert str(uri) == "sip:example.com"


def test_empty_password_and_telephone_user() -> None:
    uri = parse_sip_uri("sip:+1-212-555-1212:@gateway.com;user=phone")
    assert uri.user == "+1-212-555-1212" and uri.password == ""
    assert uri.params == {"user": "phone"}
    assert str(uri) == "sip:+1-212-555-1212:@gateway.com;user=phone"


@pytest.mark.parametrize("text, host, port", [
    ("sip:[2001:db8::10]", "2001:db8::10", None),
    ("sip:alice@[2001:db8::10]:5070;transport=tcp", "2001:db8::10", 5070),
    ("sip:[2001:DB8:0:0:0:0:0:10]:5060", "2001:db8::10", 5060),  # RFC 5118 §4.1: canonical form
    ("sips:[::1]:5061", "::1", 5061),
    ("sip:[::ffff:192.0.2.1]", "::ffff:c000:201", None),
])
def test_ipv6_references(text: str, host: str, port: int | None) -> None:
    uri = parse_sip_uri(text)
    assert (uri.host, uri.port) == (host, port)
    assert uri.host_port() == (f"[{host}]" if port is None else f"[{host}]:{port}")
    assert parse_sip_uri(str(uri)) == uri


def test_ipv6_equivalence_across_spellings() -> None:
    assert parse_sip_uri("sip:[2001:db8::9:1]").equivalent(parse_sip_uri("sip:[2001:db8:0:0:0:0:9:1]"))


def test_format_host() -> None:
    assert format_host("2001:db8::1") == "[2001:db8::1]"
    assert format_host("192.0.2.1") == "192.0.2.1"
    assert format_host("example.com") == "example.com"


@pytest.mark.parametrize("text", [
    "sip:[2001:db8::g]", "sip:[2001:db8::1", "sip:[2001:db8::1]x", "sip:2001:db8::1",
    "sip:256.1.1.1", "sip:host:65536", "sip:host:", "sip:host:abc", "sip:host:\u00b2",
    "sip:host:\u0663", "sip:-bad.example.com", "sip:bad-.example.com", "sip:example.123",
    "sip:a@b@c", "sip:@host", "sip:user@", "sip:", "sip:host;", "sip:host;;lr", "sip:host;a=",
    "sip:host?", "sip:host?a", "sip:us%4@host", "sip:us%4g@host", "sip:us%zzer@host", "sip:user@ho st",
    "sip:user@host;a=<b>", "sip:<host>", "sip:\"host\"", "sip:host\x00", "sip:ho\tst",
    "nocolon", ":nothing", "1sip:host", "sip:us\u00e9r@host", "sip:pass:w@rd@host",
])
def test_malformed_uris_raise_parse_error(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


# -- escaping ---------------------------------------------------------------------------------


def test_user_and_password_are_unescaped() -> None:
    uri = parse_sip_uri("sip:I%20have%20spaces:p%40ss@example.net")
    assert uri.user == "I have spaces" and uri.password == "p@ss"
    assert str(uri) == "sip:I%20have%20spaces:p%40ss@example.net"


def test_escaped_unreserved_characters_are_plain() -> None:
    uri = parse_sip_uri("sip:%61lice@atlanta.com")
    assert uri.user == "alice" and str(uri) == "sip:alice@atlanta.com"


def test_user_unreserved_characters_stay_unescaped() -> None:
    uri = parse_sip_uri("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u@example.net"
    assert str(uri) == "sip:user;par=u%40example.net@example.com"


def test_escaped_nul_and_non_utf8_octets_survive() -> None:
    uri = parse_sip_uri("sip:%00%FFx%C3%A9@example.com")
    assert uri.user == "\x00\udcffx\u00e9"
    assert str(uri) == "sip:%00%FFx%C3%A9@example.com"


def test_params_are_unescaped_once_and_names_lower_cased() -> None:
    uri = parse_sip_uri("sip:host5.example.net;%6C%72;n%61me=v%61lue%25%34%31;MAddr=Example.COM")
    assert uri.params == {"lr": None, "name": "value%41", "maddr": "Example.COM"}
    assert uri.lr
    assert str(uri) == "sip:host5.example.net;lr;name=value%2541;maddr=Example.COM"


def test_headers_are_unescaped() -> None:
    uri = parse_sip_uri("sip:user@example.com?Route=%3Csip:sip.example.com%3E&x=")
    assert uri.headers == {"Route": "<sip:sip.example.com>", "x": ""}
    assert str(uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E&x="


def test_params_and_headers_set_in_code_are_escaped() -> None:
    uri = SipURI(host="example.com", user="a b", params={"x y": "1;2", "lr": None},
                 headers={"Subject": "hi there&more"})
    text = str(uri)
    assert text == "sip:a%20b@example.com;x%20y=1%3B2;lr?Subject=hi%20there%26more"
    assert parse_sip_uri(text) == uri


def test_copy_is_independent() -> None:
    uri = parse_sip_uri("sip:a@b;lr")
    other = uri.copy(port=5080)
    other.params["transport"] = "tcp"
    assert uri.params == {"lr": None} and uri.port is None
    assert str(other) == "sip:a@b:5080;lr;transport=tcp"


def test_aor() -> None:
    assert parse_sip_uri("sip:Bob@Biloxi.COM:5060;transport=tcp").aor() == "sip:Bob@biloxi.com"


# -- other schemes ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, scheme", [
    ("tel:+1-201-555-0123", "tel"), ("mailto:bob@example.com", "mailto"),
    ("http://www.example.com/a?b=c", "http"), ("urn:service:sos", "urn"),
    ("soap.beep://192.0.2.103:3002", "soap.beep"), ("isbn:2983792873", "isbn"),
    ("nobodyKnowsThisScheme:totallyopaquecontent", "nobodyknowsthisscheme"),
])
def test_absolute_uris(text: str, scheme: str) -> None:
    uri = parse_uri(text)
    assert uri == AbsoluteURI(text) and uri.scheme == scheme and str(uri) == text


def test_parse_sip_uri_refuses_other_schemes() -> None:
    with pytest.raises(ParseError, match="not a SIP URI"):
        parse_sip_uri("tel:+1234")


# -- comparison: the examples of RFC 3261 §19.1.4 ---------------------------------------------

EQUIVALENT = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    ("sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
     "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"),
    ("sip:alice@atlanta.com?subject=project%20x&priority=urgent",
     "sip:alice@atlanta.com?priority=urgent&subject=project%20x"),
]
NOT_EQUIVALENT = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),  # user case
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),  # may resolve to other ports
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),  # ... or transports
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),  # header
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),  # even if it resolves there
    # Intransitivity: both equal sip:carol@chicago.com, not each other.
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
    # A user, ttl, method or maddr parameter in one URI only never matches.
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;user=phone"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;maddr=239.255.255.1"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;ttl=15"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;method=INVITE"),
    ("sip:bob@biloxi.com", "sips:bob@biloxi.com"),
    ("sip:bob:a@biloxi.com", "sip:bob:b@biloxi.com"),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent_uris(a: str, b: str) -> None:
    ua, ub = parse_sip_uri(a), parse_sip_uri(b)
    assert ua.equivalent(ub) and ub.equivalent(ua)


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_non_equivalent_uris(a: str, b: str) -> None:
    ua, ub = parse_sip_uri(a), parse_sip_uri(b)
    assert not ua.equivalent(ub) and not ub.equivalent(ua)


def test_other_parameter_values_compare_case_sensitively() -> None:
    assert not parse_sip_uri("sip:a@b;security=on").equivalent(parse_sip_uri("sip:a@b;security=ON"))
    assert parse_sip_uri("sip:a@b;maddr=X.example").equivalent(parse_sip_uri("sip:a@b;maddr=x.EXAMPLE"))


def test_not_equivalent_to_other_types() -> None:
    assert not parse_sip_uri("sip:a@b").equivalent(AbsoluteURI("sip:a@b"))
    assert not parse_sip_uri("sip:a@b").equivalent("sip:a@b")


# -- properties -------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sip_uris())
def test_generated_uris_round_trip(uri: SipURI) -> None:
    text = str(uri)
    parsed = parse_sip_uri(text)
    assert parsed == uri
    assert str(parsed) == text
    assert parsed.equivalent(uri)


@settings(max_examples=500, deadline=None)
@given(st.text(string.printable + "%[]\u00e9\x00", max_size=60))
def test_arbitrary_text_only_raises_parse_error(text: str) -> None:
    for candidate in (text, "sip:" + text, "sip:u@" + text, "sips:" + text + "@h"):
        try:
            uri = parse_uri(candidate)
        except ParseError:
            continue
        if isinstance(uri, SipURI):
            assert parse_sip_uri(str(uri)) == uri  # whatever parses re-serialises faithfully


@settings(max_examples=500, deadline=None)
@given(st.from_regex(uri_module._PLAIN_SIP, fullmatch=True) |
       st.text(string.ascii_letters + string.digits + "-_.!~*'()&=+$,;?/[]:@%", max_size=40))
def test_the_fast_path_for_plain_uris_agrees_with_the_general_parser(rest: str) -> None:
    def outcome(parse):  # type: ignore[no-untyped-def]
        try:
            return parse()
        except ParseError:
            return ParseError  # the reasons may name the first problem each path meets
    general = outcome(lambda: uri_module._parse_sip("sip", rest, "sip:" + rest))
    assert outcome(lambda: parse_uri("sip:" + rest)) == general
    plain = uri_module._PLAIN_SIP.fullmatch(rest)
    if plain is not None:
        assert outcome(lambda: uri_module._plain_sip("sip", plain, "sip:" + rest)) == general
