"""Callers follow redirects (RFC 3261 §8.1.3.4): a 3xx's Contacts are tried in q order,
each once, at most MAX_REDIRECTS in all; a loop or a hostile Contact list ends with a
clear error. Our UA against scripted raw UDP peers, and `sipmesh call` / `serve` as real
processes with our broker in redirect mode."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import pytest

from sipmesh.sip.message import Request
from sipmesh.sip.ua import CallFailed
from sipmesh.sip.ua.redirect import MAX_REDIRECTS
from tests.lab import free_port, wait_for
from tests.lab.agents import agent_argv, agents, app_argv, record, wait_exit, wait_ready  # noqa: F401
from tests.lab.broker import BrokerServer
from tests.peers.helpers import Callee, make_ua, sdp  # noqa: F401
from tests.peers.raw import RawPeer

Answer = Callable[[Request], tuple[int, list[tuple[str, str]]]]


async def answer_requests(peer: RawPeer, answer: Answer, seen: list[Request]) -> None:
    """Answer each INVITE/OPTIONS `peer` gets as `answer` says (status, headers); ACKs
    are recorded and dropped. Runs until cancelled."""
    while True:
        message, addr = await peer.recv(30)
        if not isinstance(message, Request) or message.method == "ACK":
            continue
        seen.append(message)
        status, headers = answer(message)
        peer.reply(message, status, to_tag="t1", headers=headers, addr=addr)


def redirect_to(*contacts: str) -> Answer:
    return lambda _request: (302, [("Contact", contact) for contact in contacts])


@pytest.fixture
async def scripted(raw_peers):
    """`await scripted(answer)`: a raw peer answering requests as `answer` says, and the
    list of requests it got."""
    tasks = []

    async def make(answer: Answer | None = None) -> tuple[RawPeer, list[Request]]:
        peer, seen = await raw_peers(), []
        peer.answer = answer
        tasks.append(asyncio.ensure_future(answer_requests(
            peer, lambda request: peer.answer(request), seen)))
        return peer, seen

    yield make
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_contacts_of_a_302_are_tried_in_q_order_until_one_answers(make_ua, scripted):
    callee = Callee()
    bob = await make_ua("bob", on_invite=callee)
    low, low_seen = await scripted(lambda _r: (486, []))
    high, high_seen = await scripted(lambda _r: (404, []))
    front, front_seen = await scripted(redirect_to(
        f"<sip:low@{low.hostport}>;q=0.2",
        f"<sip:high@{high.hostport}>;q=0.9",
        f"<sip:bob@127.0.0.1:{bob.config.listen_port}>;q=0.5",
        "<tel:+15551234>", "<http://example.com/>"))
    alice = await make_ua("alice")
    call = await alice.invite(f"sip:someone@{front.hostport}", sdp("alice"))
    assert [r.uri.user for r in front_seen + high_seen] == ["someone", "high"]
    assert low_seen == []  # bob (q=0.5) answered before low (q=0.2) was needed
    assert callee.incoming and call.dialog.remote_target.host == "127.0.0.1"
    invite = callee.incoming[0].request
    assert invite.call_id == front_seen[0].call_id and invite.cseq[0] > front_seen[0].cseq[0]
    await call.bye()


async def test_a_redirect_loop_is_a_clear_error(make_ua, scripted):
    a, a_seen = await scripted()
    b, b_seen = await scripted(redirect_to(f"<sip:x@{a.hostport}>"))
    a.answer = redirect_to(f"<sip:y@{b.hostport}>")
    alice = await make_ua("alice")
    with pytest.raises(CallFailed) as failed:
        await alice.invite(f"sip:x@{a.hostport}", sdp("alice"))
    assert failed.value.status == 482
    assert failed.value.reason == (f"redirect loop: sip:x@{a.hostport} \u2192 sip:y@{b.hostport}"
                                   f" \u2192 sip:x@{a.hostport}")
    assert len(a_seen) == 1 and len(b_seen) == 1  # each target tried once


async def test_a_302_with_50_contacts_is_capped(make_ua, scripted):
    sink, sink_seen = await scripted(lambda _r: (404, []))
    contacts = [f"<sip:u{i}@{sink.hostport}>;q=0.{i % 10}" for i in range(50)]
    front, _ = await scripted(redirect_to(*contacts))
    alice = await make_ua("alice")
    with pytest.raises(CallFailed) as failed:
        await alice.invite(f"sip:x@{front.hostport}", sdp("alice"))
    assert failed.value.status == 404  # the answer of the last target tried
    assert len(sink_seen) == MAX_REDIRECTS
    # only the first 10 Contacts count, best q first: u9, u8, ... u5
    assert [r.uri.user for r in sink_seen] == ["u9", "u8", "u7", "u6", "u5"]


async def test_redirects_chain_up_to_the_bound(make_ua, scripted):
    hops = [await scripted() for _ in range(MAX_REDIRECTS + 2)]
    for (peer, _), (following, _) in zip(hops, hops[1:]):
        peer.answer = redirect_to(f"<sip:n@{following.hostport}>")
    hops[-1][0].answer = lambda _r: (200, [])
    alice = await make_ua("alice")
    with pytest.raises(CallFailed) as failed:
        await alice.invite(f"sip:n@{hops[0][0].hostport}", sdp("alice"))
    assert failed.value.status == 483 and "too many redirects" in failed.value.reason
    assert [len(seen) for _, seen in hops] == [1] * (MAX_REDIRECTS + 1) + [0]


async def test_options_out_of_dialog_follows_a_redirect(make_ua, scripted):
    target, target_seen = await scripted(lambda _r: (200, []))
    front, _ = await scripted(redirect_to(f"<sip:t@{target.hostport}>"))
    alice = await make_ua("alice")
    response = await alice.request(alice.new_request("OPTIONS", alice.target_uri(
        f"sip:x@{front.hostport}")))
    assert response.status == 200 and len(target_seen) == 1


# ----------------------------------------------------------------- real processes


@pytest.mark.slow
def test_call_through_a_redirect_broker_reaches_the_target(agents, tmp_path):
    broker = BrokerServer(tmp_path / "broker", extra=["--mode", "redirect"])
    try:
        serve = agents(agent_argv("serve", broker.hostport, "2500", "--app-port",
                                  str(free_port()), program=app_argv(tmp_path, "run")),
                       name="serve")
        wait_ready(serve)
        call = agents(agent_argv("call", broker.hostport, "2501", target="2500",
                                 program=app_argv(tmp_path, "run")), name="call")
        wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 15,
                 what="session up through the redirect", abort=call.exit_reason)
        assert "302 Moved Temporarily: trying sip:2500@127.0.0.1:" in call.log_text()
    finally:
        broker.stop()


@pytest.mark.slow
def test_sipmesh_call_into_a_redirect_loop_exits_with_the_loop(agents, tmp_path):
    a, b = RawPeer(), RawPeer()
    stop = threading.Event()

    def bounce(peer: RawPeer, other: RawPeer, user: str, deadline: float = 20.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end and not stop.is_set():
            got = peer.recv_blocking(0.2)
            if got is None or not isinstance(got[0], Request) or got[0].method == "ACK":
                continue
            peer.reply(got[0], 302, to_tag="r", addr=got[1],
                       headers=[("Contact", f"<sip:{user}@{other.hostport}>")])

    threads = [threading.Thread(target=bounce, args=(a, b, "y"), daemon=True),
               threading.Thread(target=bounce, args=(b, a, "x"), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        call = agents(agent_argv("call", a.hostport, "2501", "--no-register",
                                 target=f"sip:x@{a.hostport}", program=["/bin/true"]),
                      name="call")
        assert wait_exit(call) == 9, call.log_text()
        assert (f"redirect loop: sip:x@{a.hostport} \u2192 sip:y@{b.hostport} \u2192 "
                f"sip:x@{a.hostport}") in call.log_text()
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        a.close()
        b.close()
