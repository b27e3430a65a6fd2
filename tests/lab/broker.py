"""sipmesh's own broker as a process of the lab, the way a user runs it (`sipmesh broker`).

* :func:`start_broker`: on 127.0.0.1, waited for until every worker is bound (UDP and TCP);
* :class:`BrokerServer`: with the interface of :class:`tests.lab.Kamailio` (``host``,
  ``port``, ``hostport``, ``address``, ``registered(user)``, ``stop()``), so that one test
  runs against either SIP server, optionally inside a network namespace.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .agents import SIPMESH
from sipmesh.lab.procs import ManagedProcess, free_port, listening_sockets, spawn, wait_tcp_listening, wait_udp_listening
from sipmesh.lab.waiting import wait_for


def start_broker(tmp_path: Path, *, port: int | None = None, users: Path | None = None,
                 extra: list[str] = (), name: str = "broker", db: Path | None = None) -> tuple[ManagedProcess, int]:
    """`python -m sipmesh broker` on 127.0.0.1 (one worker unless ``extra`` says
    ``--workers N``), returned once every worker has bound its UDP socket and TCP listens."""
    port = port or free_port("both")
    workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
    argv = [sys.executable, "-m", "sipmesh", "broker", "--listen", f"127.0.0.1:{port}",
            "--domain", "127.0.0.1", "--db", str(db or tmp_path / "broker.db"), "--rate-limit", "0",
            *(extra if "--workers" in extra else ["--workers", "1", *extra])]
    if users is not None:
        argv += ["--users", str(users)]
    proc = spawn(argv, cwd=tmp_path, log_path=tmp_path / "logs" / f"{name}.log", name=name)
    wait_udp_listening("127.0.0.1", port, proc=proc)
    wait_tcp_listening("127.0.0.1", port, proc=proc)
    if workers > 1:  # each worker binds sockets of its own (SO_REUSEPORT): wait for all
        wait_for(lambda: all(listening_sockets(proto).count(("127.0.0.1", port)) >= workers
                             for proto in ("udp", "tcp")), 10,
                 what=f"{workers} workers bound to 127.0.0.1:{port} (UDP and TCP)",
                 abort=proc.exit_reason)
    return proc, port


class BrokerServer:
    """Our broker (`sipmesh broker`) as a separate process, with Kamailio's test interface:
    host, port, hostport, address, registered(user), stop()."""

    sdp_rewrite = False

    def __init__(self, run_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 netns=None, users: dict[str, str] | None = None,
                 extra: tuple[str, ...] | list[str] = (), domain: str | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.netns = host, netns
        self.domain = domain or host  # of the AORs it holds (`--domain`, if given)
        self.port = port or (5060 if netns is not None else free_port("both", host))
        self.db = run_dir / "broker.db"
        argv = [SIPMESH, "broker", "--listen", f"{host}:{self.port}", "--db", str(self.db),
                "--workers", "1", *(["--domain", domain] if domain else []), *extra]
        if users:
            users_file = run_dir / "users"
            for user, password in users.items():
                subprocess.run([SIPMESH, "broker", "users", "add", "--users", str(users_file),
                                "--realm", host, "--password-stdin", user], input=password + "\n",
                               text=True, check=True, capture_output=True, timeout=20)
            argv += ["--users", str(users_file)]
        self.proc = spawn(argv, cwd=run_dir, log_path=run_dir / "broker.log", netns=netns,
                          name=f"broker:{self.port}")
        try:
            wait_udp_listening(host, self.port, netns, 15, proc=self.proc)
        except BaseException:
            self.proc.stop()
            raise

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def registered(self, user: str) -> bool:
        """Does the broker hold a binding for `user`?"""
        from sipmesh.broker.location import LocationService

        location = LocationService(self.db)
        try:
            return bool(location.lookup(f"sip:{user}@{self.domain}"))
        finally:
            location.close()

    def stop(self) -> None:
        self.proc.stop(grace=5)
