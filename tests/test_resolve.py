"""Host names become addresses in one place (sip/transport/resolve.py, RFC 3263).

A dnsmasq on loopback is the only DNS server these tests use: it answers from its own
records, is authoritative for example.com (NXDOMAIN for the rest of it) and forwards
nothing, so no query leaves the machine. Each in-process test runs under both event
loops: uvloop's sendto refuses a host name (ValueError) where asyncio's would block
on a lookup, which is how a response aimed at a name once escaped as an exception.
The last test runs a broker process with uvloop in a namespace that has only `lo`,
where nothing resolves at all.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import secrets
import sys
from dataclasses import dataclass

import pytest

from sipmesh.broker.server import Broker, BrokerConfig
from sipmesh.sip.message import Response, parse_message
from sipmesh.sip.transport.base import Flow
from sipmesh.sip.transport.resolve import ResolveError, Resolver, Srv, srv_order
from sipmesh.sip.uri import parse_sip_uri
from sipmesh.sip.ua import CallFailed, UAConfig, UserAgent
from tests.lab import (Dnsmasq, dnsmasq_unavailable_reason, free_port, wait_for, wait_for_async,
                       wait_udp_listening)
from tests.peers.broker import sip
from tests.peers.raw import RawPeer

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"))]


def run_on(loop: str, main) -> object:
    """Run `main()` on a fresh event loop of the given kind, failing on any exception
    that escaped a task (the loop's exception handler sees those)."""
    escaped: list[dict] = []

    async def wrapper():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: escaped.append(context))
        return await main()

    if loop == "uvloop":
        import uvloop
        result = uvloop.run(wrapper())
    else:
        result = asyncio.run(wrapper())
    assert not escaped, f"exceptions escaped a task: {escaped}"
    return result


@dataclass
class Lab:
    dns: Dnsmasq
    sink_port: int  # _sip._udp.example.com points here (spindle.example.com)
    broker_port: int  # _sip._udp.broker.example.com points here

    def resolver(self, **kwargs) -> Resolver:
        return Resolver(self.dns.nameservers, hosts_file=None, **kwargs)


@pytest.fixture
def lab(tmp_path):
    reason = dnsmasq_unavailable_reason()
    if reason:
        pytest.skip(reason)
    sink, broker = free_port("udp"), free_port("both")
    records = [("A", "spindle.example.com", "127.0.0.1", 60),
               ("SRV", "_sip._udp.example.com", "spindle.example.com", sink, 10, 5),
               ("SRV", "_sip._udp.broker.example.com", "spindle.example.com", broker, 10, 5),
               ("SRV", "_sip._udp.dangling.example.com", "gone.example.com", 5060, 10, 5),
               # NAPTR (RFC 3263 §4.1) names other SRV records than the transport's own
               ("NAPTR", "naptr.example.com", 10, 10, "SIP+D2T", "_sip._tcp.alt.example.com"),
               ("NAPTR", "naptr.example.com", 20, 10, "SIP+D2U", "_sip._udp.alt.example.com"),
               ("SRV", "_sip._udp.alt.example.com", "spindle.example.com", broker, 10, 5),
               ("SRV", "_sip._udp.naptr.example.com", "spindle.example.com", sink, 10, 5)]
    with Dnsmasq(tmp_path, records) as dns:
        yield Lab(dns, sink, broker)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the resolver ----------------------------------------------------------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_resolver_follows_rfc3263_and_caches_by_ttl(lab, loop, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# a comment\n127.0.0.9  myhost.lan myhost\n::1 myhost\n")

    async def main():
        clock = FakeClock()
        r = Resolver(lab.dns.nameservers, hosts_file=str(hosts), clock=clock)
        # no port, a name: SRV first (§4.2), then the target's A record
        assert await r.uri_flow(parse_sip_uri("sip:bob@example.com")) == Flow("UDP", "127.0.0.1", lab.sink_port)
        sent = r.queries
        assert sent == 2  # SRV + A
        assert await r.uri_flow(parse_sip_uri("sip:bob@example.com")) == Flow("UDP", "127.0.0.1", lab.sink_port)
        # an explicit port: A only, and spindle's A record is still cached
        assert await r.uri_flow(parse_sip_uri("sip:bob@spindle.example.com:5070")) \
            == Flow("UDP", "127.0.0.1", 5070)
        assert r.queries == sent
        # the transport parameter picks the SRV service; without SRV, A at the default port
        assert await r.uri_flow(parse_sip_uri("sip:spindle.example.com;transport=tcp")) \
            == Flow("TCP", "127.0.0.1", 5060)
        assert r.queries == sent + 1  # _sip._tcp.spindle.example.com: NXDOMAIN
        # numeric hosts and /etc/hosts need no DNS
        sent = r.queries
        assert await r.uri_flow(parse_sip_uri("sip:10.0.0.1")) == Flow("UDP", "10.0.0.1", 5060)
        assert await r.addresses("MyHost") == ("127.0.0.9", "::1")  # IPv4 first
        assert r.queries == sent
        # a name that does not exist: a ResolveError (an OSError), remembered for a while
        with pytest.raises(ResolveError, match="no such name"):
            await r.uri_flow(parse_sip_uri("sip:x@nowhere.example.com:5060"))
        with pytest.raises(ResolveError):
            await r.addresses("nowhere.example.com")
        assert r.queries == sent + 2  # A, then AAAA; the second lookup came from the cache
        with pytest.raises(ResolveError, match="SRV"):  # an SRV target without an address
            await r.uri_flow(parse_sip_uri("sip:dangling.example.com"))
        # past the TTL (60 s) the name is asked again; concurrent askers share one query
        clock.now += 61
        sent = r.queries
        answers = await asyncio.gather(*(r.addresses("spindle.example.com") for _ in range(5)))
        assert answers == [("127.0.0.1",)] * 5
        assert r.queries == sent + 1

    run_on(loop, main)


def test_lookups_in_progress_are_bounded(lab):
    """Names come from hostile messages: distinct names beyond `max_pending` fail at once
    instead of becoming DNS queries."""
    async def main():
        r = lab.resolver(max_pending=2)
        names = [f"n{i}.example.com" for i in range(5)]
        results = await asyncio.gather(*(r.addresses(name) for name in names), return_exceptions=True)
        assert all(isinstance(e, ResolveError) for e in results)
        assert sum("too many lookups" in str(e) for e in results) == 3
        assert r.queries == 4  # A and AAAA for the two that were looked up

    run_on("asyncio", main)


def test_srv_order_is_by_priority_then_weighted_random():
    records = [Srv(20, 0, 1, "c"), Srv(10, 1, 2, "a"), Srv(10, 3, 3, "b")]
    assert [r.target for r in srv_order(records, rng=lambda: 0.0)] == ["a", "b", "c"]
    assert [r.target for r in srv_order(records, rng=lambda: 0.99)] == ["b", "a", "c"]


# -- the broker's proxy ----------------------------------------------------------------------

def broker_config(tmp_path, port: int = 0, domains: list[str] = ("127.0.0.1",)) -> BrokerConfig:
    return BrokerConfig(listen=[("127.0.0.1", port)], transports=("UDP",), domains=list(domains),
                        db_path=tmp_path / "broker.db", forward_foreign=True, rate_limit=0,
                        stats_interval=0, purge_interval=0)


@pytest.mark.parametrize("loop", LOOPS)
def test_proxy_resolves_next_hops_and_answers_503_for_a_name_that_does_not(lab, loop, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sipmesh")

    async def main():
        broker = Broker(broker_config(tmp_path))
        await broker.start()
        assert broker.transactions is not None
        broker.transactions.resolver = lab.resolver()
        here = broker.address("UDP")
        caller, sink = await RawPeer.open(), await RawPeer.open(port=lab.sink_port)
        try:
            # The case that escaped as ValueError under uvloop: an unresolvable next hop,
            # and a second Via naming a host, where the synthetic answer once went.
            caller.send(sip("OPTIONS", "sip:bob@nowhere.example.com", caller, call_id="nowhere",
                            headers=["Via: SIP/2.0/UDP unknown.example.com;branch=z9hG4bKup"]), here)
            answer = await caller.final("nowhere")
            assert answer.status == 503, answer
            assert len(answer.headers.get_all("Via")) == 2  # the caller's Vias, both
            # A name with SRV records: the request goes where they point
            caller.send(sip("OPTIONS", "sip:bob@example.com", caller, call_id="srv"), here)
            forwarded = await sink.request("OPTIONS")
            assert str(forwarded.uri) == "sip:bob@example.com"
            sink.reply(forwarded, 200, to_tag="s1")
            assert (await caller.final("srv")).status == 200
            # A response whose next Via names a host (§18.2.2, RFC 3263 §5): resolved and
            # sent there; a name that does not resolve: dropped, with a log line.
            ours = f"SIP/2.0/UDP {here[0]}:{here[1]};branch=z9hG4bKsm0.0.{secrets.token_hex(4)}"
            for target in (f"spindle.example.com:{lab.sink_port}", "nowhere.example.com"):
                reply = "\r\n".join([
                    "SIP/2.0 180 Ringing", f"Via: {ours}",
                    f"Via: SIP/2.0/UDP {target};branch=z9hG4bK{secrets.token_hex(4)}",
                    "From: <sip:a@127.0.0.1>;tag=1", "To: <sip:b@127.0.0.1>;tag=2",
                    f"Call-ID: stray-{target}", "CSeq: 1 INVITE", "Content-Length: 0", "", ""])
                caller.send(reply, here)
            relayed, _ = await sink.recv()
            assert isinstance(relayed, Response) and relayed.call_id.startswith("stray-spindle")
            await wait_for_async(lambda: "no such name: nowhere.example.com" in caplog.text, 5,
                                 what="the unresolvable name logged")
        finally:
            caller.close()
            sink.close()
            await broker.stop()

    run_on(loop, main)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_user_agent_finds_its_registrar_by_srv(lab, loop, tmp_path):
    async def main():
        broker = Broker(broker_config(tmp_path, lab.broker_port, ["broker.example.com"]))
        await broker.start()
        agents = []
        try:
            for domain in ("broker.example.com", "nowhere.example.com"):
                ua = UserAgent(UAConfig(user="alice", domain=domain, listen_host="127.0.0.1",
                                        listen_port=0, transports=("UDP",)))
                agents.append(ua)
                await ua.start()
                assert ua.transactions is not None
                ua.transactions.resolver = lab.resolver()
            assert (await agents[0].register(300)).status == 200
            assert broker.location is not None and len(broker.location.lookup("sip:alice@broker.example.com")) == 1
            with pytest.raises(CallFailed) as failed:
                await agents[1].register(300)
            assert failed.value.status == 503 and "nowhere.example.com" in failed.value.reason
        finally:
            for ua in agents:
                await ua.stop()
            await broker.stop()

    run_on(loop, main)


def test_user_agent_finds_its_servers_by_naptr_and_srv(lab):
    """find_servers: a domain's SRV targets (via its NAPTR records for our transport)
    become the UA's servers; a server with a port, or a domain without records, stays."""
    async def main():
        found = {}
        for domain, transport in (("naptr.example.com", "UDP"), ("naptr.example.com", "TCP"),
                                  ("broker.example.com", "UDP"), ("broker.example.com:5070", "UDP"),
                                  ("spindle.example.com", "UDP")):
            ua = UserAgent(UAConfig(user="alice", domain=domain, transport=transport,
                                    listen_host="127.0.0.1", listen_port=0, transports=("UDP",)))
            await ua.start()
            try:
                assert ua.transactions is not None
                ua.transactions.resolver = lab.resolver()
                found[domain, transport] = (await ua.find_servers(), dict(ua.server_names))
            finally:
                await ua.stop()
        # UDP: the NAPTR's _sip._udp.alt.example.com (the broker), not _sip._udp.naptr (the sink)
        assert found["naptr.example.com", "UDP"] == (
            [f"127.0.0.1:{lab.broker_port}"], {f"127.0.0.1:{lab.broker_port}": "spindle.example.com"})
        # TCP: the NAPTR's SRV name has no records, nor has _sip._tcp.naptr: the domain itself
        assert found["naptr.example.com", "TCP"] == (["naptr.example.com"], {})
        assert found["broker.example.com", "UDP"][0] == [f"127.0.0.1:{lab.broker_port}"]
        assert found["broker.example.com:5070", "UDP"] == (["broker.example.com:5070"], {})
        assert found["spindle.example.com", "UDP"] == (["spindle.example.com"], {})
        # next hops do not read NAPTR: the transport's own SRV name
        flow = await lab.resolver().uri_flow(parse_sip_uri("sip:bob@naptr.example.com"))
        assert flow == Flow("UDP", "127.0.0.1", lab.sink_port)

    asyncio.run(main())


# -- a broker process (uvloop) where nothing resolves --------------------------------------------

@pytest.mark.netns
def test_broker_process_in_lo_only_namespace_answers_503_and_drops_without_traceback(
        lo_only_netns, tmp_path):
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    port = 5060
    broker = lo_only_netns.spawn(
        [sys.executable, "-m", "sipmesh", "broker", "--listen", f"127.0.0.1:{port}", "--domain", "127.0.0.1",
         "--db", str(tmp_path / "broker.db"), "--workers", "1", "--forward-foreign", "--loop", loop,
         "--rate-limit", "0"], log_path=tmp_path / "broker.log", name="broker")
    wait_udp_listening("127.0.0.1", port, netns=lo_only_netns, proc=broker)
    sock = lo_only_netns.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        me = sock.getsockname()[1]
        here = ("127.0.0.1", port)

        def send(lines: list[str]) -> None:
            sock.sendto("\r\n".join([*lines, "Content-Length: 0", "", ""]).encode(), here)

        def head(method: str, uri: str, call_id: str) -> list[str]:
            return [f"{method} {uri} SIP/2.0",
                    f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{secrets.token_hex(6)};rport",
                    "Via: SIP/2.0/UDP spindle.example.com;branch=z9hG4bKup",
                    "Max-Forwards: 70", "From: <sip:t@127.0.0.1>;tag=1", f"Call-ID: {call_id}"]

        # a Request-URI naming spindle.example.com, out of a dialog and in one (Route)
        send([*head("INVITE", "sip:bob@spindle.example.com", "uri"), "To: <sip:bob@spindle.example.com>",
              "CSeq: 1 INVITE", "Contact: <sip:t@127.0.0.1>"])
        send([*head("BYE", "sip:bob@127.0.0.1", "route"), "To: <sip:bob@127.0.0.1>;tag=2",
              "Route: <sip:spindle.example.com;lr>", "CSeq: 2 BYE"])
        finals = {}
        while len(finals) < 2:
            answer = parse_message(sock.recvfrom(65535)[0])
            assert isinstance(answer, Response)
            if answer.status >= 200:
                finals[answer.call_id] = answer.status
        assert finals == {"uri": 503, "route": 503}
        # a stray response whose next Via names spindle.example.com: dropped, logged
        send(["SIP/2.0 200 OK", f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKsm0.0.abc",
              "Via: SIP/2.0/UDP spindle.example.com;branch=z9hG4bKup", "From: <sip:a@127.0.0.1>;tag=1",
              "To: <sip:b@127.0.0.1>;tag=2", "Call-ID: stray", "CSeq: 1 INVITE"])
        wait_for(lambda: "cannot send" in broker.log_text(), 5, what="the dropped response logged",
                 abort=broker.exit_reason)
        assert broker.alive(), broker.log_tail()
        assert "Traceback" not in broker.log_text() and "never retrieved" not in broker.log_text()
    finally:
        sock.close()
        broker.stop()


def test_srv_servers_hold_for_the_shortest_ttl_left(lab):
    """srv_servers: how long the found set holds is the least time to live left of the
    records it came from (here SRV 30 s, the target's A 60 s): an agent looks again then."""
    async def main():
        clock = FakeClock()
        r = lab.resolver(clock=clock)
        expected = [("spindle.example.com", Flow("UDP", "127.0.0.1", lab.sink_port))]
        assert await r.srv_servers("example.com") == (expected, 30.0)
        clock.now += 10                                  # both cached: 20 s left of the SRV
        assert await r.srv_servers("example.com") == (expected, 20.0)
        assert r.queries == 2
        clock.now += 25                                  # SRV asked again; 25 s left of the A
        assert await r.srv_servers("example.com") == (expected, 25.0)
        assert r.queries == 3
        assert await r.srv_servers("nothing.example.com") == ([], r.negative_ttl)

    asyncio.run(main())
