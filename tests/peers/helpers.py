"""Shared pieces of tests/test_useragent.py and tests/test_interop.py.

* `FAST` timer values (T1 = 10 ms) so that Timer B, 2xx retransmission and friends take
  well under a second;
* `Callee`, an `on_invite` handler that records what happened (ring, accept, reject, or
  ring until cancelled);
* `RawPeer`, a UDP socket on loopback the test scripts byte by byte, to send exactly
  what a test needs (no ACK, a retransmitted 2xx, a wrong Via) and see exactly what came;
* `eventually`, a bounded poll.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
from sipmesh.sip.message import Request, Response, parse_message
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.ua import Call, CallFailed, IncomingCall, UAConfig, UserAgent
from tests.lab.procs import free_port

FAST = TimerValues(t1=0.01, t2=0.04, t4=0.05)


def sdp(user: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    ip = "IP6" if ":" in host else "IP4"
    return (f"v=0\r\no={user} 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {host}\r\nt=0 0\r\n"
            f"m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n{extra}").encode()


async def eventually(predicate: Callable[[], object], timeout: float = 3.0,
                     what: str = "condition") -> object:
    """Poll `predicate` every 10 ms until truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def start_ua(user: str, *, on_invite=None, host: str = "127.0.0.1", domain: str | None = None,
                   timers: TimerValues = FAST, **config) -> UserAgent:
    """A started UserAgent on a free port of `host` (UDP and TCP share it)."""
    if domain is None:
        domain = f"[{host}]" if ":" in host else host
    cfg = UAConfig(user=user, domain=domain,
                   listen_host=host, listen_port=free_port("both", host), timers=timers, **config)
    ua = UserAgent(cfg, on_invite)
    await ua.start()
    return ua


@dataclass
class Callee:
    """An on_invite handler. mode: 'accept' (default), 'reject' (with `status`), or
    'ring' (send 180 and wait until the caller cancels, at most `hold` seconds).
    With `hangup_after`, an accepted call is ended by the callee after that many seconds."""

    mode: str = "accept"
    status: int = 486
    ring: bool = True
    answer: bytes = field(default_factory=lambda: sdp("callee"))
    hold: float = 10.0
    hangup_after: float | None = None
    incoming: list[IncomingCall] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    failures: list[CallFailed] = field(default_factory=list)

    async def __call__(self, incoming: IncomingCall) -> None:
        self.incoming.append(incoming)
        if self.ring:
            incoming.ringing()
        if self.mode == "reject":
            incoming.reject(self.status)
            return
        if self.mode == "ring":
            try:
                await asyncio.wait_for(incoming.cancelled.wait(), self.hold)
            except asyncio.TimeoutError:
                incoming.reject(480)
                return
        try:
            call = await incoming.accept(self.answer)
        except CallFailed as exc:
            self.failures.append(exc)
            raise
        self.calls.append(call)
        if self.hangup_after is not None:
            try:
                await asyncio.wait_for(asyncio.shield(call.ended), self.hangup_after)
            except asyncio.TimeoutError:
                await call.bye()
        self.ended.append(await asyncio.wait_for(call.ended, 60))


class RawPeer(asyncio.DatagramProtocol):
    """A UDP socket on loopback driven by the test: sends bytes, queues what arrives."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.inbox: asyncio.Queue[tuple[Request | Response, bytes, tuple]] = asyncio.Queue()
        self.log: list[tuple[float, Request | Response]] = []

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> "RawPeer":
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        return peer

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        message = parse_message(data)
        self.log.append((time.monotonic(), message))
        self.inbox.put_nowait((message, data, addr))

    @property
    def host(self) -> str:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[0]

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def send(self, data: bytes | str | Request | Response, addr: tuple) -> None:
        assert self.transport is not None
        if isinstance(data, (Request, Response)):
            data = data.to_bytes()
        elif isinstance(data, str):
            data = data.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        self.transport.sendto(data, addr)

    async def recv(self, timeout: float = 2.0) -> tuple[Request | Response, tuple]:
        message, _, addr = await asyncio.wait_for(self.inbox.get(), timeout)
        return message, addr

    async def expect(self, predicate: Callable[[Request | Response], bool], timeout: float = 2.0,
                     what: str = "a message") -> tuple[Request | Response, tuple]:
        """The next message matching `predicate` (others are skipped) within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s; got {[m for _, m in self.log]}")
            try:
                message, addr = await self.recv(remaining)
            except asyncio.TimeoutError:
                continue
            if predicate(message):
                return message, addr

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def is_request(method: str) -> Callable[[Request | Response], bool]:
    return lambda m: isinstance(m, Request) and m.method == method


def is_response(status: int, method: str | None = None) -> Callable[[Request | Response], bool]:
    return lambda m: (isinstance(m, Response) and m.status == status
                      and (method is None or m.cseq[1] == method))


def raw_request(method: str, uri: str, peer: RawPeer, *, call_id: str, cseq: int = 1,
                from_tag: str = "rawtag", to: str | None = None, to_tag: str | None = None,
                branch: str | None = None, via_port: int | None = None, rport: bool = True,
                contact: bool = True, extra: str = "", body: bytes = b"") -> bytes:
    """A request as bytes, from `peer` (its address in Via and Contact)."""
    branch = branch or f"z9hG4bKraw{next(RawPeer._ids)}x{time.monotonic_ns()}"
    host = f"[{peer.host}]" if ":" in peer.host else peer.host
    via = f"SIP/2.0/UDP {host}:{via_port or peer.port};branch={branch}{';rport' if rport else ''}"
    to_value = f"<{to or uri}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70",
             f"From: <sip:raw@{host}:{peer.port}>;tag={from_tag}", f"To: {to_value}",
             f"Call-ID: {call_id}", f"CSeq: {cseq} {method}"]
    if contact:
        lines.append(f"Contact: <sip:raw@{host}:{peer.port}>")
    if extra:
        lines.extend(extra.strip().splitlines())
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def unexpected_errors(records: list[logging.LogRecord]) -> list[str]:
    """ERROR records of the stack or of asyncio (exceptions in callbacks and tasks)."""
    return [f"{r.name}: {r.getMessage()}" + (f" ({r.exc_info[1]!r})" if r.exc_info else "")
            for r in records if r.levelno >= logging.ERROR]


@pytest.fixture(autouse=True)
def no_errors_logged(caplog):
    """Fail a test whose stack or event loop logged an error (import it into a test module)."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    errors = unexpected_errors(records)
    assert not errors, "errors were logged:\n" + "\n".join(errors)
