"""Registration refresh with a scripted registrar (a fake user agent, shortened times)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.registration import Registration
from sipmesh.sip.headers import Address
from sipmesh.sip.message import Headers, Response
from sipmesh.sip.uri import parse_sip_uri
from tests.lab import wait_for_async


def response(status: int, **headers: str) -> Response:
    h = Headers()
    h.add("CSeq", "1 REGISTER")
    for name, value in headers.items():
        h.add(name.replace("_", "-"), value)
    return Response(headers=h, status=status, reason="x")


class FakeUA:
    """register(expires) answers from a script; records (time, expires) of each call."""

    def __init__(self, answers: list[Response | float]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[float, int]] = []
        self.config = type("C", (), {"domain": "registrar.test"})()
        self.aor = parse_sip_uri("sip:2500@registrar.test")

    def contact(self) -> Address:
        return Address(parse_sip_uri("sip:2500@10.0.0.1:5060"))

    def server_failed(self, server: str, failed: bool = True) -> None:
        """What the registration tells the UA of its server (UserAgent.server_failed)."""
        self.failed = (server, failed)

    async def register(self, expires: int) -> Response:
        self.calls.append((time.monotonic(), expires))
        answer = self.answers.pop(0) if self.answers else response(200, Expires=str(expires))
        if isinstance(answer, float):  # no answer at all
            await asyncio.sleep(answer)
            raise AssertionError("should have timed out")
        return answer


async def test_refresh_at_half_the_granted_time_then_halving_with_a_floor():
    ua = FakeUA([response(200, Contact="<sip:2500@10.0.0.1:5060>;expires=1"),  # granted 1 s
                 response(503), response(503), response(503), response(200, Expires="1")])
    reg = Registration(ua, expires=3600, min_retry=0.1)  # type: ignore[arg-type]
    await reg.register()
    assert reg.granted == 1 and reg.interval == 0.5
    reg.start_refresh()
    # the four scripted refreshes (0.5 + 0.25 + 0.125 + 0.1 s), then the next is 0.5 s away
    await wait_for_async(lambda: len(ua.calls) == 5, 1.4, what="four refreshes")
    await reg.unregister()
    times = [t for t, _ in ua.calls]
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:])]
    # 0.5 (half of 1 s), then failures: 0.25, 0.125 -> floor 0.1, then success again
    assert gaps[:4] == pytest.approx([0.5, 0.25, 0.125, 0.1], abs=0.05), gaps
    assert [e for _, e in ua.calls][:5] == [3600] * 5 and ua.calls[-1][1] == 0  # unregister


async def test_state_for_status_and_the_server_marked_failing_then_live_again():
    """describe() is what `sipmesh status` shows per server; a 503 makes the UA try its
    other servers first for new requests, the next acceptance puts this one back."""
    ua = FakeUA([response(503), response(200, Expires="60")])
    reg = Registration(ua, expires=60, min_retry=0.1)  # type: ignore[arg-type]
    before = time.time()
    await reg.register(keep_trying=True)
    state = reg.describe()
    assert state["state"] == "failing" and state["error"] == "503 x"
    assert state["server"] == "registrar.test" and state["last_success"] is None
    assert ua.failed == ("registrar.test", True)
    reg.start_refresh()
    await wait_for_async(lambda: reg.state == "registered", 2, what="the retry accepted")
    state = reg.describe()
    assert state["expires"] == 60 and state["error"] is None
    assert before <= state["last_success"] <= time.time() < state["next_try"]
    assert ua.failed == ("registrar.test", False)
    await reg.unregister()
    assert reg.describe()["next_try"] is None


async def test_interval_too_brief_is_retried_with_min_expires():
    ua = FakeUA([response(423, Min_Expires="120"), response(200, Expires="120")])
    reg = Registration(ua, expires=30)  # type: ignore[arg-type]
    await reg.register()
    assert [e for _, e in ua.calls] == [30, 120] and reg.granted == 120 and reg.interval == 60


@pytest.mark.parametrize("answer,code", [(response(401), Exit.AUTH), (response(403), Exit.AUTH),
                                         (response(503), Exit.UNREACHABLE),
                                         (response(500), Exit.FAILURE), (5.0, Exit.UNREACHABLE)])
async def test_first_registration_failures_are_explained(answer, code):
    reg = Registration(FakeUA([answer]), timeout=0.2)  # type: ignore[arg-type]
    with pytest.raises(AgentError) as info:
        await reg.register()
    assert info.value.code == code and "registrar.test" in str(info.value)


async def test_unregister_does_not_wait_long_for_a_dead_server():
    ua = FakeUA([response(200, Expires="3600"), 30.0])
    reg = Registration(ua, timeout=0.3)  # type: ignore[arg-type]
    await reg.register()
    t0 = time.monotonic()
    await reg.unregister()  # logged, not raised
    assert time.monotonic() - t0 < 1


class UnreachableUA(FakeUA):
    """A UA whose transport fails at once (e.g. stopped under a running refresh)."""

    async def register(self, expires: int) -> Response:
        self.calls.append((time.monotonic(), expires))
        await asyncio.sleep(0)
        raise OSError("no TCP listener to send from")


async def test_a_refresh_loop_failing_at_once_still_stops_when_cancelled():
    """Cancelling a refresh that fails in the same loop pass must end it (asyncio.wait_for
    in 3.11 let such a cancellation slip, and the loop ran on forever)."""
    for attempt in range(40):
        reg = Registration(UnreachableUA([]), min_retry=0.0)  # type: ignore[arg-type]
        reg.interval = 0.0
        reg.start_refresh()
        for _ in range(attempt % 7):
            await asyncio.sleep(0)
        await asyncio.wait_for(reg.unregister(), 2)
