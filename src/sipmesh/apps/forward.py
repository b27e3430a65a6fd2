"""`forward`: reach a TCP service on the answering host through a local port of the caller.

Two halves, each the supervised program of its side of a session:

* answering side (``python -m sipmesh.apps.forward serve``): listens on the port
  the daemon allocated (sent as ``a=PORT``); each connection must first send the
  session's 16-byte token (sent in the 200 OK as ``a=TOKEN``, base64); then it is
  joined to the target (``target = "127.0.0.1:22"`` in the service's config);
* calling side (``python -m sipmesh.apps.forward connect``): listens on a local
  port (``local_port``, default any free one, printed on stderr) and joins each
  connection to the answering side's ``a=IP4``:``a=PORT``, token first.

When both agents do ICE (the default), the two halves are not used: the agents carry
each connection themselves, as a QUIC stream over the path ICE checked
(agent/streams.py), so the forward works across NATs and through a TURN relay. The
caller's agent listens on ``local_host:local_port``, the answering agent connects each
stream to the target; the peers authenticate each other by the certificate fingerprints
in the SDP, so no token is needed. Each side then runs this module in ``streams`` mode,
which only says where the service is reachable and holds the session (stopping it ends
the session). Against a peer without ICE, the halves below run as before.

Data flows directly between the two halves, never through the SIP server. Each
direction is pumped by its own thread with blocking sockets, so back-pressure is
the kernel's: a slow reader fills the socket buffers and the writer blocks. On
Linux the bytes move with splice(2) through a pipe and never enter Python. EOF
in one direction is passed on as a half-close (``shutdown(SHUT_WR)``); the
connection is closed once both directions have ended.

The token keeps strangers who find the port from reaching the target during the
session. It is not a secret from whoever can read the SIP signalling: protect
that with TLS towards the SIP server, and use an end-to-end protocol (SSH, TLS)
across the forward, as you would over any network.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import hmac
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from sipmesh.agent.errors import Exit, ProfileError
from sipmesh.agent.params import Base64Key, Host, IPAddress, Param, Port
from sipmesh.agent.profile import COMMON_OFFER, IP_PARAMS, PORT, Plan, SessionInfo, \
    endpoint_env, offered_ip
from sipmesh.agent.supervisor import ChildSpec
from sipmesh.daemon.service import ConfigValueError, ServiceProfile

log = logging.getLogger("sipmesh.apps.forward")

TOKEN_BYTES = 16
TOKEN = Param("TOKEN", Base64Key(TOKEN_BYTES))
CHUNK = 1 << 20  # bytes per splice / recv
PIPE_SIZE = 1 << 20
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
CONNECT_RETRY = 10.0  # the answering half may still be starting when the first client comes
DEFAULT_MAX_CONNECTIONS = 64
_SPLICE = hasattr(os, "splice")


# ---------------------------------------------------------------------------- the pump


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass  # the default 64 KiB pipe works, a little slower
    return r, w


def _pump_splice(src: socket.socket, dst: socket.socket) -> None:
    r, w = _pipe()
    try:
        source, sink = src.fileno(), dst.fileno()
        while True:
            n = os.splice(source, w, CHUNK, flags=getattr(os, "SPLICE_F_MOVE", 1))
            if n == 0:
                return
            while n:
                n -= os.splice(r, sink, n, flags=getattr(os, "SPLICE_F_MOVE", 1))
    finally:
        os.close(r)
        os.close(w)


def _pump_copy(src: socket.socket, dst: socket.socket) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        n = src.recv_into(buffer)
        if n == 0:
            return
        dst.sendall(view[:n])


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src -> dst until EOF, then half-close dst. Raises OSError on a broken link."""
    global _SPLICE
    try:
        if _SPLICE:
            _pump_splice(src, dst)
        else:
            _pump_copy(src, dst)
    except OSError as exc:
        if exc.errno == errno.EINVAL and _SPLICE:  # a kernel without socket splice
            _SPLICE = False
            _pump_copy(src, dst)
        else:
            raise
    dst.shutdown(socket.SHUT_WR)


def join(a: socket.socket, b: socket.socket) -> None:
    """Pump both directions until both have ended (or one broke), then close both."""
    broken = threading.Event()

    def direction(src: socket.socket, dst: socket.socket) -> None:
        try:
            pump(src, dst)
        except OSError:
            broken.set()
            for s in (a, b):  # wake the other direction
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    other = threading.Thread(target=direction, args=(b, a), daemon=True)
    other.start()
    direction(a, b)
    other.join()
    _close(a)
    _close(b)


# ---------------------------------------------------------------------------- the halves


def _tune(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def listen(host: str, port: int, backlog: int = 64) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(backlog)
    return server


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class Forwarder:
    """One half: accept on `server`, and for each connection `open_peer` the other end
    (at `address`), with the session's `token`."""

    server: socket.socket
    address: tuple[str, int]  # answering half: the target service; calling half: the other half
    token: bytes
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def open_peer(self, client: socket.socket) -> socket.socket | None:
        raise NotImplementedError

    def serve_forever(self) -> None:
        slots = threading.BoundedSemaphore(self.max_connections)
        while True:
            client, _ = self.server.accept()
            if not slots.acquire(blocking=False):
                log.warning("more than %d connections: refusing one", self.max_connections)
                _close(client)
                continue
            threading.Thread(target=self._handle, args=(client, slots), daemon=True).start()

    def _handle(self, client: socket.socket, slots: threading.BoundedSemaphore) -> None:
        try:
            _tune(client)
            peer = self.open_peer(client)
            if peer is None:
                _close(client)
                return
            _tune(peer)
            join(client, peer)
        except OSError as exc:
            log.info("connection ended: %s", exc)
            _close(client)
        finally:
            slots.release()


class ServeHalf(Forwarder):
    """The answering side: token check, then the target service."""

    def open_peer(self, client: socket.socket) -> socket.socket | None:
        client.settimeout(HANDSHAKE_TIMEOUT)
        try:
            presented = _recv_exactly(client, len(self.token))
        finally:
            client.settimeout(None)
        if not hmac.compare_digest(presented, self.token):
            log.warning("a connection without the session's token: closed")
            return None
        peer = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT)
        peer.settimeout(None)
        return peer


class ConnectHalf(Forwarder):
    """The calling side: to the answering side, token first."""

    def open_peer(self, client: socket.socket) -> socket.socket | None:
        deadline = time.monotonic() + CONNECT_RETRY
        while True:
            try:
                peer = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        peer.settimeout(None)
        peer.sendall(self.token)
        return peer


# ---------------------------------------------------------------------------- the service kind


def _hostport(text: str, what: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port), both validated."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":")
    try:
        return Host().check(host), int(Port().check(port))
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT ({exc})") from None


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sipmesh.apps.forward", *args]


class ForwardService(ServiceProfile):
    """kind = "forward": options target, listen, port (allocator), max_connections;
    caller options (``[service.call]``): local_port, local_host."""

    name = "forward"
    proto = "TCP"
    transport = "tcp"     # with ICE: the connections cross as QUIC streams (module doc)
    offer_params = COMMON_OFFER
    answer_params = IP_PARAMS + (PORT, TOKEN)
    options = ("target", "listen", "port", "max_connections")
    call_options = ("local_port", "local_host")
    settable = ("local_port", "local_host")

    def configure(self, options: dict, call: dict) -> None:
        self.target = None
        if "target" in options:
            try:
                self.target = _hostport(self.option_str(options, "target"), "target")
            except ValueError as exc:
                raise ConfigValueError("target", str(exc).removeprefix("target: ")) from None
        self.listen_host = self.typed(options, "listen", IPAddress(unicast=False)) \
            if "listen" in options else None
        self.port_allocator = self.allocator_option(options, "port", "ports")
        self.max_connections = self.max_streams = self.int_option(
            options, "max_connections", DEFAULT_MAX_CONNECTIONS, 1, 10_000)
        self.local_port = int(self.typed(call, "local_port", Port())) \
            if call.get("local_port") not in (None, 0) else 0
        self.local_host = self.typed(call, "local_host", IPAddress(unicast=False)) \
            if "local_host" in call else "127.0.0.1"

    def check_calling(self) -> None:
        try:
            if "local_port" in self.call_values:
                self.local_port = int(Port().check(self.call_values["local_port"]))
            if "local_host" in self.call_values:
                self.local_host = IPAddress(unicast=False).check(self.call_values["local_host"])
        except ValueError as exc:
            raise ProfileError(f"--param: {exc}", Exit.USAGE) from None

    def check_answering(self) -> None:
        if self.target is None:
            raise ConfigValueError("target", "missing: the TCP service to reach, "
                                              "e.g. target = \"127.0.0.1:22\"")

    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        assert self.target is not None
        lease = self.lease_of(info)
        port = lease.port(self.port_allocator, ("tcp",), host=self.listen_host or "")
        token = base64.b64encode(secrets.token_bytes(TOKEN_BYTES)).decode()
        attributes = {"IP6" if ":" in info.local_ip else "IP4": info.local_ip,
                      "PORT": str(port), "TOKEN": token}
        listen_host = self.listen_host or info.local_ip
        host, tport = self.target
        argv = _module_argv("serve", "--listen", _join_hostport(listen_host, port),
                            "--target", _join_hostport(host, tport),
                            "--max-connections", str(self.max_connections))
        env = endpoint_env(attributes, role="server", info=info,
                           remote_ip=offered_ip(offer), port=str(port))
        return Plan(attributes=attributes, child=ChildSpec(argv=argv, env=env), port=port)

    # -- over QUIC streams (both sides do ICE: info.path is set)
    def stream_target(self, info: SessionInfo, plan: Plan) -> tuple[str, int]:
        assert self.target is not None
        return self.target

    def stream_listen(self, info: SessionInfo) -> tuple[str, int]:
        return (self.local_host, self.local_port)

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        if info.path is None:
            return plan.child
        return ChildSpec(argv=_module_argv("streams"), env=plan.child.env,
                         cleanup=plan.child.cleanup)

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        if info.path is not None:
            path = info.path
            env = endpoint_env({}, role="client", info=info, remote_ip=path.remote_ip,
                               port=str(path.remote_port))
            return ChildSpec(argv=_module_argv(
                "streams", "--reachable", _join_hostport(path.remote_ip, path.remote_port),
                "--service", self.service_name), env=env)
        remote = offered_ip(answer) or ""
        argv = _module_argv("connect", "--listen",
                            _join_hostport(self.local_host, self.local_port),
                            "--remote", _join_hostport(remote, int(answer["PORT"])),
                            "--max-connections", str(self.max_connections),
                            "--service", self.service_name)
        env = endpoint_env(answer, role="client", info=info, remote_ip=remote,
                           port=answer["PORT"])
        return ChildSpec(argv=argv, env=env)


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------- the program


def _token_from_env() -> bytes:
    text = os.environ.get("SIPMESH_TOKEN", "")
    try:
        token = base64.b64decode(TOKEN.parse(text), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise SystemExit(f"forward: SIPMESH_TOKEN is not the session's token ({exc}): "
                         "run me from a sipmesh agent") from None
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipmesh.apps.forward",
                                     description="one half of a sipmesh TCP forward "
                                                 "(the token comes in $SIPMESH_TOKEN)")
    parser.add_argument("mode", choices=("serve", "connect", "streams"))
    parser.add_argument("--listen", metavar="HOST:PORT")
    parser.add_argument("--target", metavar="HOST:PORT", help="serve: the TCP service")
    parser.add_argument("--remote", metavar="HOST:PORT", help="connect: the answering half")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--service", default="forward", help="connect: the name to announce")
    parser.add_argument("--reachable", metavar="HOST:PORT",
                        help="streams: where the agent carries connections to the peer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="forward: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.mode == "streams":   # the agent carries the connections: hold the session
        if args.reachable:
            print(f"sipmesh forward: service {args.service!r} is reachable at "
                  f"{args.reachable} (over the session's QUIC streams)", file=sys.stderr,
                  flush=True)
        while True:
            signal.pause()
    if not args.listen:
        parser.error(f"{args.mode} needs --listen")
    token = _token_from_env()
    try:
        host, port = _hostport(args.listen, "--listen")
        server = listen(host, port)
        if args.mode == "serve":
            if not args.target:
                parser.error("serve needs --target")
            half: Forwarder = ServeHalf(server, _hostport(args.target, "--target"), token,
                                        args.max_connections)
        else:
            if not args.remote:
                parser.error("connect needs --remote")
            half = ConnectHalf(server, _hostport(args.remote, "--remote"), token,
                               args.max_connections)
            bound = server.getsockname()[1]
            print(f"sipmesh forward: service {args.service!r} is reachable at "
                  f"{_join_hostport(host, bound)}", file=sys.stderr, flush=True)
    except (OSError, ValueError) as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 1
    try:
        half.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
