"""Shared pieces of tests/test_useragent.py and tests/test_interop.py.

* `FAST` timer values (T1 = 10 ms) so that Timer B, 2xx retransmission and friends take
  well under a second;
* `Callee`, an `on_invite` handler that records what happened (ring, accept, reject, or
  ring until cancelled);
* `no_errors_logged`, a fixture failing a test whose stack logged an error;
* `make_ua`, a fixture: `await make_ua(user, **config)` starts a UA (`start_ua`), stopped
  after the test; `ua_fixture(**defaults)` makes one with other defaults.

The raw UDP peer is in tests/peers/raw.py, the bounded poll in sipmesh/lab/waiting.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.ua import Call, CallFailed, IncomingCall, UAConfig, UserAgent
from sipmesh.lab.procs import free_port

FAST = TimerValues(t1=0.01, t2=0.04, t4=0.05)


def sdp(user: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    ip = "IP6" if ":" in host else "IP4"
    return (f"v=0\r\no={user} 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {host}\r\nt=0 0\r\n"
            f"m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n{extra}").encode()


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


def ua_fixture(**defaults):
    """A `make_ua` fixture: `await make_ua(user, **config)` starts a UA (`start_ua`, with
    `defaults` under `config`), stopped after the test."""

    @pytest.fixture
    async def make_ua():
        started = []

        async def _make(user: str, **kwargs):
            ua = await start_ua(user, **{**defaults, **kwargs})
            started.append(ua)
            return ua

        yield _make
        for ua in reversed(started):
            await ua.stop()

    return make_ua


make_ua = ua_fixture()


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
