"""`wireguard`: a point-to-point WireGuard tunnel per session (wireguard-go + wg + ip).

Each side makes a fresh X25519 key pair for the session on its own host (the
`cryptography` package) and sends only the public key (``a=wg-pubkey``). The
answering side allocates its UDP port (``a=PORT``) and the tunnel's address pair
(``a=VPN_LOCAL_ADDR`` its own, ``a=VPN_REMOTE_ADDR`` the caller's) from the
daemon's pools. Each side's program is this module's ``up`` command, which runs
``wireguard-go -f IFNAME`` in the foreground, sets the key and the peer with
``wg set IFNAME private-key /dev/stdin ...``, adds the addresses with ``ip`` and
waits; SIGTERM removes the interface. Interface names are unique per session
(``smwg`` + 8 hex digits): wireguard-go's control socket
``/var/run/wireguard/IFNAME.sock`` is shared by every network namespace.

The private key never leaves its host and never appears in argv, the
environment, SDP or a log: it is written to a 0600 file in a 0700 directory
under the state directory, which ``up`` reads and deletes at once before
handing the key to ``wg`` on a pipe (the directory is removed when the session
ends, as a backstop).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import AgentError, Exit, ProfileError
from sipmesh.agent.handover import KEEPALIVE, UdpEndpoint
from sipmesh.agent.params import Base64Key, IPv4, Param
from sipmesh.agent.ports import pick_port
from sipmesh.agent.profile import COMMON_OFFER, IP_PARAMS, PORT, AppProfile, Plan, SessionInfo, \
    endpoint_env, offered_ip
from sipmesh.agent.supervisor import ChildSpec, resolve_program
from sipmesh.apps.exec import DEFAULT_VPN_LOCAL, VPN_LOCAL, VPN_REMOTE, vpn_pair
from sipmesh.daemon.service import ConfigValueError, ServiceProfile

log = logging.getLogger("sipmesh.apps.wireguard")

PUBKEY = Param("wg-pubkey", Base64Key(32))
DEFAULT_PORT = 51820
UAPI_DIR = Path("/var/run/wireguard")
IFNAME_PREFIX = "smwg"
SOCKET_WAIT = 10.0
READY_WAIT = 15.0
ANSWER_WAIT = 0.5      # s: the answering side waits this long for the caller's handshake
HANDSHAKE_POLL = 0.05  # s: how often it looks


def uapi_answers(sock: Path) -> bool:
    """Whether wireguard-go's UAPI socket takes connections. The file appears before it
    listens: a `wg` in between finds none, falls back to the kernel's netlink and fails
    ("Unable to modify interface: Protocol not supported")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def keypair() -> tuple[bytes, str]:
    """(private key as base64 bytes, public key as base64 text), X25519 as WireGuard uses."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                              PrivateFormat, PublicFormat)

    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(private), base64.b64encode(public).decode()


def interface_name(prefix: str = IFNAME_PREFIX) -> str:
    """A name no interface and no wireguard-go socket on this machine uses (<= 15 chars)."""
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(4)}"[:15]
        if not (UAPI_DIR / f"{name}.sock").exists() and not Path(f"/sys/class/net/{name}").exists():
            return name
    raise ProfileError("cannot find a free WireGuard interface name")


def write_private_key(directory: Path, key: bytes) -> Path:
    """The key in a new 0600 file inside a new 0700 directory under `directory`."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    session_dir = Path(tempfile.mkdtemp(prefix="wg-", dir=directory))  # mkdtemp: 0700
    path = session_dir / "private.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key + b"\n")
    finally:
        os.close(fd)
    return path


def _state_dir(state_dir: Path | None) -> Path:
    if state_dir is not None:
        return Path(state_dir)
    from sipmesh.agent.certs import default_state_dir
    return default_state_dir()


class WireGuardSessions:
    """The session half both kinds share (`WireGuardProfile` for ``sipmesh serve/call --app
    wireguard``, `WireGuardService` for the daemon): keys, the program, the path.

    Without a path (ICE off, or a peer without ICE) as before: the answering side listens
    on its a=PORT and waits; the caller points its peer at a=IP4:a=PORT from any port.
    With a path (``info.path``, agent/handover.py) both sides bind ``path.local_port``
    (wireguard-go's listen-port: the port ICE checked) and point their peer at
    ``path.remote_ip:remote_port`` with a persistent keepalive of at most
    ``handover.KEEPALIVE`` s, under conntrack's 30 s. The caller initiates the first
    handshake; the answering side sets its endpoint and keepalive once that handshake came,
    or after ANSWER_WAIT s without one (the caller's was lost: it came up first), and then
    initiates itself. Two initiations that cross are both lost (wireguard-go drops the
    response to its own once it answered the other's) and nothing moves until WireGuard's
    5 s retry; see docs/daemon.md, kind `wireguard`.

    A class using it provides ``keepalive``, ``mtu``, ``programs``, ``prefix``,
    ``state_dir`` and `choose` (the answering side's port and address pair)."""

    name = "wireguard"
    media = "application/vpn"
    proto = "WireGuard"
    transport = "udp"
    offer_params = COMMON_OFFER + (PUBKEY,)
    answer_params = IP_PARAMS + (PORT, VPN_LOCAL, VPN_REMOTE, PUBKEY)
    keepalive: int
    mtu: int
    programs: dict[str, str]
    prefix: str
    state_dir: Path | None
    _private: bytes | None = None

    def choose(self, info: SessionInfo) -> tuple[int, str, str]:
        """The answering side's UDP port and tunnel address pair (ours, the caller's)."""
        raise NotImplementedError

    def check(self) -> None:
        for key, program in self.programs.items():
            try:
                self.programs[key] = resolve_program(program)
            except ProfileError as exc:
                raise self.program_error(key, exc) from None
        if not os.path.exists("/dev/net/tun"):
            raise ProfileError("/dev/net/tun is missing: no tunnel can be made here (a "
                               "container needs --device /dev/net/tun and CAP_NET_ADMIN)",
                               Exit.PROGRAM)

    def program_error(self, key: str, exc: ProfileError) -> Exception:
        return exc

    # -- the calling side: our key pair is made with the offer -------------------------
    def offer(self, info: SessionInfo) -> dict[str, str]:
        self._private, public = keypair()
        return dict(super().offer(info), **{"wg-pubkey": public})  # type: ignore[misc]

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        assert self._private is not None, "offer() makes the key pair"
        remote = offered_ip(answer) or ""
        tunnel = Tunnel(self._key_file(self._private), interface_name(self.prefix),
                        address=answer["VPN_REMOTE_ADDR"], peer_address=answer["VPN_LOCAL_ADDR"],
                        peer_key=answer["wg-pubkey"], endpoint=_hostport(remote, answer["PORT"]),
                        keepalive=self.keepalive)
        return self._spec(info, "client", tunnel, values=answer, remote_ip=remote,
                          port=answer["PORT"])

    # -- the answering side ---------------------------------------------------------
    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        port, local, remote = self.choose(info)
        private, public = keypair()
        attributes = {"IP6" if ":" in info.local_ip else "IP4": info.local_ip,
                      "PORT": str(port), "VPN_LOCAL_ADDR": local, "VPN_REMOTE_ADDR": remote,
                      "wg-pubkey": public}
        tunnel = Tunnel(self._key_file(private), interface_name(self.prefix), address=local,
                        peer_address=remote, peer_key=offer["wg-pubkey"], listen_port=port)
        child = self._spec(info, "server", tunnel, values=attributes,
                           remote_ip=offered_ip(offer), port=str(port))
        return Plan(attributes=attributes, child=child, port=port, path_port=port,
                    context={"tunnel": tunnel, "offer": offer})

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        """The same key and interface as the plan's program, on the path."""
        offer = plan.context["offer"]
        return self._spec(info, "server", plan.context["tunnel"], values=plan.attributes,
                          remote_ip=offered_ip(offer), port=plan.attributes["PORT"])

    async def wait_ready(self, plan: Plan, child: Any) -> None:
        """The answering side's program waits until our end is configured: without a path
        the 200 OK waits for it (a caller whose first handshake found nobody would wait
        for WireGuard's 5 s retry)."""
        ready = Path(plan.child.argv[plan.child.argv.index("--ready-file") + 1])
        deadline = time.monotonic() + READY_WAIT
        while not ready.exists():
            if child.exited.done():
                raise ProfileError("the WireGuard program exited during setup "
                                   f"(status {child.exited.result()}; its output is in our "
                                   "log, -v shows more)")
            if time.monotonic() > deadline:
                raise ProfileError(f"the WireGuard interface was not up within "
                                   f"{READY_WAIT:g} s")
            await asyncio.sleep(0.01)

    async def repath(self, child: Any, path: UdpEndpoint) -> bool:
        """A new path after an ICE restart (agent/mobility.py): wireguard-go keeps running,
        `wg set` moves it to the path's port and points its peer there (UAPI; the tunnel,
        its keys and its sessions stay)."""
        ifname = child.spec.env.get("SIPMESH_IFNAME", "")
        wg = self.programs["wg"]
        peers = await _wg(wg, "show", ifname, "peers")
        if peers is None or len(peers.split()) != 1:
            return False
        keepalive = min(self.keepalive, int(KEEPALIVE)) if self.keepalive else int(KEEPALIVE)
        done = await _wg(wg, "set", ifname, "listen-port", str(path.local_port),
                         "peer", peers.split()[0],
                         "endpoint", _hostport(path.remote_ip, str(path.remote_port)),
                         "persistent-keepalive", str(keepalive))
        return done is not None

    def _key_file(self, private: bytes) -> Path:
        return write_private_key(_state_dir(self.state_dir) / "run", private)

    def _spec(self, info: SessionInfo, role: str, tunnel: "Tunnel", *, values: dict[str, str],
              remote_ip: str | None, port: str) -> ChildSpec:
        if info.path is not None:
            tunnel = tunnel.on(info.path, initiate=role == "client")
        argv = [sys.executable, "-m", "sipmesh.apps.wireguard", "up", *tunnel.argv(),
                "--mtu", str(self.mtu),
                "--wireguard-go", self.programs["wireguard_go"], "--wg", self.programs["wg"],
                "--ip", self.programs["ip"]]
        env = endpoint_env(values, role=role, info=info, remote_ip=remote_ip, port=port)
        env["SIPMESH_IFNAME"] = tunnel.ifname
        directory = tunnel.key_file.parent
        return ChildSpec(argv=argv, env=env,
                         cleanup=lambda: shutil.rmtree(directory, ignore_errors=True))


@dataclass(frozen=True)
class Tunnel:
    """One end's settings: what ``up`` is told."""

    key_file: Path
    ifname: str
    address: str
    peer_address: str
    peer_key: str
    listen_port: int | None = None
    endpoint: str | None = None
    keepalive: int = 0
    initiate: bool = True   # False: the endpoint is set once the peer's handshake came

    def on(self, path: UdpEndpoint, *, initiate: bool = True) -> "Tunnel":
        """This end on the path ICE chose: its port, the peer there, kept alive."""
        keepalive = min(self.keepalive, int(KEEPALIVE)) if self.keepalive else int(KEEPALIVE)
        return replace(self, listen_port=path.local_port,
                       endpoint=_hostport(path.remote_ip, str(path.remote_port)),
                       keepalive=keepalive, initiate=initiate)

    def argv(self) -> list[str]:
        argv = ["--ifname", self.ifname, "--key-file", str(self.key_file),
                "--address", self.address, "--peer-address", self.peer_address,
                "--peer-key", self.peer_key, "--ready-file", str(self.key_file.parent / "ready")]
        if self.listen_port is not None:
            argv += ["--listen-port", str(self.listen_port)]
        if self.endpoint is not None:
            argv += ["--endpoint", self.endpoint, "--keepalive", str(self.keepalive)]
            if not self.initiate:
                argv.append("--answer-first")
        return argv


async def _wg(wg: str, *args: str) -> str | None:
    """Run `wg` with `args` (an argv list); its output, None if it failed (logged)."""
    process = await asyncio.create_subprocess_exec(wg, *args, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        log.warning("wg %s failed: %s", args[0], err.decode(errors="replace").strip())
        return None
    return out.decode(errors="replace")


def _hostport(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WireGuardService(WireGuardSessions, ServiceProfile):
    """kind = "wireguard": options port (a UDP allocator), addresses (an IPv4 pool),
    keepalive, mtu, wireguard_go, wg, ip, ifname_prefix."""

    options = ("port", "addresses", "keepalive", "mtu", "wireguard_go", "wg", "ip",
               "ifname_prefix")

    def configure(self, options: dict[str, Any], call: dict[str, Any]) -> None:
        self.port_allocator = self.allocator_option(options, "port", "ports")
        self.pool = self.allocator_option(options, "addresses", "addresses",
                                          required=self.side == "answer")
        if self.pool and ":" in str(getattr(self.allocators[self.pool], "network", "")):
            raise ConfigValueError("addresses", "use an IPv4 pool")
        self.keepalive = self.int_option(options, "keepalive", 25, 0, 3600)
        self.mtu = self.int_option(options, "mtu", 1420, 576, 9000)
        self.programs = {key: self.option_str(options, key, default)
                         for key, default in (("wireguard_go", "wireguard-go"),
                                              ("wg", "wg"), ("ip", "ip"))}
        self.prefix = self.option_str(options, "ifname_prefix", IFNAME_PREFIX)
        if not self.prefix.isalnum() or len(self.prefix) > 7:
            raise ConfigValueError("ifname_prefix", "at most 7 letters and digits")
        self._private = None

    def program_error(self, key: str, exc: ProfileError) -> Exception:
        return ConfigValueError(key, str(exc))

    def choose(self, info: SessionInfo) -> tuple[int, str, str]:
        assert self.pool is not None
        lease = self.lease_of(info)
        port = lease.port(self.port_allocator, ("udp",))
        local, remote = lease.pair(self.pool)
        return port, local, remote


class WireGuardProfile(WireGuardSessions, AppProfile):
    """``sipmesh serve/call --app wireguard``: one session at a time, the answering side on
    its application port (the next free one) with a fixed tunnel address pair."""

    def __init__(self, *, app_port: int = DEFAULT_PORT, vpn_local: str = DEFAULT_VPN_LOCAL,
                 vpn_remote: str | None = None, state_dir: Path | None = None,
                 keepalive: int = 25, mtu: int = 1420, wireguard_go: str = "wireguard-go",
                 wg: str = "wg", ip: str = "ip") -> None:
        self.app_port = app_port
        self.vpn_local, self.vpn_remote = vpn_pair(vpn_local, vpn_remote)
        self.state_dir = state_dir
        self.keepalive, self.mtu = keepalive, mtu
        self.programs = {"wireguard_go": wireguard_go, "wg": wg, "ip": ip}
        self.prefix = IFNAME_PREFIX

    def choose(self, info: SessionInfo) -> tuple[int, str, str]:
        return pick_port(self.app_port, ("udp",)), self.vpn_local, self.vpn_remote


# ---------------------------------------------------------------------------- the program


class _Tunnel:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.process: subprocess.Popen | None = None
        self.stopping = False

    def run(self) -> int:
        args = self.args
        key = _read_and_delete(Path(args.key_file))
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        self.process = subprocess.Popen([args.wireguard_go, "-f", args.ifname], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            self._wait_socket()
            command = [args.wg, "set", args.ifname, "private-key", "/dev/stdin"]
            if args.listen_port:
                command += ["listen-port", str(args.listen_port)]
            command += ["peer", args.peer_key, "allowed-ips", f"{args.peer_address}/32"]
            if args.endpoint and not args.answer_first:
                command += self._where()
            _run(command, input=key)
            del key
            _run([args.ip, "address", "add", args.address, "peer", args.peer_address,
                  "dev", args.ifname])
            _run([args.ip, "link", "set", "dev", args.ifname, "mtu", str(args.mtu), "up"])
            print(f"wireguard: {args.ifname} up, {args.address} <-> {args.peer_address}",
                  file=sys.stderr, flush=True)
            if args.ready_file:
                Path(args.ready_file).touch(mode=0o600)
            if args.endpoint and args.answer_first:
                self._after_first_handshake()
            status = self.process.wait()
            if not self.stopping:
                print(f"wireguard: wireguard-go exited with status {status}", file=sys.stderr)
                return 1
            return 0
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            print(f"wireguard: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            self.down()

    def _where(self) -> list[str]:
        where = ["endpoint", self.args.endpoint]
        if self.args.keepalive:
            where += ["persistent-keepalive", str(self.args.keepalive)]
        return where

    def _after_first_handshake(self) -> None:
        """The answering side: the peer's first handshake initiation is answered (the
        peer is on the interface, WireGuard learns its endpoint from it); then our end
        points at the path and keeps it alive. Without one within ANSWER_WAIT s we set it
        all the same, and initiate ourselves."""
        assert self.process is not None
        args = self.args
        deadline = time.monotonic() + ANSWER_WAIT
        while time.monotonic() < deadline and self.process.poll() is None:
            shown = subprocess.run([args.wg, "show", args.ifname, "latest-handshakes"],
                                   capture_output=True, text=True, timeout=10).stdout.split()
            if len(shown) == 2 and shown[1] != "0":
                break
            time.sleep(HANDSHAKE_POLL)
        if self.process.poll() is None:
            _run([args.wg, "set", args.ifname, "peer", args.peer_key, *self._where()])

    def _wait_socket(self) -> None:
        assert self.process is not None
        sock = UAPI_DIR / f"{self.args.ifname}.sock"
        deadline = time.monotonic() + SOCKET_WAIT
        while not uapi_answers(sock):
            if self.process.poll() is not None:
                raise RuntimeError(f"wireguard-go exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go made no {sock} within {SOCKET_WAIT:g} s")
            time.sleep(0.02)

    def stop(self, *_: object) -> None:
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def down(self) -> None:
        """wireguard-go removes its interface when it exits; make sure of both."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if Path(f"/sys/class/net/{self.args.ifname}").exists():
            subprocess.run([self.args.ip, "link", "delete", "dev", self.args.ifname],
                           capture_output=True, timeout=10)


def _read_and_delete(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    if len(key) != 44:
        raise SystemExit("wireguard: the key file does not hold a WireGuard key")
    return key


def _run(command: list[str], input: bytes | None = None) -> None:
    result = subprocess.run(command, input=input, capture_output=True, timeout=20)
    if result.returncode != 0:
        # never echo `input` (the private key); the command line holds no secret
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.decode(errors='replace').strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipmesh.apps.wireguard",
                                     description="one end of a sipmesh WireGuard session")
    parser.add_argument("command", choices=("up",))
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--address", required=True, type=IPv4().check)
    parser.add_argument("--peer-address", required=True, type=IPv4().check)
    parser.add_argument("--peer-key", required=True, type=PUBKEY.type.check)
    parser.add_argument("--listen-port", type=int)
    parser.add_argument("--endpoint")
    parser.add_argument("--keepalive", type=int, default=25)
    parser.add_argument("--answer-first", action="store_true",
                        help="set --endpoint once the peer's first handshake came")
    parser.add_argument("--mtu", type=int, default=1420)
    parser.add_argument("--wireguard-go", default="wireguard-go")
    parser.add_argument("--wg", default="wg")
    parser.add_argument("--ip", default="ip")
    parser.add_argument("--ready-file", help="created once the interface is up")
    args = parser.parse_args(argv)
    tunnel = _Tunnel(args)
    signal.signal(signal.SIGTERM, tunnel.stop)
    signal.signal(signal.SIGINT, tunnel.stop)
    return tunnel.run()


if __name__ == "__main__":
    sys.exit(main())
