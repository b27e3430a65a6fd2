"""A host that moves: noticing that our address changed, and following it.

A new DHCP lease, Wi-Fi to mobile, a laptop plugged into another router: our address
towards the SIP server changes, or the address the server sees us as (our NAT's), or both.
Two sources tell us:

- the kernel (netlink, stdlib ``AF_NETLINK``): a message on RTMGRP_IPV4_IFADDR or
  RTMGRP_IPV4_ROUTE whenever an address or a route comes or goes. Changes come in bursts
  (address removed, route removed, address added, route added), so a check waits for
  ``DEBOUNCE`` s of quiet after the last message, never more than ``MAX_DELAY`` s after the
  first; the check asks the kernel for our address towards the SIP server again;
- the SIP server's STUN (sip/transport/stun.py, the keep-alive's Binding request on our SIP
  port), every ``STUN_INTERVAL`` s: the address it sees changes when a NAT in front of us
  changed while our own address did not (a router rebooted with a new WAN lease).

`MoveDetector` is the decision, without I/O (tested in tests/test_mobility.py): it says
when to look and whether what it sees is a move. `Mobility` is the thin I/O around it,
for an Endpoint (agent/endpoint.py): on a move it calls ``endpoint.moved()``, which
re-registers at every server (the stale Contact removed), and then each running session's
``restart_path()`` (agent/sessionpath.py): a re-INVITE with an ICE restart (new ufrag and pwd,
RFC 8445 §9) through the session's own path code, whose new path is handed to the running
program (WireGuard: ``wg set``, wireguard-go keeps running; OpenVPN talks to the agent's
local end on 127.0.0.1, agent/handover.py, whose far side moves to the new path; a
forward's QUIC connection goes on over the new pair, agent/streams.py, its TCP connections
with it).

The bound (docs/sessions.md, "Mobility"): the kernel's message + DEBOUNCE + one REGISTER
round trip until callers reach us by name again; + gathering and ICE checks (about a
second on a LAN, a few with STUN/TURN) until the running session has its path again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

log = logging.getLogger("sipmesh.agent.mobility")

DEBOUNCE = 0.3       # s of quiet after the kernel's last message before we look
MAX_DELAY = 1.5      # s at most between the kernel's first message and our look
STUN_INTERVAL = 25.0  # s between two STUN checks of the address the server sees
# netlink (linux/rtnetlink.h): address and IPv4 route changes
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
NETLINK_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
NO_ADDRESS = ("", "127.0.0.1", "::1")   # what local_address_towards says without a route


@dataclass(frozen=True)
class Snapshot:
    """Where we are: our address towards the SIP server, and as the server sees us
    (None: not known, e.g. no STUN answer yet, or TCP)."""

    local: str
    public: tuple[str, int] | None = None

    @property
    def reachable(self) -> bool:
        return self.local not in NO_ADDRESS


@dataclass(frozen=True)
class Move:
    """We moved from `old` to `new`."""

    old: Snapshot
    new: Snapshot

    @property
    def local_changed(self) -> bool:
        return self.old.local != self.new.local

    def __str__(self) -> str:
        def show(s: Snapshot) -> str:
            return s.local + (f" (seen as {s.public[0]}:{s.public[1]})" if s.public else "")
        return f"{show(self.old)} -> {show(self.new)}"


class MoveDetector:
    """When to look at our address, and whether what we see is a move (no I/O).

    ``kernel_event(now)`` for each netlink message; ``due(now)`` says whether to look
    now (``deadline`` until when to wait); ``observe(snapshot)`` with what the look found
    returns the Move, or None. A look that finds no address (between the old lease and
    the new) is no move: the next message brings the next look. A public address that
    is not known (None) never counts as a change."""

    def __init__(self, initial: Snapshot, *, debounce: float = DEBOUNCE,
                 max_delay: float = MAX_DELAY) -> None:
        self.current = initial
        self.debounce = debounce
        self.max_delay = max_delay
        self._first: float | None = None   # the first message not yet looked at
        self._last: float | None = None

    def kernel_event(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    @property
    def deadline(self) -> float | None:
        """When to look (None: nothing pending)."""
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.debounce, self._first + self.max_delay)

    def due(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    def observe(self, seen: Snapshot) -> Move | None:
        """What a look found (it clears the pending messages)."""
        self._first = self._last = None
        if not seen.reachable:
            return None
        public = seen.public if seen.public is not None else (
            self.current.public if seen.local == self.current.local else None)
        seen = Snapshot(seen.local, public)
        old = self.current
        if seen.local == old.local and (seen.public is None or old.public is None
                                         or seen.public == old.public):
            self.current = Snapshot(old.local, seen.public or old.public)
            return None
        self.current = seen
        return Move(old, seen)


def netlink_socket(groups: int = NETLINK_GROUPS) -> socket.socket | None:
    """A non-blocking NETLINK_ROUTE socket subscribed to `groups`; None where there is
    no netlink (not Linux) -- the STUN check is then the only source."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except (AttributeError, OSError) as exc:
        log.info("no netlink here (%s): address changes are noticed by STUN only", exc)
        return None
    try:
        sock.bind((0, groups))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.info("cannot subscribe to netlink (%s): STUN only", exc)
        return None
    return sock


Look = Callable[[], Awaitable[Snapshot]]
OnMove = Callable[[Move], Awaitable[None]]


class Mobility:
    """Watch for moves (see the module doc) and call `on_move` for each, one at a time.

    `look` finds where we are now (our address towards the server; `stun`, when given,
    the address the server sees: called every `stun_interval` s)."""

    def __init__(self, look: Look, on_move: OnMove, *,
                 stun: Callable[[], Awaitable[tuple[str, int] | None]] | None = None,
                 stun_interval: float = STUN_INTERVAL, debounce: float = DEBOUNCE) -> None:
        self.look = look
        self.on_move = on_move
        self.stun = stun
        self.stun_interval = stun_interval
        self.debounce = debounce
        self.detector: MoveDetector | None = None
        self.moves = 0
        self.last_move: float | None = None   # time.time() of the last one
        self._sock: socket.socket | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.detector = MoveDetector(await self.look(), debounce=self.debounce)
        self._sock = netlink_socket()
        if self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
        self._task = asyncio.ensure_future(self._run())

    def _readable(self) -> None:
        assert self._sock is not None and self.detector is not None
        got = False
        for _ in range(64):   # bounded: a flood of messages is read on the next turn
            try:
                if not self._sock.recv(65536):
                    break
                got = True
            except BlockingIOError:
                break
            except OSError as exc:   # ENOBUFS: we missed some; look anyway
                log.debug("netlink: %s", exc)
                got = True
                break
        if got:
            self.detector.kernel_event(time.monotonic())
            self._wake.set()

    async def _run(self) -> None:
        assert self.detector is not None
        next_stun = time.monotonic() + self.stun_interval
        while True:
            now = time.monotonic()
            deadline = self.detector.deadline
            wake_at = min(deadline if deadline is not None else next_stun, next_stun) \
                if self.stun is not None else deadline
            self._wake.clear()
            try:
                async with asyncio.timeout(None if wake_at is None else max(0.0, wake_at - now)):
                    await self._wake.wait()
                continue   # a message: the deadline moved
            except TimeoutError:
                pass
            now = time.monotonic()
            seen: Snapshot | None = None
            if self.detector.due(now):
                seen = await self.look()
            if self.stun is not None and now >= next_stun:
                next_stun = now + self.stun_interval
                public = await self.stun()
                seen = Snapshot(seen.local if seen else (await self.look()).local, public)
            if seen is None:
                continue
            move = self.detector.observe(seen)
            if move is None:
                continue
            log.info("we moved: %s", move)
            self.moves += 1
            self.last_move = time.time()
            try:
                await self.on_move(move)
            except Exception:   # the next move must still be followed
                log.exception("following the move failed")

    async def close(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except (RuntimeError, ValueError):
                pass
            self._sock.close()
            self._sock = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
