"""The daemon's configuration file, allocators, templates and caller patterns: no network."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from sipmesh.cli.daemon import register_builtin_kinds
from sipmesh.daemon import templates
from sipmesh.daemon.allocators import AddressPool, AllocationError, Lease, Ledger, PortRange
from sipmesh.daemon.config import ConfigError, load_config, parse_config
from sipmesh.daemon.service import Service, compile_pattern
from sipmesh.sip.uri import parse_sip_uri

register_builtin_kinds()
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

GOOD = f'''
[agent]
server = "127.0.0.1:5060"
user = "home"

[allocators.tcp]
type = "ports"
range = "20000-20009"

[allocators.pool]
type = "addresses"
pool = "10.9.0.0/24"

[[service]]
name = "one"
answer.command = ["{PY}", "-c", "pass", "{{PORT}}", "{{A}}"]
[service.params.PORT]
type = "port"
from = "allocator"
allocator = "tcp"
[service.params.A]
type = "ipv4"
from = "allocator"
allocator = "pool"
part = "local"

[[service]]
name = "two"
kind = "forward"
target = "127.0.0.1:22"
port = "tcp"
'''


def load(text: str, side: str = "answer"):
    return parse_config(text, source="t.toml", side=side)


def test_a_good_configuration() -> None:
    config = load(GOOD)
    assert list(config.services) == ["one", "two"]
    one = config.services["one"]
    assert one.kind == "exec" and one.max_sessions == 16 and one.line == 14
    assert one.allow == ("*@127.0.0.1",)  # default: callers of our own domain
    assert [p.name for p in one.profile.answer_params] == ["IP4", "IP6", "PORT", "A"]
    assert config.services["two"].profile.target == ("127.0.0.1", 22)


def test_tls_in_the_agent_table() -> None:
    config = load(GOOD.replace('server = "127.0.0.1:5060"', 'server = "sips:sip.example.org"\n'
                               'ca_file = "ca.crt"\ntls_server_name = "sip.example.org"'))
    agent = config.agent
    assert (agent.server, agent.transport) == ("sip.example.org", "tls")
    assert agent.tls.ca_file is not None and agent.tls.ca_file.name == "ca.crt"
    assert agent.tls.ca_file.is_absolute()  # relative to the file
    assert agent.tls.server_name == "sip.example.org" and agent.tls.cert is None
    plain = load(GOOD.replace('server = "127.0.0.1:5060"', 'server = "127.0.0.1:5061"\n'
                              'transport = "tls"')).agent
    assert (plain.server, plain.transport) == ("127.0.0.1:5061", "tls")


def test_the_example_configuration_loads() -> None:
    config = load_config(ROOT / "examples" / "daemon.toml", side="call")
    assert set(config.services) == {"ssh", "vpn", "ovpn", "echo"}
    if all(shutil.which(p) for p in ("socat", "openvpn", "wireguard-go", "wg")):
        load_config(ROOT / "examples" / "daemon.toml")  # every program present: answerable


@pytest.mark.parametrize("change, expected", [
    (("[agent]", "[agent"), "t.toml: invalid TOML: "),
    (('allocator = "tcp"', 'allocator = "tpc"'), "t.toml:20: service 'one': params.PORT.allocator: no allocator named 'tpc'"),
    (('kind = "forward"', 'kind = "fwd"'), "t.toml:29: service 'two': kind: unknown kind 'fwd'"),
    (('target = "127.0.0.1:22"', 'target = "127.0.0.1:99999"'), "t.toml:30: service 'two': target: '127.0.0.1:99999' is not HOST:PORT"),
    (('target = "127.0.0.1:22"', 'tarjet = "127.0.0.1:22"'), "t.toml:30: service 'two': tarjet: unknown key for kind 'forward'"),
    (('range = "20000-20009"', 'range = "9-8"'), "t.toml:8: allocator 'tcp': range: must be"),
    (('pool = "10.9.0.0/24"', 'pool = "10.9.0.1/24"'), "t.toml:12: allocator 'pool': pool: "),
    (('"{A}"]', '"{B}"]'), "t.toml:16: service 'one': answer.command: {B} is neither"),
    (('"{A}"]', '"{A"]'), "t.toml:16: service 'one': answer.command: stray '{'"),
    (('part = "local"', 'part = "middle"'), "t.toml:25: service 'one': params.A.part: must be"),
    (('type = "ipv4"', 'type = "port"'), "t.toml:22: service 'one': params.A.type: an address pool gives addresses"),
    (('type = "ipv4"', 'type = "ipv5"'), "t.toml:22: service 'one': params.A.type: unknown parameter type 'ipv5'"),
    (('name = "two"', 'name = "one"'), "t.toml:28: service 'one' is defined twice"),
    (('name = "two"', 'name = "t w o"'), "t.toml:28: service 't w o': name: missing or not a name"),
    ((f'["{PY}", "-c"', '["/nonexistent/prog", "-c"'), "t.toml:16: service 'one': answer.command: program not found"),
    (('user = "home"', 'user = "ho me"'), "t.toml:4: [agent] user: "),
    (('user = "home"', 'usr = "home"'), "t.toml:4: [agent] usr: unknown key"),
    (('user = "home"', 'user = "home"\ntransport = "sctp"'), "t.toml:5: [agent] transport: must be \"udp\", \"tcp\" or \"tls\""),
    (('user = "home"', 'user = "home"\nca_file = "ca.crt"'), "t.toml:5: [agent] ca_file: only for TLS"),
    (('server = "127.0.0.1:5060"', 'server = "sips:127.0.0.1"\ntransport = "tcp"'), "t.toml:4: [agent] transport: 'tcp', but server 'sips:127.0.0.1' means 'tls'"),
    (('server = "127.0.0.1:5060"', 'server = "sip:bob@127.0.0.1"'), "t.toml:3: [agent] server: 'sip:bob@127.0.0.1': give the server alone"),
    (('user = "home"', 'user = "home"\nservers = ["b:5070", 7]'), "t.toml:5: [agent] servers: must be a list of servers"),
    (('user = "home"', 'user = "home"\nservers = ["b:99999"]'), "t.toml:5: [agent] servers: '99999' is not a port number"),
    (('user = "home"', 'user = "home"\nservers = ["sips:b"]'), "t.toml:5: [agent] servers: the server sips:b means TLS, not UDP"),
    (('server = "127.0.0.1:5060"\nuser = "home"', 'user = "home"'), "t.toml:2: [agent] server: missing (the SIP server, HOST[:PORT], or servers = [...])"),
    (('user = "home"', 'user = "home"\nkeepalive = 0.5'), "t.toml:5: [agent] keepalive: must be 0 (off) or 1..3600 seconds, not 0.5"),
    (('[[service]]\nname = "two"', '[[service]]\nmax_sessions = 0\nname = "two"'), "t.toml:28: service 'two': max_sessions: must be a positive integer"),
    (('[[service]]\nname = "two"', '[[service]]\nallow = ["a b"]\nname = "two"'), "t.toml:28: service 'two': allow: 'a b' is not a caller pattern"),
    (('from = "allocator"\nallocator = "tcp"', 'from = "config"'), "t.toml:17: service 'one': params.PORT.value: missing"),
])
def test_bad_configurations_are_refused_with_line_and_reason(change, expected) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        load(GOOD.replace(old, new, 1))
    assert str(info.value).startswith(expected), str(info.value)
    assert info.value.code == 2


def test_several_servers_reach_the_ua_as_repeated_server_options_do(tmp_path) -> None:
    """`servers = [...]` after (or instead of) `server`: the first is the AOR's domain, the
    others UAConfig.servers, one +sip.instance kept in state_dir; a name without a port
    alone (a domain whose SRV records may list several) gets an instance too."""
    from sipmesh.daemon.server import ua_config
    state = f'state_dir = "{tmp_path}"\n'
    for server_lines, domain, servers in [
            ('servers = ["a.test:5060", "b.test:5070", "a.test:5060"]\n', "a.test:5060", ("b.test:5070",)),
            ('server = "a.test:5060"\nservers = ["sip:b.test:5070;transport=udp"]\n', "a.test:5060", ("b.test:5070",)),
            ('server = "example.test"\n', "example.test", ())]:
        agent = load(GOOD.replace('server = "127.0.0.1:5060"\n', server_lines + state, 1)).agent
        ua = ua_config(agent)
        assert (ua.domain, ua.servers) == (domain, servers)
        assert ua.instance == f"<urn:uuid:{(tmp_path / 'instance-id').read_text().strip()}>"
    assert ua_config(load(GOOD).agent).instance is None  # one server at an address: none


def test_the_peer_keepalive_of_agent_reaches_the_ua() -> None:
    from sipmesh.daemon.server import ua_config
    assert ua_config(load(GOOD).agent).peer_keepalive == 15.0  # the default: a dead peer within 45 s
    for value in (0, 2, 30.5):
        agent = load(GOOD.replace('user = "home"', f'user = "home"\nkeepalive = {value}')).agent
        assert agent.keepalive == value and ua_config(agent).peer_keepalive == value


def test_router_port_mapping_is_on_unless_the_agent_table_says_no() -> None:
    assert load(GOOD).agent.ice.portmap is True
    assert load(GOOD.replace('user = "home"', 'user = "home"\nportmap = false')).agent.ice.portmap is False
    with pytest.raises(ConfigError, match="portmap: must be true or false"):
        load(GOOD.replace('user = "home"', 'user = "home"\nportmap = "no"'))


def test_reserved_and_unknown_things() -> None:
    text = GOOD.replace("[service.params.A]", "[service.params.CALL_ID]").replace("{A}", "x")
    with pytest.raises(ConfigError, match="params.CALL_ID: 'CALL_ID' is reserved"):
        load(text)
    with pytest.raises(ConfigError, match="no \\[\\[service\\]\\]"):
        load('[agent]\nserver = "h"\nuser = "u"\n')
    with pytest.raises(ConfigError, match="unknown table or key 'services'"):
        load(GOOD + '\n[services]\nx = 1\n')
    with pytest.raises(ConfigError, match="default_service: no service named 'three'"):
        load(GOOD.replace('user = "home"', 'user = "home"\ndefault_service = "three"'))
    # the calling side needs no identity and no runnable answering program
    config = load(GOOD.replace('server = "127.0.0.1:5060"\n', '').replace(PY, "/nonexistent"),
                  side="call")
    assert config.agent.server is None


def test_missing_file_and_binary_junk(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


# ------------------------------------------------------------------------ allocators


def test_port_range_next_free_and_release() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ledger = Ledger()
        ports = PortRange("p", port, port + 2, ("tcp",), host="127.0.0.1")
        lease = Lease(ledger, {"p": ports})
        first = lease.port("p")
        assert first != port  # bound by someone else: the next one
        second = lease.port("p")
        assert {first, second} == {port + 1, port + 2}
        with pytest.raises(AllocationError):
            lease.port("p")
        # a reloaded configuration's allocator shares the ledger: no double allocation
        other = Lease(ledger, {"p": PortRange("p", port + 1, port + 2, ("tcp",), "127.0.0.1")})
        with pytest.raises(AllocationError, match="no free tcp port in p"):
            other.port("p")
        lease.release()
        assert ledger.empty()
        assert other.port("p") == port + 1


def test_address_pairs() -> None:
    pool = AddressPool("t", "10.9.0.0/24")
    pairs = list(pool.pairs())
    assert pairs[0] == ("10.9.0.1", "10.9.0.2") and pairs[-1] == ("10.9.0.253", "10.9.0.254")
    assert len(pairs) == 127
    ledger = Ledger()
    a, b = Lease(ledger, {"t": pool}), Lease(ledger, {"t": pool})
    assert a.pair("t") == ("10.9.0.1", "10.9.0.2")
    assert b.pair("t") == ("10.9.0.3", "10.9.0.4")
    a.release()
    assert Lease(ledger, {"t": pool}).pair("t") == ("10.9.0.1", "10.9.0.2")
    assert list(AddressPool("s", "10.9.0.4/31").pairs()) == [("10.9.0.4", "10.9.0.5")]
    assert list(AddressPool("s", "fd00::/126").pairs()) == [("fd00::1", "fd00::2")]


def test_addresses_configured_on_this_host_are_skipped() -> None:
    with pytest.raises(AllocationError, match="no free address pair"):
        Lease(Ledger(), {"lo": AddressPool("lo", "127.0.0.0/29")}).pair("lo")


# ------------------------------------------------------------------------ templates, callers


def test_templates() -> None:
    assert templates.names("a{X}b{{c}}{Y_1}") == ["X", "Y_1"]
    assert templates.render("{{{X}}}", {"X": "v"}) == "{v}"
    with pytest.raises(templates.TemplateError):
        templates.names("a}b")
    with pytest.raises(templates.TemplateError):
        templates.render("{X}", {})


def test_caller_patterns() -> None:
    assert compile_pattern("alice", "example.com") == "alice@example.com"
    assert compile_pattern("sip:Bob@EXAMPLE.com", "x") == "Bob@example.com"
    assert compile_pattern("*", "x") == "*"
    for bad in ("", " a", "a b", "a@b c", "a@"):
        with pytest.raises(ValueError):
            compile_pattern(bad, "x")
    service = Service(name="s", kind="exec", profile=None, max_sessions=1,  # type: ignore[arg-type]
                      allow=(compile_pattern("alice", "example.com"), compile_pattern("*@10.0.0.*", "x")))
    assert service.allows(parse_sip_uri("sip:alice@Example.COM:5070"))
    assert not service.allows(parse_sip_uri("sip:Alice@example.com"))  # user parts are case-sensitive
    assert service.allows(parse_sip_uri("sip:anyone@10.0.0.7"))
    assert not service.allows(parse_sip_uri("sip:mallory@evil.example"))


NETWORKS = '''
[agent]
server = "127.0.0.1:5060"
user = "home"
credentials = "home.secret"

[[network]]
name = "lab"

[[network]]
name = "ops"
user = "carol"
credentials = "ops.secret"
turn = "turn:127.0.0.1:3478"
pool = "10.10.0.0/24"
'''


def test_network_tables_become_sipmesh_up_options(tmp_path) -> None:
    from sipmesh.cli.up import network_args
    config = parse_config(NETWORKS, source="n.toml", base_dir=tmp_path)
    assert list(config.networks) == ["lab", "ops"] and not config.services
    lab = network_args("lab", config.networks["lab"].options, config.agent)
    assert (lab.network, lab.user, lab.credentials) == ("lab", "home", tmp_path / "home.secret")
    assert str(lab.server) == "127.0.0.1:5060"
    ops = network_args("ops", config.networks["ops"].options, config.agent)
    assert (ops.user, ops.credentials, ops.pool) == ("carol", tmp_path / "ops.secret", "10.10.0.0/24")
    assert ops.turn[:2] == ("127.0.0.1", 3478)


@pytest.mark.parametrize("change, expected", [
    ('[[network]]\nname = "lab"\n', "n.toml:17: network 'lab' is defined twice"),
    ('[[network]]\nname = "x"\nifnam = "a"\n', "network 'x': ifnam: unknown key"),
    ('[[network]]\nname = "bad name"\n', "network #3: name: missing or not a name"),
])
def test_bad_network_tables_are_refused(change, expected) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(NETWORKS + change, source="n.toml")
    assert expected in str(caught.value)


def test_a_bad_network_option_is_refused_as_sipmesh_up_would(tmp_path) -> None:
    from sipmesh.agent.errors import AgentError
    from sipmesh.cli.up import network_args
    config = parse_config(NETWORKS + '[[network]]\nname = "x"\npool = "not-a-cidr"\n',
                          source="n.toml", base_dir=tmp_path)
    with pytest.raises(AgentError, match="network x: .*--pool"):
        network_args("x", config.networks["x"].options, config.agent)


def test_daemon_network_table_relays(tmp_path) -> None:
    """`relay = true` in a [[network]] table is `sipmesh up --relay` (a string is refused)."""
    from sipmesh.cli.up import network_args
    from sipmesh.daemon.config import ConfigError, parse_config
    config = parse_config(NETWORKS + '[[network]]\nname = "x"\nrelay = true\nrelay_port = 3479\n',
                          source="n.toml", base_dir=tmp_path)
    args = network_args("x", config.networks["x"].options, config.agent)
    assert (args.relay, int(args.relay_port)) == (True, 3479)
    assert network_args("lab", config.networks["lab"].options, config.agent).relay is False
    with pytest.raises(ConfigError, match="relay: must be true or false"):
        parse_config(NETWORKS + '[[network]]\nname = "x"\nrelay = "yes"\n', source="n.toml")
