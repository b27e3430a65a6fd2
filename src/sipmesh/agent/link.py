"""The link from an agent to its SIP server: the server as people write it, the
transport, and TLS.

The server is ``HOST[:PORT]`` (``[v6]:PORT``), or a URI: ``sips:HOST[:PORT]`` means
TLS (port 5061 unless given), ``sip:HOST[:PORT];transport=tcp`` names a transport.
Over TLS (the thesis' alternative to digest: "TLS between user and server") the
server's certificate is verified against the system's trust store or a CA file, and
must name the server: the host of the server address, or the name given as
`TLSClient.server_name` when the address is an IP or another name. An optional
client certificate is shown to servers that ask for one.

An agent without a certificate of its own does not listen for TLS: it keeps the
connection it opened, and its Via and Contact name that connection's own port, so
the server reaches it over the same connection (as PJSIP does; RFC 3261 §18.2.2).
Either end closes a connection that is idle for 300 s, so over TCP and TLS the
registration is refreshed within that (agent/registration.py).
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass, replace
from typing import Sequence
from pathlib import Path

from sipmesh.agent.errors import CHECK_SERVER, AgentError, Exit
from sipmesh.agent.params import Host, IPAddress, Port
from sipmesh.sip.transport.base import Flow
from sipmesh.sip.transport.resolve import Resolver
from sipmesh.sip.ua import names_a_domain
from sipmesh.sip.uri import is_ip, parse_sip_uri

TRANSPORTS = ("udp", "tcp", "tls")
# What the server check refuses, in OpenSSL's numbers (X509_V_ERR_*_MISMATCH).
_NAME_MISMATCH = (62, 64)


class ServerAddress(str):
    """`host[:port]` for UAConfig.domain, remembering the transport its text implied
    (`transport`: "tls" for sips:, a sip: URI's ;transport=, else None)."""

    transport: str | None

    def __new__(cls, domain: str, transport: str | None = None) -> "ServerAddress":
        self = super().__new__(cls, domain)
        self.transport = transport
        return self

    def with_transport(self, chosen: str | None) -> str:
        """The transport to use ("udp", "tcp", "tls") given the one chosen by option, if
        any; ValueError if the two disagree."""
        if chosen and self.transport and chosen.lower() != self.transport:
            raise ValueError(f"the server {self.text()} means {self.transport.upper()}, "
                             f"not {chosen.upper()}: drop --transport or the URI scheme")
        return (chosen or self.transport or "udp").lower()

    def text(self) -> str:
        """As a person would write it again."""
        return f"sips:{self}" if self.transport == "tls" else str(self)


def parse_server(text: str) -> ServerAddress:
    """HOST[:PORT], [V6]:PORT, sip:HOST[:PORT][;transport=T] or sips:HOST[:PORT];
    ValueError says what is wrong."""
    transport = None
    lowered = text.lower()
    if lowered.startswith(("sip:", "sips:")):
        try:
            uri = parse_sip_uri(text)
        except ValueError as exc:  # ParseError is one
            raise ValueError(f"{text!r} is not a SIP server URI ({exc})") from None
        if uri.user is not None or uri.headers:
            raise ValueError(f"{text!r}: give the server alone (sip[s]:HOST[:PORT]), "
                             "without a user")
        transport = "tls" if uri.secure else (uri.transport or None)
        if transport is not None and transport.lower() not in TRANSPORTS:
            raise ValueError(f"{text!r}: unknown transport {transport!r} (udp, tcp or tls)")
        transport = transport.lower() if transport else None
        host = f"[{uri.host}]" if ":" in uri.host else uri.host
        text = f"{host}:{uri.port}" if uri.port else host
    return ServerAddress(_host_port(text), transport)


def _host_port(text: str) -> str:
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not HOST[:PORT]")
        port = rest[1:] or None
        host = f"[{IPAddress().check(host)}]"
    elif text.count(":") == 1:
        host, port = text.split(":")
        host = Host().check(host)
    else:
        host = Host().check(host)
    if port is not None:
        port = Port().check(port)
    return f"{host}:{port}" if port else host


def server_host(domain: str) -> str:
    """The host part of `host[:port]` (IPv6 without brackets)."""
    if domain.startswith("["):
        return domain[1:].split("]", 1)[0]
    return domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain


@dataclass(frozen=True)
class TLSClient:
    """How we check the SIP server over TLS, and what we show it."""

    ca_file: Path | None = None  # None: the system's trust store
    cert: Path | None = None  # our client certificate (chain), PEM
    key: Path | None = None  # its key, PEM (None: in `cert`)
    server_name: str | None = None  # the name its certificate must show (default: the host)

    def merged(self, over: "TLSClient") -> "TLSClient":
        """These settings with those given in `over` on top (a command line over a file)."""
        return replace(self, **{k: v for k, v in vars(over).items() if v is not None})

    def context(self) -> ssl.SSLContext:
        """A client context (TLS >= 1.2, certificate and name checked); AgentError says
        which file cannot be used."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(f"--ca-file {self.ca_file}: cannot read CA certificates from it "
                             f"({_reason(exc)}): give the PEM file of the CA that signed the SIP "
                             "server's certificate", Exit.USAGE) from None
        if self.key is not None and self.cert is None:
            raise AgentError("--key needs --cert (the client certificate it belongs to)",
                             Exit.USAGE)
        if self.cert is not None:
            try:
                context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
            except (OSError, ssl.SSLError) as exc:
                raise AgentError(f"--cert {self.cert}" + (f" --key {self.key}" if self.key else "")
                                 + f": cannot use them as our client certificate ({_reason(exc)}): "
                                 "give a PEM certificate and the PEM key that belongs to it "
                                 "(unencrypted)", Exit.USAGE) from None
        return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return getattr(exc, "strerror", None) or str(exc)


async def server_flow(resolver: Resolver, domain: str, transport: str) -> Flow:
    """Where our REGISTER goes: the server's transport, IP address and port (as the UA
    finds them, RFC 3263)."""
    uri = parse_sip_uri(f"sip:{domain}")
    if transport.upper() != "UDP":
        uri.params["transport"] = transport.lower()
    try:
        return await resolver.uri_flow(uri, transport.upper())
    except OSError as exc:
        raise AgentError(f"cannot resolve the SIP server {server_host(domain)} ({exc}): check "
                         "the host name in --server", Exit.UNREACHABLE) from None


def tls_name(domain: str, server_name: str | None) -> str | None:
    """The name the server's certificate must show (None: its IP address)."""
    if server_name:
        return server_name
    host = server_host(domain)
    return None if is_ip(host) else host


def connection_error(exc: OSError, server: str, flow: Flow,
                     server_name: str | None) -> AgentError:
    """Why we could not connect to the SIP server `server` at `flow`, and what to do."""
    cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else exc
    where = server if server == f"{flow.host}:{flow.port}" else f"{server} ({flow})"
    where = f"the SIP server {where}"
    if isinstance(cause, ssl.SSLCertVerificationError):
        what = (cause.verify_message or _reason(cause)).rstrip(".")
        if cause.verify_code in _NAME_MISMATCH:
            hint = (f"its certificate is not for {server_name or flow.host}: give the server "
                    "by the name in its certificate (--server), or that name with "
                    "--tls-server-name")
        else:
            hint = ("give the CA certificate that signed it with --ca-file (default: the "
                    "system's trust store)")
        return AgentError(f"refused the TLS certificate of {where} ({what}): {hint}",
                          Exit.UNTRUSTED)
    if flow.transport == "TLS" and isinstance(cause, (ssl.SSLError, ConnectionResetError)):
        what = _reason(cause) or "it closed the connection"
        return AgentError(f"{where} is unreachable: the TLS handshake failed ({what}); is "
                          f"{flow.port} its TLS port? (sipmesh broker --transport ...,tls "
                          "listens for TLS on its --listen port + 1, 5061 by default.) A server "
                          "that asks for a client certificate needs --cert and --key",
                          Exit.UNREACHABLE)
    if isinstance(cause, ConnectionRefusedError):
        return AgentError(f"{where} is unreachable: it refused the connection; {CHECK_SERVER} "
                          f"and listens for {flow.transport}", Exit.UNREACHABLE)
    if isinstance(cause, TimeoutError):
        return AgentError(f"{where} is unreachable: no connection in time; {CHECK_SERVER}; a "
                          "firewall may drop it on the way", Exit.UNREACHABLE)
    return AgentError(f"{where} is unreachable ({_reason(cause) or type(cause).__name__}): "
                      f"{CHECK_SERVER}", Exit.UNREACHABLE)


def client_tls(transport: str, tls: TLSClient) -> ssl.SSLContext | None:
    """The context for `transport` ("udp", "tcp", "tls"): TLS settings for another
    transport are a mistake worth saying."""
    if transport.lower() == "tls":
        return tls.context()
    given = [option for option, value in (("--ca-file", tls.ca_file), ("--cert", tls.cert),
                                          ("--key", tls.key),
                                          ("--tls-server-name", tls.server_name)) if value]
    if given:
        raise AgentError(f"{', '.join(given)}: only for TLS; add --transport tls or give the "
                         "server as sips:HOST[:PORT]", Exit.USAGE)
    return None


INSTANCE_FILE = "instance-id"


def instance_urn(state_dir: Path) -> str | None:
    """Our +sip.instance (RFC 5626 §4.1): a UUID URN kept in `state_dir`, made on first
    use, so every server we register at, and every restart, sees the same instance. None
    (no instance) when the directory cannot be written."""
    path = state_dir / INSTANCE_FILE
    try:
        text = path.read_text().strip()
        return f"<urn:uuid:{uuid.UUID(text)}>"
    except (OSError, ValueError):
        pass
    value = uuid.uuid4()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    except OSError:
        return None
    return f"<urn:uuid:{value}>"


def extra_servers(servers: Sequence[ServerAddress], transport: str) -> tuple[str, ...]:
    """The servers after the first (UAConfig.servers): `--server` given again, or the
    daemon's `servers`. Each must mean the same transport as the first (ValueError)."""
    for server in servers[1:]:
        server.with_transport(transport)
    return tuple(str(s) for s in servers[1:])


def server_instance(servers: Sequence[str], state_dir: Path) -> str | None:
    """Our +sip.instance when we may register at several servers (several given, or one
    domain whose DNS SRV records may list several): the same at each; else None."""
    if len(servers) > 1 or (servers and names_a_domain(servers[0])):
        return instance_urn(state_dir)
    return None
