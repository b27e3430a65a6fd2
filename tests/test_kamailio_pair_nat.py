"""Two Kamailio instances serving one domain (issue 13 item 3 and 4; docs/kamailio/README.md,
"Two or more instances"), in the NAT lab: docs/kamailio/kamailio.cfg with -A WITH_DMQ on two
public hosts, agents behind home routers registered at both (`--server K1 --server K2`, one
+sip.instance). SIGKILL the instance a running WireGuard session was set up through: the
ping across the tunnel goes on, and so does a transfer through a forward (daemon); a new call reaches its target through the survivor within
the bound, the session's dialog moves to the survivor (INVITE with Replaces, RFC 3891,
routed by Kamailio) so that its BYE ends it on both sides (the forward's too); the killed instance started
again learns every binding back from its peer (dmq_usrloc sync) and a call through it
succeeds.

The same with mesh networks on (the shipped config as it is, members behind home routers
given both instances, `sipmesh up --server K1 --server K2`): two members up and pinging,
SIGKILL of the first instance, their tunnel pings on, a third member joins through the
survivor alone and pings both within the bound; the killed instance started again learns
the network's bindings from its peer and its roster (fetched) lists every member, the one
that joined while it was down too."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from sipmesh.broker.users import UsersFile
from sipmesh.lab.procs import ManagedProcess
from tests.lab import (Kamailio, LabTimeout, NatLab, kamailio_unavailable_reason,
                       shipped_kamailio, spawn, wait_for)
from tests.lab.agents import app_argv, no_orphans, record  # noqa: F401 (no_orphans: autouse)
from tests.lab.mesh import CREATED, full_mesh
from tests.lab.mesh import Member as MeshMember
from tests.lab.natsite import KAMAILIO_CFG, SIP_PORT, password
from tests.lab.pair import (FORWARD, ServerPair, assert_ping_unbroken, assert_trickle_unbroken,
                            new_call_within, pair_lab, server_called, trickle, trickle_echo,
                            tunnel_ping)

pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not all(shutil.which(p) for p in ("wireguard-go", "wg", "ping")),
                                 reason="needs wireguard-go, wg and ping")]

NEW_CALL_BOUND = 10.0  # s from SIGKILL to a new session through the survivor (README.md)
MOVE_BOUND = 15.0      # s from SIGKILL to the dialog moved: K + W with --keepalive 2, slack
SYNC_BOUND = 10.0      # s from the restart to every binding learnt back from the peer
USERS = ("bw", "aw", "bn", "an", "bf", "af")
ECHO_PORT, FORWARD_PORT = 7000, 7200  # the forward's target on b, its local port on a
TUNNEL = "10.90.0.1"
KEEPALIVE = ("--keepalive", "2")  # the sessions' peer check, so that the move comes soon


class KamailioPair(ServerPair):
    def __init__(self, lab: NatLab, run) -> None:
        super().__init__(lab, run)
        self.hosts = [lab["kam1"].ip, lab["kam2"].ip]
        self.domain = self.hosts[0]  # the domain both serve: the agents' first --server
        self.kamailios = [self.instance(0), self.instance(1)]
        try:
            for kamailio in self.kamailios:
                kamailio.start()
        except BaseException:
            self.stop()
            raise

    def instance(self, i: int) -> Kamailio:
        peer = self.hosts[1 - i]
        return Kamailio(self.run / f"kamailio{i + 1}", host=self.hosts[i], port=SIP_PORT,
                        netns=self.lab[f"kam{i + 1}"].ns, auth="db_text", realms=self.hosts,
                        users={u: password(u) for u in USERS}, template=KAMAILIO_CFG,
                        defines=["WITHOUT_MESH", "WITH_DMQ", f'DMQ_PEER "sip:{peer}:{SIP_PORT}"',
                                 f'SERVED_DOMAIN "{self.domain}"'])

    @property
    def servers(self) -> list[str]:
        return [f"{host}:{SIP_PORT}" for host in self.hosts]

    def stop(self) -> None:
        self.stop_agents()
        for kamailio in self.kamailios:
            kamailio.stop()


@pytest.fixture
def pair(tmp_path):
    reason = kamailio_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with pair_lab(("kam1", "kam2"), lambda lab: KamailioPair(lab, tmp_path)) as pair:
        yield pair


def registered_at(proc, server: str) -> bool:
    """Has `proc` registered at `server` (its log says)?"""
    return f" at {server} for " in proc.log_text()


def test_a_kamailio_killed_under_running_sessions_then_back(pair: KamailioPair, tmp_path) -> None:
    lab = pair.lab
    serve = pair.agent("serve", "b", "bw", "--app", "wireguard", "--vpn-local", TUNNEL, "--once",
                       *KEEPALIVE)
    answer = pair.agent("serve", "b", "bn", "--", *app_argv(tmp_path, "run"))
    for proc in (serve, answer):
        wait_for(lambda: all(registered_at(proc, s) for s in pair.servers), 20,
                 what=f"{proc.name} registered at both", abort=proc.exit_reason)
    call = pair.agent("call", "a", "aw", "--app", "wireguard", *KEEPALIVE, target="bw")
    wait_for(lambda: "path direct: " in call.log_text(), 30, what="the WireGuard session's path",
             abort=call.exit_reason)
    wait_for(lambda: "dev smwg" in lab["a"].run(["ip", "route", "get", TUNNEL]).stdout, 20,
             what="the caller's tunnel", abort=call.exit_reason)
    ping = tunnel_ping(lab, "a", TUNNEL, tmp_path)
    pair.procs.append(ping)
    wait_for(lambda: "bytes from" in ping.log_text(), 10, what="the first ping over the tunnel")
    # and a transfer through a forward (daemon bf on b, af's call on a), echoed by b
    pair.procs.append(trickle_echo(lab, "b", ECHO_PORT, tmp_path))
    pair.daemon("b", "bf", FORWARD.format(name="fwd", target=f"127.0.0.1:{ECHO_PORT}",
                                          local=FORWARD_PORT), keepalive=2)
    forward = pair.forward_call("a", "af", "bf", "fwd", FORWARD_PORT, keepalive=2)
    transfer = trickle(lab, "a", FORWARD_PORT, tmp_path)
    pair.procs.append(transfer)

    # SIGKILL the instance the session went through (the callers' first live server)
    dead = server_called(call, "bw", pair.hosts)
    survivor = pair.kamailios[1 - dead]
    os.kill(pair.kamailios[dead].pid, signal.SIGKILL)
    pair.kamailios[dead].stop()
    killed = time.monotonic()

    # a new call through the survivor (the caller registers while the other is down)
    new = new_call_within(pair.agent, tmp_path, killed, NEW_CALL_BOUND)
    assert server_called(new, "bn", pair.hosts) == 1 - dead, new.log_tail(30)

    # the WireGuard session's dialog moves to the survivor (Replaces), both sides agree
    wait_for(lambda: "the session goes on in dialog" in call.log_text()
             and "the peer moved the session" in serve.log_text(), MOVE_BOUND,
             what="the dialog moved to the survivor", abort=call.exit_reason)
    print(f"dialog moved {time.monotonic() - killed:.2f} s after SIGKILL")

    if server_called(forward, "bf", pair.hosts) == dead:
        wait_for(lambda: "the session goes on in dialog" in forward.log_text(), MOVE_BOUND,
                 what="the forward's dialog moved to the survivor", abort=forward.exit_reason)

    # the tunnel and the transfer never stopped, and the sessions end as a user ends them:
    # BYE via the survivor
    assert_ping_unbroken(ping, killed)
    assert_trickle_unbroken(transfer, killed)
    forward.stop(grace=10)
    assert forward.returncode == 0, forward.log_tail(30)
    assert call.alive() and serve.alive(), call.log_tail(20) + serve.log_tail(20)
    call.stop(grace=10)
    assert call.returncode == 0, call.log_tail(30)
    assert serve.wait(20) == 0, serve.log_tail(30)   # --once: done after the BYE

    # the killed instance back: it learns from its peer every binding there, bn's and that
    # of an (registered while it was down), before the agents' own retries (MIN_RETRY)
    restarted = pair.kamailios[dead]
    restarted.start()
    back = time.monotonic()
    wait_for(lambda: restarted.registered("bn") and restarted.registered("an"), SYNC_BOUND,
             what="the restarted instance re-learning the bindings (dmq_usrloc sync)")
    print(f"re-learnt the bindings in {time.monotonic() - back:.2f} s")
    new.stop(grace=10)
    assert new.returncode == 0, new.log_tail(30)
    # and a call through it alone reaches bn by the binding it learnt: bn's home router
    # lets it in, since bn's keep-alives to it kept the router's mapping open
    for role in ("client", "server"):
        (tmp_path / f"{role}.json").unlink()
    last = pair.agent("call", "a", "an", "--", *app_argv(tmp_path, "run"), target="bn",
                      servers=[pair.servers[dead]])
    wait_for(lambda: record(tmp_path, "client") and record(tmp_path, "server"), 20,
             what="a session through the restarted instance", abort=last.exit_reason)
    last.stop(grace=10)
    assert last.returncode == 0, last.log_tail(30)
    assert survivor.alive() and restarted.alive()


# ---- the mesh over the pair (shipped config with mesh networks on, -A WITH_DMQ) ----

MEMBERS = ("ma", "mb", "mc")  # ma, mb up before the kill; mc joins through the survivor
READER = "md"  # reads the restarted instance's roster
MESH_JOIN_BOUND = 20.0  # s from `sipmesh up` while an instance is down to pinging the others
ROSTER_BOUND = 15.0     # s from the restart to its roster listing the new member


class KamailioMeshPair(KamailioPair):
    """The pair with mesh networks on: network `lab`'s members are the users of realm lab
    (moved over by users-to-dbtext.sh as a site does, on each instance), its AOR
    sip:net-lab@SERVED_DOMAIN, the roster the reg event of presence + pua_reginfo."""

    def instance(self, i: int) -> Kamailio:
        users = UsersFile(self.run / "users")
        for user in (*MEMBERS, READER):
            users.add("lab", user, f"{user}-pw")  # the password tests/lab/mesh.py's Member gives
        users.save()
        peer = self.hosts[1 - i]
        return shipped_kamailio(self.run / f"kamailio{i + 1}", self.run / "users",
                                mesh_domain=self.domain, host=self.hosts[i], port=SIP_PORT,
                                netns=self.lab[f"kam{i + 1}"].ns,
                                defines=["WITH_DMQ", f'DMQ_PEER "sip:{peer}:{SIP_PORT}"',
                                         f'SERVED_DOMAIN "{self.domain}"'])

    def member(self, name: str) -> MeshMember:
        """`sipmesh up lab --server K1 --server K2` on host `name`, its mesh address claimed."""
        return MeshMember(self.lab, name, self.servers[0], self.run, "--server", self.servers[1],
                          "--mesh-ip", f"100.64.0.{MEMBERS.index(name) + 1}", expires=60)


@pytest.fixture
def mesh_pair(tmp_path):
    reason = kamailio_unavailable_reason()
    if reason:
        pytest.skip(reason)

    def make(lab: NatLab) -> KamailioMeshPair:
        lab.add_hosts({m: "home" for m in MEMBERS})
        return KamailioMeshPair(lab, tmp_path)
    with pair_lab(("kam1", "kam2"), make) as pair:
        try:
            yield pair
        finally:
            while CREATED:
                Path(f"/var/run/wireguard/{CREATED.pop()}.sock").unlink(missing_ok=True)


def roster_reader(pair: KamailioMeshPair, i: int, host: str, *argv: str) -> ManagedProcess:
    """A member `READER` on public `host` at instance i+1 alone (tests/peers/roster_member.py),
    printing `joined NAME` for each member that instance's roster lists (`--poll`: by
    REGISTER-fetch, else by the reg event)."""
    return spawn([sys.executable, "-m", "tests.peers.roster_member", pair.servers[i], READER, "lab",
                  "--listen-host", pair.lab[host].ip, *argv],
                 netns=pair.lab[host].ns, cwd=Path(__file__).resolve().parents[1],
                 env=dict(os.environ, ROSTER_PASSWORD=f"{READER}-pw"), name="roster-reader",
                 log_path=pair.run / "roster-reader.log")


def test_a_mesh_across_a_kamailio_killed_then_back(mesh_pair: KamailioMeshPair) -> None:
    pair = mesh_pair
    members = [pair.member("ma"), pair.member("mb")]
    for m in members:
        wait_for(m.ready, 30, what=f"{m.name} up", abort=m.proc.exit_reason)
    full_mesh(members, timeout=30)
    ma, mb = members
    ping = tunnel_ping(pair.lab, "ma", mb.status()["mesh_ip"], pair.run)
    pair.procs.append(ping)
    wait_for(lambda: "bytes from" in ping.log_text(), 10, what="the first ping over ma-mb")

    # SIGKILL the first instance: the one whose address is the members' domain
    dead = 0
    survivor, victim = pair.kamailios[1 - dead], pair.kamailios[dead]
    os.kill(victim.pid, signal.SIGKILL)
    victim.stop()
    killed = time.monotonic()

    mc = pair.member("mc")
    joining = time.monotonic()
    wait_for(mc.ready, MESH_JOIN_BOUND, what="mc up through the survivor", abort=mc.proc.exit_reason)
    full_mesh([mc, ma, mb], timeout=max(1.0, MESH_JOIN_BOUND - (time.monotonic() - joining)))
    print(f"a new member pings the others {time.monotonic() - joining:.2f} s after it started, "
          f"{time.monotonic() - killed:.2f} s after SIGKILL")
    assert time.monotonic() - joining < MESH_JOIN_BOUND
    shown = mc.sipmesh("status").stdout  # a member at the survivor only (the other is down)
    assert f"{pair.servers[1 - dead]} registered (roster push)" in shown, shown
    assert f"{pair.servers[dead]} registered" not in shown, shown

    # the killed instance back: it learns every binding of the network AOR from its peer
    # (mc's too, made while it was down), and a roster fetch there lists them at once. (Its
    # reg-event roster does not, always: pua_reginfo PUBLISHes on the usrloc callbacks that
    # dmq_usrloc's inserts run, but pua's initial PUBLISHes for one AOR race and presence
    # NOTIFYs one of the several presentities they make; README.md, "Mesh networks on a pair")
    victim.start()
    back = time.monotonic()
    wait_for(lambda: all(f"sip:{m}@" in victim.rpc("ul.dump") for m in MEMBERS), SYNC_BOUND,
             what="the restarted instance re-learning the bindings (dmq_usrloc sync)")
    print(f"re-learnt the bindings in {time.monotonic() - back:.2f} s")
    reader = roster_reader(pair, dead, f"kam{2 - dead}", "--poll")
    pair.procs.append(reader)
    try:
        wait_for(lambda: all(f"joined {m} " in reader.log_text() for m in MEMBERS), ROSTER_BOUND,
                 what="the restarted instance's roster listing every member",
                 abort=reader.exit_reason)
    except LabTimeout as exc:
        raise AssertionError(f"{exc}\n{reader.log_tail(20)}\n{victim.rpc('ul.dump')}") from exc
    print(f"its roster lists every member {time.monotonic() - back:.2f} s after the restart")
    assert_ping_unbroken(ping, killed)  # ma-mb's tunnel across the kill and the restart
    assert survivor.alive() and victim.alive()
