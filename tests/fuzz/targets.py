"""Fuzz targets: everything sipmesh parses from the network, one function per target.

Each target takes arbitrary bytes and drives one parser the way the running code does.
It returns normally when the parser accepted the input or refused it with its own error
type (ParseError, AuthError, SDPError, ParamError, IceError, RegInfoError, PathsError; for
aioice's STUN parser ValueError and struct.error); anything else escaping a target is a
crash, and so is an accepted message, SDP body, ICE description or paths document whose
serialisation is refused or reads back differently. Hangs and memory growth are caught by the fuzzer around it (tests/fuzz/harness.py).

No atheris here: tests/test_fuzz.py replays the committed corpus through these functions
in-process, and the harness imports this module under atheris' instrumentation.
"""

from __future__ import annotations

import struct
from typing import Callable

from aioice import stun as aioice_stun

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sipmesh.agent.attributes import read_attribute_list, read_attributes
from sipmesh.agent.memberrelay import offered_relay, parse_credential
from sipmesh.agent.ice import IceError
from sipmesh.agent.ice import parse as ice_parse
from sipmesh.agent.ice import render as ice_render
from sipmesh.agent.params import TYPES, Param, ParamError, param_type, validate
from sipmesh.agent.portmap import (PortmapError, default_gateway, parse_natpmp_address,
                                   parse_natpmp_map, parse_pcp, parse_ssdp)
from sipmesh.agent.roster import NeedFullState, RosterState
from sipmesh.agent.trust import (MemberCertificate, NetworkCA, RevocationList, TrustError,
                                 verify_session)
from sipmesh.ops.paths import Pair, PathsError
from sipmesh.ops.paths import parse as parse_paths
from sipmesh.ops.paths import serialise as serialise_paths
from sipmesh.sip.auth import (AuthError, DigestClient, DigestServer, NonceManager, choose_challenge,
                              compute_ha1, is_stale, parse_auth_params)
from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import (parse_address, parse_cseq, parse_date, parse_header_params, parse_via,
                                 split_list)
from sipmesh.sip.message import (DEFAULT_LIMITS, Limits, Request, make_response,
                                 parse_message)
from sipmesh.sip.reginfo import RegInfoError
from sipmesh.sip.sdp import SDPError, parse_sdp
from sipmesh.sip.transport.base import Flow, response_target, stamp_received
from sipmesh.sip.transport.framing import StreamFramer
from sipmesh.sip.uri import SipURI, parse_uri, split_hostport

# Where the fuzzed bytes "came from": a foreign address, so that received= is stamped.
SOURCE = Flow("UDP", "192.0.2.7", 5070)


def _text(data: bytes) -> str:
    """Header text as the message parser makes it (it decodes with surrogateescape)."""
    return data.decode("utf-8", "surrogateescape")


# -- SIP messages ---------------------------------------------------------------------------

def _receive(data: bytes, *, stream: bool, limits: Limits = DEFAULT_LIMITS) -> None:
    """What TransportLayer._received does with one datagram or framed message, minus I/O."""
    try:
        message = parse_message(data, stream=stream, limits=limits)
        if isinstance(message, Request):
            stamp_received(message, SOURCE)
    except ParseError as exc:
        _reject(exc)
        return
    _use(message)


def _reject(exc: ParseError) -> None:
    """TransportLayer._reject: answer a broken request from its partial parse."""
    partial = exc.partial
    if isinstance(partial, Request) and partial.method != "ACK":
        try:
            stamp_received(partial, SOURCE)
            response = make_response(partial, exc.status, f"Bad Request ({exc.reason})")
            response_target(response, SOURCE)
            response.to_bytes()
        except (ParseError, ValueError):  # the layer drops these (and logs them)
            pass


def _use(message) -> None:  # type: ignore[no-untyped-def]
    """What the layers above read of an accepted message; then forward it (serialise) and
    check that the next hop can parse what we send."""
    try:
        message.vias
        for contact in message.contacts:
            contact.expires, contact.q
        for name in ("Route", "Record-Route", "Path"):
            message.addresses(name)
    except ParseError:
        pass  # headers the parser does not check up front are parsed (and refused) on use
    message.call_id, message.cseq, message.from_.tag, message.to.tag, message.content_type
    if isinstance(message, Request):
        response = make_response(message, 200, to_tag="fuzz")
        response.to_bytes()
    again = message.to_bytes()
    try:
        parse_message(again)
    except ParseError as exc:
        raise AssertionError(f"an accepted message re-serialises to one that is refused: {exc.reason}"
                             f"\n{again!r}") from None


def message(data: bytes) -> None:
    """One UDP datagram (parse_message as the transport calls it)."""
    _receive(data, stream=False)


# The stream target's limits are a tenth of the transport's, so that inputs of a few KB
# reach every limit of the framer (a 64 KB input fed in 1-byte segments is slow to run).
STREAM_LIMITS = Limits(max_message_size=6_553, max_headers=10, max_header_length=819, max_start_line=409)


def stream(data: bytes) -> None:
    """A TCP byte stream: the first byte picks where the bytes are cut into segments, the rest
    is fed to a StreamFramer, each framed message is parsed as the transport does."""
    if not data:
        return
    step, data = data[0] + 1, data[1:]
    framer = StreamFramer(STREAM_LIMITS)
    try:
        for start in range(0, len(data), step):
            for raw in framer.feed(data[start : start + step]):
                _receive(raw, stream=True, limits=STREAM_LIMITS)
    except ParseError:
        pass  # the connection is closed: nothing more can be framed


# -- URIs and header fields -----------------------------------------------------------------

def uri(data: bytes) -> None:
    text = _text(data)
    try:
        parsed = parse_uri(text)
    except ParseError:
        pass
    else:
        again = parse_uri(str(parsed))
        if isinstance(parsed, SipURI):
            parsed.aor, parsed.host_port, parsed.transport, parsed.secure
            if not parsed.equivalent(again):
                raise AssertionError(f"{text!r} and its serialisation {str(parsed)!r} differ")
    try:
        split_hostport(text)
    except ParseError:
        pass


_HEADER_PARSERS: list[Callable[[str], object]] = [
    parse_via, parse_address, parse_cseq, parse_date, split_list, parse_header_params]


def headers(data: bytes) -> None:
    """The first byte picks the header parser (Via, From/To/Contact, CSeq, Date, lists, params)."""
    if not data:
        return
    parse = _HEADER_PARSERS[data[0] % len(_HEADER_PARSERS)]
    text = _text(data[1:])
    try:
        value = parse(text)
    except ParseError:
        return
    if parse is parse_via:
        value.branch, value.received, value.rport  # type: ignore[union-attr]
        parse_via(str(value))
    elif parse is parse_address:
        value.tag, value.expires, value.q  # type: ignore[union-attr]
        parse_address(str(value))


# -- digest authentication ------------------------------------------------------------------

# A fixed secret and clock: the seed corpus holds credentials built on a nonce issued with
# them, so that mutations of it get past the nonce check into the response computation.
NONCES = NonceManager(secret=b"sipmesh fuzz corpus", clock=lambda: 1000.0, max_tracked=1000)
SERVER = DigestServer("example.com", NONCES, ("SHA-256", "MD5"))
CLIENT = DigestClient("alice", "secret")


def _ha1(username: str, realm: str, algorithm: str) -> str | None:
    return compute_ha1(username, realm, "secret", algorithm) if username == "alice" else None


def digest(data: bytes) -> None:
    """Authorization as the broker verifies it, and WWW-Authenticate as an agent answers it."""
    text = _text(data)
    SERVER.verify(text, "REGISTER", _ha1, b"")  # returns an outcome, never raises
    try:
        parse_auth_params(text)
        is_stale(text)
        choose_challenge([text])
        CLIENT.authorize(text, "REGISTER", "sip:example.com", b"", cnonce="0a4f113b")
    except AuthError:
        pass


# -- SDP and application parameters --------------------------------------------------------

def sdp(data: bytes) -> None:
    try:
        parsed = parse_sdp(data)
    except SDPError:
        return
    again = parsed.to_bytes()
    try:
        parse_sdp(again)
    except SDPError as exc:
        raise AssertionError(f"an accepted SDP re-serialises to one that is refused: {exc}\n{again!r}") \
            from None


# Every declared type, each under its own attribute name: a=ipv4:..., a=port:..., ...
_PARAMS = [Param(name, param_type(name), required=False) for name in TYPES]


def attributes(data: bytes) -> None:
    """The agent's path for a peer's SDP: read the a= lines, check them against typed params;
    and a mesh peer's member-relay lines (a=mesh-relay, a=mesh-via: agent/memberrelay.py)."""
    try:
        validate(_PARAMS, read_attributes(data))
        listed = read_attribute_list(data)
    except (SDPError, ParamError):
        return
    offered_relay(listed)
    for name, value in listed:
        if name == "mesh-relay":
            try:
                parse_credential(value, "bob", 1_800_000_000)
            except ValueError:
                pass


# -- mesh trust ----------------------------------------------------------------------------

# A fixed CA and clock: the seed corpus holds sessions signed under them (tests/fuzz/seeds.py),
# so that mutations get past the certificate into the signature and binding checks.
TRUST_CA = NetworkCA("lab", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
TRUST_NOW = 1_800_000_000
TRUST_DIALOG = ("fuzz-call@example.com", "sip:alice@lab.example", "sip:bob@lab.example")


def trust(data: bytes) -> None:
    """The first byte picks: a peer's signed SDP body (read as the agent reads it, then
    verify_session), a member certificate's bytes, or a revocation list's text. An accepted
    certificate must encode back to the same bytes."""
    if not data:
        return
    kind, rest = data[0] % 3, data[1:]
    try:
        if kind == 0:
            verify_session(read_attribute_list(rest), *TRUST_DIALOG, "offer",
                           TRUST_CA.public_key, (), TRUST_NOW)
        elif kind == 1:
            cert = MemberCertificate.from_bytes(rest)
            if cert.to_bytes() != rest:
                raise AssertionError(f"a certificate re-encodes differently: {rest!r}")
            cert.verify(TRUST_CA.public_key, TRUST_NOW)
        else:
            RevocationList.from_text(rest.decode("ascii", "replace"), TRUST_CA.public_key)
    except (SDPError, ParamError, TrustError):
        pass


# -- STUN -----------------------------------------------------------------------------------

def stun(data: bytes) -> None:
    """aioice's STUN parser, which the broker's STUN answers will use: it refuses bad input
    with ValueError, and with struct.error for an attribute shorter than its type (found
    by this target: a 2-byte ICE-CONTROLLING): callers must catch both."""
    try:
        message = aioice_stun.parse_message(data)
    except (ValueError, struct.error):
        return
    # What an answer is built from (a parsed message is not re-serialised: aioice cannot
    # always, e.g. an ERROR-CODE class above 2 digits)
    message.message_method, message.message_class, message.transaction_id, message.attributes


# -- router port mapping -------------------------------------------------------------------

PORTMAP_NONCE = bytes(range(12))   # the nonce and port of the seeds' PCP/NAT-PMP mapping
PORTMAP_PORT = 40000


def portmap(data: bytes) -> None:
    """What the agent reads from its router (agent/portmap.py): PCP answers to MAP and
    ANNOUNCE, NAT-PMP answers, an SSDP answer (the first byte picks which), and the routing
    table the gateway is read from."""
    if not data:
        return
    kind, body = data[0] % 6, data[1:]
    try:
        if kind == 0:
            parse_pcp(body, 1, PORTMAP_NONCE, PORTMAP_PORT)
        elif kind == 1:
            parse_pcp(body, 0)
        elif kind == 2:
            parse_natpmp_address(body)
        elif kind == 3:
            parse_natpmp_map(body, PORTMAP_PORT)
        elif kind == 4:
            parse_ssdp(body, "192.168.1.1")
        else:
            default_gateway(body.decode("ascii", "replace"))
    except PortmapError:
        pass


# -- ICE attributes ---------------------------------------------------------------------------

def ice(data: bytes) -> None:
    """A peer's ICE attributes (agent/ice.py:parse) in an SDP body read as the agent reads
    it: bad credentials are an IceError, a bad candidate is refused with a reason. What is
    accepted renders to lines that parse to the same candidates."""
    try:
        description = ice_parse(read_attribute_list(data))
    except (SDPError, ParamError, IceError):
        return
    if description is None:
        return
    again = ice_parse(ice_render(description))
    assert again is not None
    if [c.to_sdp() for c in again.candidates] != [c.to_sdp() for c in description.candidates]:
        raise AssertionError(f"accepted candidates render differently: {description.candidates}")


# -- a network's roster (RFC 3680 reginfo) ----------------------------------------------------

def reginfo(data: bytes) -> None:
    """A reg-event NOTIFY body as a member reads it (sip/reginfo.py through the agent's
    RosterState): a refused document is a RegInfoError, a partial one out of order asks for
    full state."""
    state = RosterState("lab", me="carol")
    try:
        state.from_reginfo(data)
    except (RegInfoError, NeedFullState):
        pass


# -- a member's paths (the PUBLISH body the broker reads) --------------------------------------

PATHS_MEMBERS = ("alice", "bob", "carol")


def paths(data: bytes) -> None:
    """A member's sipmesh-paths document as the broker reads it (ops/paths.py); accepted
    pairs serialise to a document that parses to the same pairs."""
    try:
        pairs = parse_paths(data, member="alice", members=PATHS_MEMBERS)
    except PathsError:
        return
    again = parse_paths(serialise_paths("alice", pairs), member="alice", members=PATHS_MEMBERS)

    def key(pair: Pair) -> tuple[object, ...]:  # the document carries RTTs to the microsecond
        rtt = None if pair.rtt_ms is None else round(pair.rtt_ms, 3)
        return pair.peer, pair.state, pair.path, pair.why, rtt

    # (serialise drops the last pairs by name when the document would be too long)
    if [key(p) for p in sorted(again, key=lambda p: p.peer)] != \
            [key(p) for p in sorted(pairs, key=lambda p: p.peer)[:len(again)]]:
        raise AssertionError(f"accepted pairs serialise differently: {pairs}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "message": message, "stream": stream, "uri": uri, "headers": headers,
    "digest": digest, "sdp": sdp, "attributes": attributes, "stun": stun, "trust": trust,
    "portmap": portmap, "ice": ice, "reginfo": reginfo, "paths": paths,
}
