"""Two Kamailio instances serving one site (issue 13 item 3): docs/kamailio/kamailio.cfg
with -A WITH_DMQ replicates the location service (dmq + dmq_usrloc). A user registered at
one instance only is reachable through the other; an instance SIGKILLed and started again
learns every binding back from its peer. Real Kamailio on 127.0.0.2 and 127.0.0.3."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from sipmesh.sip.ua import IncomingCall, UAConfig, UserAgent
from tests.lab import Kamailio, free_port, wait_for

DOCS_CFG = Path(__file__).resolve().parents[1] / "docs" / "kamailio" / "kamailio.cfg"
SDP = b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 TCP x\r\na=PORT:7001\r\n"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
SYNC_BOUND = 10.0  # s for a binding to reach the peer, and for a restarted one to re-learn

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(kamailio):
    port = free_port("both", "127.0.0.2")
    hosts = ("127.0.0.2", "127.0.0.3")

    def make(host: str, peer: str) -> Kamailio:
        return kamailio(template=DOCS_CFG, host=host, port=port, auth="db_text", users=USERS,
                        defines=["WITHOUT_MESH", "WITH_DMQ", f'DMQ_PEER "sip:{peer}:{port}"'])
    return make(hosts[0], hosts[1]), make(hosts[1], hosts[0])


async def test_registered_at_one_reachable_through_the_other_and_relearnt_after_sigkill(pair):
    a, b = pair
    answered: list[IncomingCall] = []

    async def on_invite(incoming: IncomingCall) -> None:
        answered.append(incoming)
        await incoming.accept(SDP)

    def ua(user: str, server: Kamailio, handler=None) -> UserAgent:
        return UserAgent(UAConfig(user=user, domain=server.hostport, password=USERS[user],
                                  listen_port=0), on_invite=handler)

    alice, bob = ua("alice", a, on_invite), ua("bob", b, on_invite)
    for agent in (alice, bob):
        await agent.start()
    try:
        assert (await alice.register()).status == 200   # at A only
        assert (await bob.register()).status == 200     # at B only
        wait_for(lambda: b.registered("alice") and a.registered("bob"), SYNC_BOUND,
                 what="each binding replicated to the other instance")
        call = await bob.invite("alice", SDP, timeout=10)   # through B, alice is at A
        assert answered and call.remote_sdp == SDP
        await call.bye()
        call = await alice.invite("bob", SDP, timeout=10)   # through A, bob is at B
        assert len(answered) == 2
        await call.bye()

        os.kill(a.pid, signal.SIGKILL)
        a.stop()
        assert not a.alive()
        a.start()   # an empty location table, asking its peer for everything
        wait_for(lambda: a.registered("alice") and a.registered("bob"), SYNC_BOUND,
                 what="the restarted instance re-learning both bindings")
        call = await alice.invite("bob", SDP, timeout=10)
        assert len(answered) == 3
        await call.bye()
    finally:
        for agent in (alice, bob):
            await agent.stop()
    assert a.alive() and b.alive(), a.log_text()[-2000:] + b.log_text()[-2000:]
