"""A silent peer of an established call: probed with in-dialog OPTIONS, and the call ended
when it is gone (sip/ua/liveness.py, sip/ua/call.py).

The rule is tested with plain clock values; then on loopback with our UA on both sides
and raw-socket peers (T1 = 10 ms, tests/peers/helpers.FAST). The agents as processes, a
peer SIGKILLed mid-session, are in tests/test_agent.py (a peer that dies).
"""

from __future__ import annotations

import asyncio

import pytest

from sipmesh.sip.message import make_response
from sipmesh.sip.ua.liveness import Action, Liveness, check_interval
from tests.lab import wait_for_async
from tests.peers.helpers import Callee, make_ua, no_errors_logged, sdp
from tests.peers.raw import RawPeer, is_request

__all__ = ["make_ua", "no_errors_logged"]  # fixtures


# -- the rule, with a fake clock ------------------------------------------------------------

def drive(liveness: Liveness, until: float, step: float = 0.25,
          answer: float | None = None) -> list[tuple[float, Action]]:
    """Poll from 0 to `until`; each probe answered (200) after `answer` s, or never."""
    happened, answers, now = [], [], 0.0
    while now <= until:
        for when in [a for a in answers if a <= now]:
            answers.remove(when)
            liveness.answered(200, "OPTIONS", when)
        action, wake = liveness.poll(now)
        assert wake >= now
        if action is not None:
            happened.append((now, action))
            if action is Action.GONE:
                break
            if answer is not None:
                answers.append(now + answer)
        now += step
    return happened


def test_a_silent_peer_is_probed_every_interval_and_gone_after_two_unanswered():
    live = Liveness(2.0, 0.5, now=0.0)
    assert live.timeout == 4.0 and live.bound == 6.0
    assert drive(live, 60) == [(2.0, Action.PROBE), (4.0, Action.PROBE), (6.0, Action.GONE)]
    assert live.reason == "the peer stopped answering: no answer to 2 in-dialog OPTIONS in 4 s"


def test_the_default_interval_gives_a_bound_under_a_minute():
    live = Liveness(15.0, 0.5, now=0.0)
    assert live.bound == 45.0  # 15 + min(30, 64 * T1)
    assert [t for t, _ in drive(live, 120, step=0.5)] == [15.0, 30.0, 45.0]
    long = Liveness(600.0, 0.5, now=0.0)
    assert long.timeout == 32.0  # never beyond the probe's own transaction (Timer F)
    assert drive(long, 700, step=1.0) == [(600.0, Action.PROBE), (632.0, Action.GONE)]


def test_a_peer_that_answers_is_probed_only_when_silent_and_never_gone():
    live = Liveness(2.0, 0.5, now=0.0)
    happened = drive(live, 30, answer=1.5)  # slow, but within the timeout
    assert all(action is Action.PROBE for _, action in happened)
    assert [t for t, _ in happened] == [2.0 + 3.5 * i for i in range(len(happened))]
    live = Liveness(2.0, 0.5, now=0.0)
    for second in range(1, 30):  # the peer's own requests are signs of life: no probe at all
        live.alive(float(second))
        assert live.poll(second + 0.5)[0] is None


@pytest.mark.parametrize("status,gone", [(481, True), (408, True), (200, False), (405, False),
                                         (501, False), (500, False), (503, False)])
def test_which_answers_end_the_dialog(status, gone):
    live = Liveness(2.0, 0.5, now=0.0)
    assert live.poll(2.0)[0] is Action.PROBE
    assert live.answered(status, "OPTIONS", 2.1) is gone
    if gone:
        assert f"{status} to our in-dialog OPTIONS" in (live.reason or "")
        assert live.poll(2.2)[0] is Action.GONE
    elif status == 503:  # what a transport error gives: no sign of life
        assert live.unanswered == [2.0]
    else:
        assert live.unanswered == [] and live.heard == 2.1


@pytest.mark.parametrize("value,ok", [(0, True), (1, True), (15.5, True), (3600, True),
                                      (0.5, False), (-1, False), (3601, False), (True, False),
                                      ("15", False)])
def test_the_configured_interval_is_off_or_one_second_to_an_hour(value, ok):
    if ok:
        assert check_interval(value) == float(value)
    else:
        with pytest.raises(ValueError, match="0 \\(off\\) or 1..3600"):
            check_interval(value)


# -- our UA on loopback ---------------------------------------------------------------------

async def test_a_peer_that_answers_keeps_the_call_up_and_each_side_probes(make_ua):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee, peer_keepalive=0.1)
    alice = await make_ua("alice", peer_keepalive=0.1)
    call = await alice.invite(str(bob.contact().uri), sdp("alice"))
    await wait_for_async(lambda: callee.calls, 3, what="the callee's Call")
    theirs = callee.calls[0]
    start = call.dialog.local_seq, theirs.dialog.local_seq
    await asyncio.sleep(1.0)  # ten intervals; the bound is 0.1 + min(0.2, 0.64) = 0.3 s
    assert not call.ended.done() and not theirs.ended.done()
    probes = call.dialog.local_seq - start[0] + theirs.dialog.local_seq - start[1]
    assert 4 <= probes <= 22, probes  # about one OPTIONS per interval of silence
    await call.bye()
    assert await asyncio.wait_for(theirs.ended, 2) == "remote BYE"
    assert call.lost is None and theirs.lost is None


@pytest.mark.parametrize("side", ["caller", "callee"])
async def test_a_peer_that_vanishes_is_noticed_within_the_bound(make_ua, side):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee, peer_keepalive=0.1 if side == "callee" else 0)
    alice = await make_ua("alice", peer_keepalive=0.1 if side == "caller" else 0)
    call = await alice.invite(str(bob.contact().uri), sdp("alice"))
    await wait_for_async(lambda: callee.calls and callee.calls[0].acked.is_set(), 3,
                         what="the call confirmed")
    ours, gone_ua = (call, bob) if side == "caller" else (callee.calls[0], alice)
    first = ours.dialog.local_seq
    # four probes span more than the bound (0.3 s): unanswered, the call would have ended
    await wait_for_async(lambda: ours.dialog.local_seq >= first + 4, 3, what="four probes sent")
    assert not ours.ended.done()
    await gone_ua.stop()  # its sockets close: no answer, no BYE
    loop = asyncio.get_running_loop()
    started = loop.time()
    reason = await asyncio.wait_for(ours.ended, 3)
    took = loop.time() - started
    assert reason == ours.lost
    assert reason.startswith("the peer stopped answering: no answer to ")
    assert took <= 0.3 + 0.2, took  # the bound, plus scheduling slack


async def call_a_raw_peer(alice, peer: RawPeer):
    """Alice calls the raw peer, which answers 200; the Call once ACKed."""
    task = asyncio.ensure_future(alice.invite(f"sip:raw@{peer.hostport}", sdp("alice")))
    invite, addr = await peer.expect(is_request("INVITE"))
    ok = make_response(invite, 200, to_tag="raw1")
    ok.headers.add("Contact", f"<sip:raw@{peer.hostport}>")
    ok.headers.add("Content-Type", "application/sdp")
    ok.body = sdp("raw")
    peer.send(ok, addr)
    call = await asyncio.wait_for(task, 2)
    await peer.expect(is_request("ACK"))
    return call


async def test_481_to_a_probe_ends_the_call_at_once_and_sends_bye(make_ua, raw_peers):
    """A peer that restarted answers our probe 481; a BYE still goes out (best effort)."""
    peer = await raw_peers()
    call = await call_a_raw_peer(await make_ua("alice", peer_keepalive=0.1), peer)
    options, _ = await peer.expect(is_request("OPTIONS"), what="a probe")
    peer.reply(options, 481)
    reason = await asyncio.wait_for(call.ended, 2)
    assert reason == call.lost == ("the peer is gone: 481 to our in-dialog OPTIONS "
                                   "(it no longer knows the session)")
    bye, _ = await peer.expect(is_request("BYE"), what="a BYE")
    assert 'SIP ;cause=408 ;text="the peer is gone: 481' in (bye.headers.get("Reason") or "")


async def test_a_peer_answering_501_to_options_stays_up(make_ua, raw_peers):
    """Like a UA that takes no OPTIONS in dialogs: any final answer proves it is there."""
    peer = await raw_peers()
    call = await call_a_raw_peer(await make_ua("alice", peer_keepalive=0.1), peer)
    for _ in range(5):  # five intervals, each probe answered 501
        options, _ = await peer.expect(is_request("OPTIONS"), what="a probe")
        peer.reply(options, 501)
    assert not call.ended.done()
    assert call.dialog.state.name != "TERMINATED"


# -- where the interval comes from --------------------------------------------------------

@pytest.mark.parametrize("mode", ["serve", "call"])
def test_the_command_line_sets_the_interval(mode, capsys):
    from sipmesh.cli.main import build_parser
    from sipmesh.cli.serve import ua_config

    head = [mode] + (["2500"] if mode == "call" else []) + ["--server", "h", "--user", "u"]
    parser = build_parser()
    assert ua_config(parser.parse_args(head + ["--", "prog"])).peer_keepalive == 15.0
    assert ua_config(parser.parse_args(head + ["--keepalive", "2", "--", "prog"])).peer_keepalive == 2
    assert ua_config(parser.parse_args(head + ["--keepalive", "0", "--", "prog"])).peer_keepalive == 0
    with pytest.raises(SystemExit) as info:
        parser.parse_args(head + ["--keepalive", "0.5", "--", "prog"])
    assert info.value.code == 2
    assert "keepalive: must be 0 (off) or 1..3600 seconds" in capsys.readouterr().err
