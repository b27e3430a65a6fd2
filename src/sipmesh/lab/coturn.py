"""coturn (Debian ``coturn``, ``turnserver``) as the TURN relay and STUN server of a test.

``Coturn(run_dir, ip, realm=..., users={name: ha1})`` starts ``turnserver`` in the
foreground (own process group, optionally inside a network namespace), waits until it
listens on UDP and TCP, and stops it by PID. No TLS, DTLS, CLI or web admin.

Credentials follow from SIP credentials: coturn's long-term credential key is
MD5(user:realm:password), which is exactly the SIP digest HA1 (RFC 8656 §9.2 and RFC 2617
§3.2.2.2 hash the same string). With ``realm`` = the SIP realm, a site hands coturn the HA1
hashes its broker already stores (``--user=name:0x<ha1>``) and every member uses its SIP
name and password for TURN too; no password is ever written down.

Peers: the relay refuses to relay to loopback, multicast and the private ranges (a TURN
server must not become a way into the site's own networks), unless ``allow_loopback``
(a test on 127.0.0.1).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from .procs import ManagedProcess, free_port, spawn, wait_tcp_listening, wait_udp_listening

__all__ = ["Coturn", "DENIED_PEERS", "coturn_unavailable_reason"]

TURNSERVER = "turnserver"
DENIED_PEERS = ("0.0.0.0-0.255.255.255", "10.0.0.0-10.255.255.255",
                "100.64.0.0-100.127.255.255", "127.0.0.0-127.255.255.255",
                "169.254.0.0-169.254.255.255", "172.16.0.0-172.31.255.255",
                "192.168.0.0-192.168.255.255", "240.0.0.0-255.255.255.255")


def coturn_unavailable_reason() -> str | None:
    """None when turnserver can run here, else why not (for pytest.skip)."""
    if shutil.which(TURNSERVER) is None:
        return "coturn is not installed (apt-get install coturn; see scripts/install --test)"
    return None


class Coturn:
    """One turnserver. ``start()``/``stop()`` or a context manager."""

    def __init__(self, run_dir: str | Path, ip: str, *, realm: str,
                 users: Mapping[str, str], port: int | None = None, netns: object | None = None,
                 allow_loopback: bool = False, min_port: int = 49152, max_port: int = 65535):
        """`users` maps a name to its SIP HA1 (hex). `port` is for UDP and TCP alike (3478,
        or a free one on 127.0.0.1 when `ip` is a loopback address)."""
        self.run_dir = Path(run_dir)
        self.ip = ip
        self.realm = realm
        self.users = dict(users)
        self.netns = netns
        self.allow_loopback = allow_loopback or ip.startswith("127.")
        if port is None:
            port = free_port("both", ip) if netns is None else 3478
        self.port = port
        self.min_port, self.max_port = min_port, max_port
        self.proc: ManagedProcess | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def config(self) -> str:
        """The ``turnserver.conf`` text (what a site would install, mode 0600: it holds HA1s)."""
        lines = [f"listening-ip={self.ip}", f"relay-ip={self.ip}",
                 f"listening-port={self.port}",
                 f"min-port={self.min_port}", f"max-port={self.max_port}",
                 f"realm={self.realm}", "lt-cred-mech", "fingerprint",
                 "no-tls", "no-dtls", "no-cli", "no-software-attribute", "no-multicast-peers",
                 f"userdb={self.run_dir / 'turndb'}",
                 f"pidfile={self.run_dir / 'turnserver.pid'}",
                 "log-file=stdout", "simple-log"]
        if self.allow_loopback:
            lines.append("allow-loopback-peers")
        lines += [f"denied-peer-ip={peers}" for peers in DENIED_PEERS
                  if not (self.allow_loopback and peers.startswith("127."))]
        for name, ha1 in self.users.items():
            if not name or any(c in name for c in ":\n\r #") or len(ha1) != 32 \
                    or any(c not in "0123456789abcdef" for c in ha1):
                raise ValueError(f"bad TURN user {name!r}: an HA1 is 32 lowercase hex digits")
            lines.append(f"user={name}:0x{ha1}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> "Coturn":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "turnserver.conf"
        with os.fdopen(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.config())
        # HA1s in a 0600 file, not on the command line where ps shows them
        self.proc = spawn([TURNSERVER, "-c", str(conf)], cwd=self.run_dir, netns=self.netns,
                          name="turnserver", log_path=self.run_dir / "turnserver.log")
        try:
            wait_udp_listening(self.ip, self.port, self.netns, timeout, proc=self.proc)
            wait_tcp_listening(self.ip, self.port, self.netns, timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0)

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc else ""

    def __enter__(self) -> "Coturn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
