"""The mesh roster over unmodified Kamailio (issue 12, item 3): docs/kamailio/kamailio.cfg
with Debian's presence modules (presence, presence_reginfo, pua, pua_reginfo) serves a
network's roster to the same roster client as our broker (tests/test_roster.py): members
register under sip:net-lab@DOMAIN in realm lab, see each other join by RFC 3680 reg event
NOTIFYs, see one leave and one expire; REGISTER-fetch works as the fallback; a pair's INVITE
at a member's public GRUU reaches that member alone."""

from __future__ import annotations

import pytest

from sipmesh.agent.errors import AgentError
from sipmesh.agent.roster import RosterClient
from tests.lab import kamailio_unavailable_reason, wait_for_async
from tests.peers.roster import (PASSWORDS, USRLOC_TIMER, gruu_scenario, lab_kamailio,  # noqa: F401 (fixture)
                                make_ua, member_ua, roster_scenario)

# Each member claims its address (Kamailio allocates none; later it comes from its certificate).
ADDRESSES = {"alice": "100.64.1.1", "bob": "100.64.1.2", "carol": "100.64.1.3", "mallory": "100.64.1.9"}
REGISTER_EXPIRES = 3  # what the members ask for; MIN_EXPIRES below lets it through

pytestmark = pytest.mark.skipif(kamailio_unavailable_reason() is not None,
                                reason=str(kamailio_unavailable_reason()))


async def test_three_members_see_each_other_join_leave_and_expire_through_kamailio(lab_kamailio, member_ua,
                                                                                   tmp_path):
    # the expiry bound: the binding's lifetime, Kamailio's timer, and the PUBLISH/NOTIFY round
    await roster_scenario(lab_kamailio.hostport, member_ua, tmp_path, register_expires=REGISTER_EXPIRES,
                          expiry_bound=REGISTER_EXPIRES + USRLOC_TIMER + 1, addresses=ADDRESSES,
                          own_addresses=True)
    assert lab_kamailio.alive(), lab_kamailio.log_text()[-3000:]


async def test_kamailio_routes_a_pair_invite_at_a_members_gruu_to_that_member_alone(lab_kamailio, member_ua):
    """The pair INVITE of `sipmesh up` on the stock registrar: lookup() of a public GRUU
    (RFC 5627) picks the one binding with that +sip.instance, not the whole network AOR."""
    status = await gruu_scenario(lab_kamailio.hostport, member_ua, addresses=ADDRESSES)
    assert status == 404   # no binding with zed's instance
    assert lab_kamailio.alive(), lab_kamailio.log_text()[-3000:]


async def test_polling_kamailio_without_push(lab_kamailio, member_ua):
    domain = lab_kamailio.hostport
    alice = RosterClient(await member_ua("alice", domain), "lab", push=False, poll_interval=0.3,
                         mesh_ip=ADDRESSES["alice"])
    await alice.start()
    assert alice.mode == "poll"
    bob = RosterClient(await member_ua("bob", domain), "lab", mesh_ip=ADDRESSES["bob"])
    await bob.start()
    await wait_for_async(lambda: "bob" in alice.members, 5, what="alice polls bob in")
    assert alice.members["bob"].mesh_ip == ADDRESSES["bob"]
    await bob.stop()
    await wait_for_async(lambda: alice.members == {}, 5, what="alice polls bob out")
    await alice.stop()


async def test_kamailio_lets_only_members_in_and_only_with_their_own_contact(lab_kamailio, member_ua):
    domain = lab_kamailio.hostport
    with pytest.raises(AgentError, match="401"):  # no credentials in realm lab: not a member
        await RosterClient(await member_ua("mallory", domain), "lab").start()
    with pytest.raises(AgentError, match="401"):
        await RosterClient(await member_ua("bob", domain, password="wrong"), "lab").start()
    bob = await member_ua("bob", domain)
    alice_contact = RosterClient(await member_ua("alice", domain), "lab").contact()
    refused = await bob.register(60, aor=RosterClient(bob, "lab").aor, contact=alice_contact)
    assert refused.status == 403 and "own name" in refused.reason
    assert lab_kamailio.alive()
