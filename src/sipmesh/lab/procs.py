"""Process helpers for the test lab: free ports, managed child processes, bound sockets.

Every process started with :func:`spawn` runs in its own session (process group), logs
stdout+stderr to a file and is recorded in :data:`REGISTRY`; the autouse fixture in
``tests.lab.fixtures`` stops every process a test started, even when the test fails.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .waiting import wait_for

__all__ = [
    "ManagedProcess",
    "ProcessRegistry",
    "REGISTRY",
    "free_port",
    "ipv6_loopback",
    "netns_prefix",
    "pid_alive",
    "listening_sockets",
    "spawn",
    "wait_tcp_listening",
    "wait_udp_listening",
]

# --------------------------------------------------------------------------- ports

_handed_out: set[tuple[str, int]] = set()
_port_lock = threading.Lock()


def _bind_ok(kind: int, host: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, kind)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ipv6_loopback() -> bool:
    """Can a socket bind ::1 here? (some containers have no IPv6 at all)"""
    return _bind_ok(socket.SOCK_DGRAM, "::1", 0)


def free_port(kind: str = "udp", host: str = "127.0.0.1") -> int:
    """Return a port on ``host`` that is currently free.

    ``kind`` is ``'udp'``, ``'tcp'`` or ``'both'`` (free for UDP *and* TCP, e.g. for a SIP
    server listening on both). Ports already handed out by this process are not reused.
    The port is only probed, not held: start the server soon after.
    """
    if kind not in ("udp", "tcp", "both"):
        raise ValueError(f"kind must be 'udp', 'tcp' or 'both', not {kind!r}")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    first = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with _port_lock:
        for _ in range(200):
            s = socket.socket(fam, first)
            try:
                s.bind((host, 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if (host, port) in _handed_out:
                continue
            if kind == "both" and not _bind_ok(socket.SOCK_STREAM, host, port):
                continue
            _handed_out.add((host, port))
            return port
    raise RuntimeError(f"no free {kind} port found on {host} after 200 tries")


# --------------------------------------------------------------------------- bound sockets


def netns_prefix(netns: object | None) -> list[str]:
    """argv prefix running a command inside ``netns`` (a name or an object with ``.name``)."""
    if netns is None:
        return []
    name = getattr(netns, "name", netns)
    return ["ip", "netns", "exec", str(name)]


_ADDR_RE = re.compile(r"^(?P<host>.*):(?P<port>\d+|\*)$")


def listening_sockets(proto: str = "udp", netns: object | None = None) -> list[tuple[str, int]]:
    """(host, port) of every listening/bound socket, from ``ss -H -ln{u,t}``."""
    flag = {"udp": "-Hlnu", "tcp": "-Hlnt"}[proto]
    out = subprocess.run(
        netns_prefix(netns) + ["ss", flag],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        m = _ADDR_RE.match(cols[3])
        if not m or m.group("port") == "*":
            continue
        host = m.group("host").strip("[]")
        host = host.split("%", 1)[0]  # 0.0.0.0%lo
        found.append((host, int(m.group("port"))))
    return found


_WILDCARDS = {"*", "0.0.0.0", "::"}


def _is_listening(proto: str, host: str, port: int, netns: object | None) -> bool:
    for h, p in listening_sockets(proto, netns):
        if p == port and (h == host or h in _WILDCARDS or host in _WILDCARDS):
            return True
    return False


def wait_udp_listening(
    host: str, port: int, netns: object | None = None, timeout: float = 10.0,
    *, proc: "ManagedProcess | None" = None,
) -> None:
    """Wait until a UDP socket is bound to host:port (in ``netns`` if given).

    With ``proc``, stop waiting as soon as that process has exited (its log tail is shown).
    """
    wait_for(lambda: _is_listening("udp", host, port, netns), timeout, 0.05,
             what=f"UDP {host}:{port} bound" + (f" in netns {getattr(netns, 'name', netns)}" if netns else ""),
             abort=proc.exit_reason if proc else None)


def wait_tcp_listening(
    host: str, port: int, netns: object | None = None, timeout: float = 10.0,
    *, proc: "ManagedProcess | None" = None,
) -> None:
    """Wait until a TCP socket listens on host:port (``ss -lnt``; a connect when no netns)."""

    def check() -> bool:
        if netns is None:
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return True
            except OSError:
                pass
        return _is_listening("tcp", host, port, netns)

    wait_for(check, timeout, 0.05,
             what=f"TCP {host}:{port} listening" + (f" in netns {getattr(netns, 'name', netns)}" if netns else ""),
             abort=proc.exit_reason if proc else None)


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running? (a zombie counts as gone)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ManagedProcess:
    """A child process in its own session whose output goes to ``log_path``."""

    def __init__(self, argv: Sequence[str], *, cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, log_path: str | os.PathLike,
                 netns: object | None = None, name: str | None = None,
                 stdin: int | None = subprocess.DEVNULL):
        self.argv = [str(a) for a in argv]
        self.netns = netns
        self.full_argv = netns_prefix(netns) + self.argv
        self.name = name or Path(self.argv[0]).name
        self.cwd = Path(cwd) if cwd is not None else None
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        try:
            self.popen = subprocess.Popen(
                self.full_argv,
                cwd=self.cwd,
                env=dict(env) if env is not None else None,
                stdin=stdin,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = self.popen.pid
        self.started_at = time.monotonic()

    # -- state
    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_reason(self) -> str | None:
        """None while running, else a message with the exit code and the log tail."""
        rc = self.popen.poll()
        if rc is None:
            return None
        return f"{self.name} (pid {self.pid}) exited with {rc}; log tail:\n{self.log_tail()}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; raises subprocess.TimeoutExpired."""
        return self.popen.wait(timeout)

    # -- stopping
    def signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def stop(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the whole process group, wait ``grace`` s, then SIGKILL the group.

        Idempotent. Returns the exit code of the main process.
        """
        if self.popen.poll() is None:
            self.signal_group(sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        # leftovers in the group (children of a main process that already exited)
        self.signal_group(signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return self.popen.poll()

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.popen.poll()}>"


class ProcessRegistry:
    """Remembers started processes so they can be stopped in bulk (newest first)."""

    def __init__(self) -> None:
        self._procs: list[ManagedProcess] = []
        self._lock = threading.Lock()

    def add(self, proc: ManagedProcess) -> ManagedProcess:
        with self._lock:
            self._procs.append(proc)
        return proc

    def mark(self) -> int:
        """A position; :meth:`stop_since` stops everything registered after it."""
        with self._lock:
            return len(self._procs)

    def stop_since(self, mark: int = 0, grace: float = 5.0) -> list[ManagedProcess]:
        with self._lock:
            victims = self._procs[mark:]
            del self._procs[mark:]
        for p in reversed(victims):
            try:
                p.stop(grace)
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
        return victims

    def stop_all(self, grace: float = 5.0) -> list[ManagedProcess]:
        return self.stop_since(0, grace)

    def alive(self) -> list[ManagedProcess]:
        with self._lock:
            return [p for p in self._procs if p.alive()]

    def __iter__(self) -> Iterable[ManagedProcess]:
        with self._lock:
            return iter(list(self._procs))


REGISTRY = ProcessRegistry()
atexit.register(REGISTRY.stop_all, 2.0)


def spawn(argv: Sequence[str], *, cwd: str | os.PathLike | None = None,
          env: Mapping[str, str] | None = None, log_path: str | os.PathLike,
          netns: object | None = None, name: str | None = None,
          registry: ProcessRegistry | None = None) -> ManagedProcess:
    """Start ``argv`` (inside ``netns`` via ``ip netns exec`` if given) in a new session.

    stdout+stderr are appended to ``log_path``; the process is registered in ``registry``
    (default :data:`REGISTRY`) so test teardown stops it.
    """
    if shutil.which(str(argv[0])) is None and not os.path.exists(str(argv[0])):
        raise FileNotFoundError(errno.ENOENT, f"program not found: {argv[0]}")
    proc = ManagedProcess(argv, cwd=cwd, env=env, log_path=log_path, netns=netns, name=name)
    return (registry or REGISTRY).add(proc)
