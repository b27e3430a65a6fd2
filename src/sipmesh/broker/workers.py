"""Running the broker: one worker in the foreground, or several sharing the work.

Several workers are forked processes bound to the same addresses with SO_REUSEPORT,
sharing the SQLite location store and the nonce secret. By default the kernel picks
a worker by source address, so one busy client (or everyone behind one NAT) would
keep a single worker busy; a classic BPF program on the group makes the pick random
per datagram instead (`spread_randomly`). The messages of one call must still meet
in one worker, so each worker hands a datagram to its owner over loopback UDP before
parsing it:

* a request goes to worker crc32(Call-ID) % N, so all requests of a call (INVITE,
  its retransmissions, CANCEL, ACK) meet the same transactions; REGISTER stays where
  it landed, since it is answered without a transaction;
* a response goes to the worker named in our branch of its top Via, the one holding
  the client transaction.

TCP and TLS connections stay with the worker that accepted or opened them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import logging
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, replace

from sipmesh.broker.board import Board
from sipmesh.broker.location import LocationService
from sipmesh.broker.operations import WorkerOperations
from sipmesh.broker.proxy import BRANCH_PREFIX
from sipmesh.broker.server import Broker, BrokerConfig, free_port_pair
from sipmesh.sip.transport.base import Flow

log = logging.getLogger("sipmesh.broker.workers")

_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_OUR_BRANCH = re.compile(rb"^(?:via|v)[ \t]*:[^\r\n]*?branch=" + re.escape(BRANCH_PREFIX.encode()) + rb"(\d+)\.",
                         re.IGNORECASE | re.MULTILINE)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_PR_SET_PDEATHSIG = 1
IPC_BUFFER = 4 * 1024 * 1024
# A worker that dies is restarted after a pause that doubles with each death in the
# window (the first at once); more deaths than this in the window stop the broker.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
RESTART_FIRST_PAUSE = 0.5
RESTART_MAX_PAUSE = 10.0


def owner_of(data: bytes, workers: int) -> int | None:
    """The worker that must handle this datagram, None if any may."""
    if data.startswith(b"SIP/"):
        m = _OUR_BRANCH.search(data)
        return int(m.group(1)) if m else None
    if data.startswith(b"REGISTER "):
        return None  # answered statelessly, retransmissions included (see registrar.py)
    m = _CALL_ID.search(data)
    if m is None:
        return None
    return zlib.crc32(m.group(1)) % workers


@dataclass
class Ipc:
    """This worker's loopback socket and every worker's address (index = worker)."""

    sock: socket.socket
    peers: list[tuple[str, int]]


class Steering:
    """Installed on a worker's transport layer: hands datagrams to their owner."""

    def __init__(self, broker: Broker, ipc: Ipc) -> None:
        self.broker = broker
        self.ipc = ipc
        self.workers = len(ipc.peers)
        self.handed_over = 0
        self.dropped = 0

    def install(self) -> None:
        assert self.broker.transport is not None
        self.ipc.sock.setblocking(False)
        self.broker.steer = self.filter
        asyncio.get_running_loop().add_reader(self.ipc.sock.fileno(), self._readable)

    def uninstall(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.ipc.sock.fileno())
        except (RuntimeError, ValueError):
            pass

    def filter(self, data: bytes, flow: Flow) -> bool:
        owner = owner_of(data, self.workers)
        if owner is None or owner == self.broker.worker or owner >= self.workers:
            return False
        header = f"{flow.host} {flow.port}\n".encode()
        try:
            self.ipc.sock.sendto(header + data, self.ipc.peers[owner])
            self.handed_over += 1
        except OSError:
            self.dropped += 1  # like a lost datagram: the sender retransmits
        return True

    def _readable(self) -> None:
        assert self.broker.transport is not None
        for _ in range(64):
            try:
                packet = self.ipc.sock.recv(70_000)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("worker channel: %s", exc)
                return
            header, _, data = packet.partition(b"\n")
            try:
                host, port = header.decode().rsplit(" ", 1)
                flow = Flow("UDP", host, int(port))
            except ValueError:
                continue
            self.broker.receive_handed_over(data, flow)


# SO_ATTACH_REUSEPORT_CBPF: a classic BPF program choosing the socket of the group.
_SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16
_SKF_AD_RANDOM = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def spread_randomly(sock: socket.socket, workers: int) -> bool:
    """Make the kernel pick a random socket of `sock`'s SO_REUSEPORT group for each
    datagram (instead of one per source address). False if the kernel refuses."""
    program = (_SockFilter * 3)(_SockFilter(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM),
                                _SockFilter(_BPF_ALU_MOD_K, 0, 0, workers),
                                _SockFilter(_BPF_RET_A, 0, 0, 0))
    fprog = _SockFprog(3, program)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as exc:
        log.warning("cannot spread UDP over the workers at random (%s): one client will keep "
                    "one worker busy", exc)
        return False
    return True


def startup_hint(exc: OSError) -> str:
    """What to do about a failure to bind."""
    if exc.errno == errno.EADDRINUSE:
        return ": another SIP server uses that port; stop it or choose another with --listen HOST:PORT"
    if exc.errno == errno.EACCES:
        return ": ports below 1024 need root; use --listen HOST:PORT with a higher port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return ": that address is not on this host; use 0.0.0.0 or one of its addresses"
    return ""


def choose_loop(name: str = "auto") -> str:
    """'uvloop' if asked for or (auto) installed, else 'asyncio'."""
    if name == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if name == "uvloop":
            raise RuntimeError("uvloop is not installed: pip install 'sipmesh[fast]', "
                               "or use --loop asyncio") from None
        return "asyncio"
    return "uvloop"


def _run(coro, loop: str) -> int:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def _serve_one(config: BrokerConfig, worker: int, ipc: Ipc | None, board: Board) -> int:
    broker = Broker(config, worker=worker, reuse_port=config.workers > 1)
    # A stop signal that arrives while the worker is still starting must stop it too.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the fork
    await broker.start()
    # A worker makes many short-lived objects and few long-lived ones: collect the young
    # generation less often, and never scan what was built at start-up (~7% less CPU).
    gc.freeze()
    gc.set_threshold(10_000, 20, 50)
    collector = asyncio.ensure_future(_collect_young())
    steering = None
    if ipc is not None:
        steering = Steering(broker, ipc)
        steering.install()
        assert broker.transport is not None
        for sock in broker.transport.udp_sockets():
            spread_randomly(sock, config.workers)
    operations = WorkerOperations(broker, board)  # ops: board, SIGHUP, readiness, listeners
    try:
        await operations.start()
        await stop.wait()
    finally:
        await operations.stop()
        collector.cancel()
        if steering is not None:
            steering.uninstall()
        await broker.stop()
    if worker == 0:
        log.info("broker stopped")
    return 0


async def _collect_young(every: float = 0.1, full_every: float = 600.0) -> None:
    """Keep the cyclic garbage collector's pauses short under load.

    A proxy keeps every transaction for up to 32 s (Timers J, L, M), so at a thousand
    calls a second a worker holds millions of objects that the collector would scan
    again and again: 100-170 ms for a middle-generation pass, over a second for a full
    one, long enough for SIP retransmissions. They never turn out to be garbage (no
    pass collected anything), because a finished transaction is freed by reference
    counting. So every `every` seconds the young objects are collected (that catches
    the cycles they form) and the survivors frozen, out of the collector's view; every
    `full_every` seconds everything is unfrozen for one full pass, which reclaims any
    cycle among old objects, and frozen again."""
    loop = asyncio.get_running_loop()
    next_full = loop.time() + full_every
    while True:
        await asyncio.sleep(every)
        if loop.time() >= next_full:
            next_full = loop.time() + full_every
            gc.unfreeze()
            gc.collect()
        else:
            gc.collect(1)
        gc.freeze()


def _concrete_ports(config: BrokerConfig) -> BrokerConfig:
    """Workers must bind the same port: pick free ones for port 0 before forking."""
    return replace(config, listen=[(host, port or free_port_pair(host)) for host, port in config.listen])


def serve(config: BrokerConfig, *, loop: str = "auto") -> int:
    """Run the broker in the foreground until SIGINT/SIGTERM; returns the exit status.
    (`sipmesh broker` checks its configuration with preflight.check first.)"""
    loop = choose_loop(loop)
    board = Board(config.workers)  # ops: what workers post for the operator, readiness
    if config.workers == 1:
        return _run(_serve_one(config, 0, None, board), loop)
    return _Supervisor(config, loop, board).run()


class _Supervisor:
    def __init__(self, config: BrokerConfig, loop: str, board: Board) -> None:
        if config.nonce_secret is None:
            config = replace(config, nonce_secret=os.urandom(32))
        self.config = _concrete_ports(config)
        self.loop = loop
        self.children: dict[int, int] = {}  # pid -> worker
        self.stopping = False
        self.ipc: list[socket.socket] = []
        self.board = board
        self.deaths: deque[float] = deque()  # when workers died, within RESTART_WINDOW
        self.restarts: list[tuple[float, int]] = []  # (when, worker) restarts waiting for their pause

    def run(self) -> int:
        LocationService(self.config.database).close()  # create the schema once, before the workers
        for _ in range(self.config.workers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, IPC_BUFFER)
            s.bind(("127.0.0.1", 0))
            self.ipc.append(s)
        peers = [s.getsockname()[:2] for s in self.ipc]
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.board.supervise(self.children)  # ops: SIGUSR1 (a worker is ready), SIGHUP (reload)
        log.info("starting %d workers (%s event loop)", self.config.workers, self.loop)
        for worker in range(self.config.workers):
            self._fork(worker, peers)
        status = 0
        while self.children or (self.restarts and not self.stopping):
            self._start_due(peers)
            try:
                reaped = self._reap()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if reaped is None:
                continue
            pid, wstatus = reaped
            worker = self.children.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(wstatus)
            if self.stopping:
                continue
            if code == 3:  # could not start (bad address, port in use): restarting will not help
                log.error("worker %d could not start: stopping", worker)
                status = 1
                self._stop_all()
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"died with status {code}"
            pause = self._pause_after_death()
            if pause is None:
                log.error("worker %d (pid %d) %s; %d worker deaths within %g s: giving up, "
                          "stopping the broker", worker, pid, how, len(self.deaths), RESTART_WINDOW)
                status = 1
                self._stop_all()
                continue
            log.error("worker %d (pid %d) %s: restarting it%s", worker, pid, how,
                      f" in {pause:g} s" if pause else "")
            self.restarts.append((time.monotonic() + pause, worker))
        return status

    def _pause_after_death(self) -> float | None:
        """How long to wait before restarting a worker that just died; None: give up."""
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - RESTART_WINDOW:
            self.deaths.popleft()
        earlier = len(self.deaths) - 1
        if earlier >= RESTART_LIMIT:
            return None
        return 0.0 if earlier == 0 else min(RESTART_FIRST_PAUSE * 2 ** (earlier - 1), RESTART_MAX_PAUSE)

    def _start_due(self, peers: list[tuple[str, int]]) -> None:
        now = time.monotonic()
        for due, worker in sorted(self.restarts):
            if due <= now and not self.stopping:
                self.restarts.remove((due, worker))
                self._fork(worker, peers)

    def _reap(self) -> tuple[int, int] | None:
        """The next worker that exits; None when a restart is due first."""
        if not self.restarts or self.stopping:
            return os.wait()
        deadline = min(due for due, _ in self.restarts)
        while time.monotonic() < deadline and not self.stopping:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # every worker is waiting for its restart
                pid, wstatus = 0, 0
            if pid:
                return pid, wstatus
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return None

    def _fork(self, worker: int, peers: list[tuple[str, int]]) -> None:
        parent = os.getpid()
        # The child keeps stop signals pending until its event loop handles them: one
        # that arrives while it starts would otherwise kill it before it can stop cleanly.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.children[pid] = worker
            return
        code = 1
        try:
            _die_with_parent(parent)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for i, s in enumerate(self.ipc):
                if i != worker:
                    s.close()
            code = _run(_serve_one(self.config, worker, Ipc(self.ipc[worker], peers), self.board), self.loop)
        except OSError as exc:
            log.error("worker %d cannot start: %s%s", worker, exc, startup_hint(exc))
            code = 3
        except (ValueError, sqlite3.Error, RuntimeError) as exc:  # what it read changed since the start
            log.error("worker %d failed: %s", worker, exc)
        except BaseException:
            log.exception("worker %d failed", worker)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_all()

    def _stop_all(self) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _die_with_parent(parent: int) -> None:
    """Linux: a worker gets SIGKILL when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
