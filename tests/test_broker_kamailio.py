"""docs/kamailio/kamailio.cfg does the broker's job: two sipmesh user agents register
with digest and call each other through Kamailio running that file."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from sipmesh.broker.users import UsersFile
from sipmesh.sip.ua import CallFailed, IncomingCall, UAConfig, UserAgent
from tests.lab import Kamailio, kamailio_unavailable_reason

import pytest

DOCS_CFG = Path(__file__).resolve().parents[1] / "docs" / "kamailio" / "kamailio.cfg"
MIGRATE = DOCS_CFG.with_name("users-to-dbtext.sh")
SDP_A = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 TCP x\r\na=PORT:7001\r\n"
SDP_B = b"v=0\r\no=bob 2 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 TCP x\r\na=PORT:7002\r\n"


@pytest.mark.skipif(kamailio_unavailable_reason() is not None, reason=str(kamailio_unavailable_reason()))
def test_the_documented_config_passes_kamailios_syntax_check(tmp_path):
    p = subprocess.run(["kamailio", "-c", "-f", str(DOCS_CFG)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    k = Kamailio(tmp_path / "k", auth="db_text", users={"alice": "x"}, template=DOCS_CFG)
    k.write_config()
    k.check()


async def test_two_user_agents_register_with_digest_and_call_through_kamailio(kamailio, tmp_path):
    # The documented migration: the broker's users file (HA1 only) -> db_text tables.
    users = UsersFile(tmp_path / "users")
    for user in ("alice", "bob", "mallory"):
        users.add("127.0.0.1", user, f"{user}-pw")
    users.save()
    k: Kamailio = kamailio(template=DOCS_CFG, auth="none", start=False)  # auth is on in that file
    subprocess.run(["sh", str(MIGRATE), str(tmp_path / "users"), str(k.db_dir)], check=True, timeout=30)
    assert "alice-pw" not in (k.db_dir / "subscriber").read_text()
    k.start()
    answered: list[IncomingCall] = []

    async def on_invite(incoming: IncomingCall) -> None:
        answered.append(incoming)
        incoming.ringing()
        await incoming.accept(SDP_B)

    def ua(user: str, password: str, handler=None, transport: str = "UDP") -> UserAgent:
        return UserAgent(UAConfig(user=user, domain=k.hostport, password=password, listen_port=0,
                                  transport=transport), on_invite=handler)

    alice, bob = ua("alice", "alice-pw"), ua("bob", "bob-pw", on_invite, transport="TCP")
    intruder = ua("alice", "wrong")
    agents = [alice, bob, intruder]
    for agent in agents:
        await agent.start()
    try:
        assert (await intruder.register()).status == 401  # wrong password: challenged again
        assert (await alice.register()).status == 200
        assert (await bob.register()).status == 200
        call = await alice.invite("bob", SDP_A, timeout=10)  # 407, then with credentials
        assert call.remote_sdp == SDP_B and answered[0].sdp == SDP_A
        assert call.dialog.route_set, "Kamailio record-routes"
        await asyncio.wait_for(bob.calls[0].acked.wait(), 5)
        await call.bye()
        await asyncio.wait_for(bob.calls[0].ended if bob.calls else asyncio.sleep(0), 5)
        with pytest.raises(CallFailed) as failed:
            await alice.invite("nobody", SDP_A, timeout=10)
        assert failed.value.status == 404
    finally:
        for agent in agents:
            await agent.stop()
    assert k.alive(), k.log_text()[-3000:]
