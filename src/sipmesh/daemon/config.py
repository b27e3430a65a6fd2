"""The daemon's configuration file (TOML): identity, allocators, services.

    [agent]                      # who we are at the SIP server
    server = "sip.example.com:5060"
    user = "home"
    credentials = "home.secret"  # or password = "..."
    [allocators.tcp]             # resources handed to sessions
    type = "ports"
    range = "20000-20099"
    [[service]]                  # any number of these
    name = "ssh"
    kind = "forward"
    target = "127.0.0.1:22"
    port = "tcp"
    allow = ["alice@sip.example.com"]
    max_sessions = 4
    [[network]]                  # mesh networks to be in (docs/mesh.md), any number
    name = "lab"                 # server, user, credentials: [agent]'s unless given here
    credentials = "lab.secret"

Everything is checked when the file is loaded, at start and at reload: a TOML
syntax error is reported with its line (tomllib's message), anything else with
the line of the offending key, the service's name and the key, e.g.
``daemon.toml:31: service 'echo': params.PORT.allocator: no allocator named 'tpc'``.
docs/daemon.md describes every key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sipmesh.agent.errors import AgentError, Exit, ProfileError
from sipmesh.agent.ice import IceOptions, parse_turn_uri
from sipmesh.agent.link import TRANSPORTS, TLSClient, extra_servers, parse_server
from sipmesh.agent.params import Host, IPAddress, Token
from sipmesh.daemon.allocators import AddressPool, Allocator, PortRange
from sipmesh.daemon.registry import get_kind
from sipmesh.daemon.service import NAME_RE, ConfigValueError, Service, compile_pattern
from sipmesh.sip.ua.liveness import DEFAULT_INTERVAL, check_interval

__all__ = ["AgentSection", "ConfigError", "DaemonConfig", "load_config", "parse_config"]

DEFAULT_MAX_SESSIONS = 16  # per service
DEFAULT_DAEMON_MAX = 4096  # the whole daemon
_SERVICE_COMMON = {"name", "kind", "allow", "max_sessions", "description", "call"}
_AGENT_KEYS = {"server", "servers", "user", "password", "credentials", "auth_user", "display_name",
               "transport", "bind", "sip_port", "advertise", "expires", "register_timeout",
               "grace", "max_sessions", "default_service", "control_socket", "state_dir",
               "ca_file", "cert", "key", "tls_server_name", "keepalive",
               "ice", "stun", "turn", "consent_timeout", "portmap"}
# [[network]]: `sipmesh up`'s options (cli/up.py parses them, as from its command line)
_NETWORK_KEYS = {"name", "server", "user", "password", "credentials", "auth_user", "transport",
                 "sip_port", "expires", "ifname", "wg_port", "advertise", "mesh_ip", "pool",
                 "state_dir", "stun", "turn", "consent_timeout", "hosts_file", "no_hosts",
                 "relay", "relay_port", "relay_max_bps"}
_NETWORK_FLAGS = {"no_hosts", "relay"}  # true or false
_NETWORK_PATHS = {"credentials", "state_dir", "hosts_file"}  # relative to the configuration file


class ConfigError(AgentError):
    """The configuration cannot be used; the message names the file, line and reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Exit.USAGE)


@dataclass
class AgentSection:
    server: str | None = None  # host[:port]: the first server (a domain: its SRV records)
    servers: tuple[str, ...] = ()  # more servers after it (`servers = [...]`, as --server again)
    user: str | None = None
    password: str | None = None
    credentials: Path | None = None
    auth_user: str | None = None
    display_name: str | None = None
    transport: str = "udp"
    bind: str = "0.0.0.0"
    sip_port: int = 0
    advertise: str | None = None
    expires: int = 3600
    register_timeout: float = 10.0
    grace: float = 5.0
    keepalive: float = DEFAULT_INTERVAL  # probe a silent peer after this long (0: never)
    max_sessions: int = DEFAULT_DAEMON_MAX
    default_service: str | None = None
    control_socket: Path | None = None
    state_dir: Path | None = None
    tls: TLSClient = field(default_factory=TLSClient)  # ca_file, cert, key, tls_server_name
    ice: IceOptions = field(default_factory=IceOptions)  # ice, stun, turn, consent_timeout

    @property
    def domain_host(self) -> str:
        """The host part of our AOR (for 'alice' caller patterns)."""
        server = self.server or ""
        if server.startswith("["):
            return server[1:].split("]", 1)[0].lower()
        return server.rsplit(":", 1)[0].lower() if server.count(":") == 1 else server.lower()


@dataclass
class NetworkSection:
    """A [[network]] table: the mesh network's name and `sipmesh up` options for it."""
    name: str
    options: dict[str, str | int | float | bool] = field(default_factory=dict)
    line: int | None = None


@dataclass
class DaemonConfig:
    agent: AgentSection
    allocators: dict[str, Allocator] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    path: Path | None = None
    networks: dict[str, NetworkSection] = field(default_factory=dict)


# ------------------------------------------------------------------------ line numbers


class _Locator:
    """Line numbers of tables and keys in TOML text (tomllib reports none for values).

    Paths are tuples of keys; an element of an array of tables is ("service", index).
    A lookup falls back to the nearest enclosing table that has a line."""

    _STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'[^\']*\'')

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple, int] = {}
        counters: dict[tuple, int] = {}
        current: tuple = ()
        depth = 0
        in_multiline: str | None = None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
            bare = self._STRINGS.sub('""', line).split("#", 1)[0].strip()
            if depth > 0:
                depth += bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}")
                continue
            if bare.startswith("[["):
                path = self._keys(bare.strip("[] "))
                base = self._resolve(path[:-1], counters)
                index = counters.get(base + (path[-1],), -1) + 1
                counters[base + (path[-1],)] = index
                current = base + ((path[-1], index),)
                self.lines.setdefault(current, number)
            elif bare.startswith("["):
                current = self._resolve(self._keys(bare.strip("[] ")), counters)
                self.lines.setdefault(current, number)
            elif "=" in bare:
                key, _, value = bare.partition("=")
                self.lines.setdefault(current + tuple(self._keys(key)), number)
                depth = value.count("[") + value.count("{") - value.count("]") - value.count("}")

    @staticmethod
    def _keys(text: str) -> list[str]:
        return [part.strip().strip('"\'') for part in text.split(".")]

    @staticmethod
    def _resolve(path: list[str], counters: dict[tuple, int]) -> tuple:
        """[service, params] -> (("service", i), "params") for the latest element i."""
        resolved: tuple = ()
        for key in path:
            if resolved + (key,) in counters:
                resolved += ((key, counters[resolved + (key,)]),)
            else:
                resolved += (key,)
        return resolved

    def line(self, path: tuple) -> int | None:
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None


# ------------------------------------------------------------------------ loading


def load_config(path: Path | str, *, side: str = "answer") -> DaemonConfig:
    """Read and check `path`; raises ConfigError. `side` "answer" (the daemon: every
    service must be runnable here) or "call" (sipmesh call --service: identity optional)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_config(text, source=str(path), side=side, base_dir=path.resolve().parent,
                        path=path)


def parse_config(text: str, *, source: str = "<config>", side: str = "answer",
                 base_dir: Path | None = None, path: Path | None = None) -> DaemonConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return _Builder(data, _Locator(text), source, side, base_dir or Path.cwd()).build(path)


class _Builder:
    def __init__(self, data: dict[str, Any], locator: _Locator, source: str, side: str,
                 base_dir: Path) -> None:
        self.data, self.locator, self.source = data, locator, source
        self.side, self.base_dir = side, base_dir

    def error(self, path: tuple, message: str) -> ConfigError:
        line = self.locator.line(path)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {message}")

    def build(self, path: Path | None) -> DaemonConfig:
        unknown = set(self.data) - {"agent", "allocators", "service", "network"}
        if unknown:
            key = sorted(unknown)[0]
            raise self.error((key,), f"unknown table or key {key!r} (expected [agent], "
                                     "[allocators.NAME], [[service]], [[network]])")
        agent = self.agent(self.data.get("agent", {}))
        allocators = self.allocators(self.data.get("allocators", {}))
        services: dict[str, Service] = {}
        entries = self.data.get("service", [])
        if not isinstance(entries, list):
            raise self.error(("service",), "services are [[service]] tables")
        for index, table in enumerate(entries):
            service = self.service(index, table, allocators, agent)
            if service.name in services:
                raise self.error((("service", index), "name"),
                                 f"service {service.name!r} is defined twice")
            services[service.name] = service
        networks: dict[str, NetworkSection] = {}
        tables = self.data.get("network", [])
        if not isinstance(tables, list):
            raise self.error(("network",), "networks are [[network]] tables")
        for index, table in enumerate(tables):
            network = self.network(index, table)
            if network.name in networks:
                raise self.error((("network", index), "name"),
                                 f"network {network.name!r} is defined twice")
            networks[network.name] = network
        if self.side == "answer" and not services and not networks:
            raise self.error((), "no [[service]] or [[network]]: the daemon would have nothing "
                                 "to do")
        if agent.default_service is not None and agent.default_service not in services:
            raise self.error(("agent", "default_service"),
                             f"[agent] default_service: no service named {agent.default_service!r}")
        return DaemonConfig(agent=agent, allocators=allocators, services=services, path=path,
                            networks=networks)

    # -- [[network]] ---------------------------------------------------------------------------
    def network(self, index: int, table: Any) -> NetworkSection:
        path: tuple = (("network", index),)
        name = table.get("name") if isinstance(table, dict) else None
        if not isinstance(table, dict):
            raise self.error(path, f"network #{index + 1}: must be a table")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise self.error(path + ("name",), f"network #{index + 1}: name: missing or not a "
                                               f"name (letters, digits and ._+~-): {name!r}")
        options: dict[str, str | int | float | bool] = {}
        for key, value in table.items():
            if key not in _NETWORK_KEYS:
                raise self.error(path + (key,), f"network {name!r}: {key}: unknown key (known: "
                                                f"{', '.join(sorted(_NETWORK_KEYS))})")
            if key in _NETWORK_FLAGS:
                if not isinstance(value, bool):
                    raise self.error(path + (key,), f"network {name!r}: {key}: must be true "
                                                    f"or false, not {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise self.error(path + (key,), f"network {name!r}: {key}: must be a string "
                                                f"or a number, not {value!r}")
            if key != "name":
                options[key] = str(self.base_dir / value) if key in _NETWORK_PATHS else value
        return NetworkSection(name, options, self.locator.line(path))

    # -- [agent] ---------------------------------------------------------------------------
    def agent(self, table: Any) -> AgentSection:
        if not isinstance(table, dict):
            raise self.error(("agent",), "[agent] must be a table")
        for key in table:
            if key not in _AGENT_KEYS:
                raise self.error(("agent", key), f"[agent] {key}: unknown key (known: "
                                                  f"{', '.join(sorted(_AGENT_KEYS))})")
        agent = AgentSection()

        def fail(key: str, message: str) -> ConfigError:
            return self.error(("agent", key), f"[agent] {key}: {message}")

        def text(key: str, kind: Any | None = None) -> str | None:
            value = table.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                raise fail(key, f"must be a non-empty string, not {value!r}")
            if kind is not None:
                try:
                    return kind.check(value)
                except ValueError as exc:
                    raise fail(key, str(exc)) from None
            return value

        def number(key: str, default: float, low: float, high: float, integer: bool = True):
            value = table.get(key, default)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not low <= value <= high:
                raise fail(key, f"must be {'an integer' if integer else 'a number'} in "
                                f"{low:g}..{high:g}, not {value!r}")
            return value

        server = text("server")
        listed = table.get("servers", [])
        if not isinstance(listed, list) or not all(isinstance(v, str) and v for v in listed):
            raise fail("servers", f"must be a list of servers (\"HOST[:PORT]\"), not {listed!r}")
        addresses = []
        given = ([("server", server)] if server is not None else []) + \
            [("servers", value) for value in listed]
        for key, value in given:
            try:
                address = parse_server(value)
            except ValueError as exc:
                raise fail(key, str(exc)) from None
            if address not in addresses:
                addresses.append(address)
        implied = None
        if addresses:
            server = server if server is not None else listed[0]  # as written, for messages
            agent.server, implied = str(addresses[0]), addresses[0].transport
        elif self.side == "answer":
            raise self.error(("agent",), "[agent] server: missing (the SIP server, HOST[:PORT], "
                                         "or servers = [...])")
        agent.user = text("user", Token(64))
        if agent.user is None and self.side == "answer":
            raise self.error(("agent",), "[agent] user: missing (our name at the SIP server)")
        agent.password = text("password")
        credentials = text("credentials")
        if credentials is not None:
            if agent.password is not None:
                raise fail("credentials", "give password or credentials, not both")
            agent.credentials = self.base_dir / credentials
        agent.auth_user = text("auth_user")
        agent.display_name = text("display_name")
        transport = (text("transport") or implied or "udp").lower()
        if transport not in TRANSPORTS:
            raise fail("transport", f"must be \"udp\", \"tcp\" or \"tls\", not {transport!r}")
        if implied and transport != implied:
            raise fail("transport", f"{transport!r}, but server {server!r} means {implied!r}")
        agent.transport = transport
        try:
            agent.servers = extra_servers(addresses, transport)
        except ValueError as exc:
            raise fail("servers", f"{exc} (every server takes the same transport)") from None
        agent.bind = text("bind", IPAddress(unicast=False)) or "0.0.0.0"
        agent.sip_port = number("sip_port", 0, 0, 65535)
        agent.advertise = text("advertise", IPAddress())
        agent.expires = number("expires", 3600, 60, 86400)
        agent.register_timeout = float(number("register_timeout", 10.0, 0.1, 600, False))
        agent.grace = float(number("grace", 5.0, 0.1, 600, False))
        try:
            agent.keepalive = check_interval(table.get("keepalive", DEFAULT_INTERVAL))
        except ValueError as exc:
            raise fail("keepalive", str(exc)) from None
        agent.max_sessions = number("max_sessions", DEFAULT_DAEMON_MAX, 1, 1_000_000)
        agent.default_service = text("default_service")
        for key in ("control_socket", "state_dir"):
            value = text(key)
            if value is not None:
                setattr(agent, key, self.base_dir / value)
        files = {key: self.base_dir / value for key in ("ca_file", "cert", "key")
                 if (value := text(key)) is not None}
        agent.tls = TLSClient(**files, server_name=text("tls_server_name", Host()))
        if transport != "tls" and (files or agent.tls.server_name):
            key = next(iter(files), "tls_server_name")
            raise fail(key, 'only for TLS: add transport = "tls" or give server = "sips:HOST"')
        ice, portmap = table.get("ice", True), table.get("portmap", True)
        for key, value in (("ice", ice), ("portmap", portmap)):
            if not isinstance(value, bool):
                raise fail(key, f"must be true or false, not {value!r}")
        try:
            stun = text("stun")
            stun_server = parse_turn_uri(f"turn:{stun}")[:2] if stun else None
        except ValueError as exc:
            raise fail("stun", f"HOST[:PORT]: {exc}") from None
        try:
            turn = text("turn")
            turn_server = parse_turn_uri(turn) if turn else None
        except ValueError as exc:
            raise fail("turn", str(exc)) from None
        agent.ice = IceOptions(enabled=ice, stun=stun_server,
                               turn=turn_server[:2] if turn_server else None,
                               turn_transport=turn_server[2] if turn_server else "auto",
                               consent_timeout=float(number("consent_timeout", 30.0, 0, 3600,
                                                            False)),
                               portmap=portmap)
        return agent

    # -- [allocators.NAME] -------------------------------------------------------------------
    def allocators(self, tables: Any) -> dict[str, Allocator]:
        if not isinstance(tables, dict):
            raise self.error(("allocators",), "[allocators] must hold [allocators.NAME] tables")
        result: dict[str, Allocator] = {}
        for name, table in tables.items():
            path = ("allocators", name)

            def fail(key: str | None, message: str) -> ConfigError:
                return self.error(path + ((key,) if key else ()),
                                  f"allocator {name!r}: {(key + ': ') if key else ''}{message}")

            if not NAME_RE.fullmatch(name):
                raise fail(None, "a name is letters, digits and ._+~-")
            if not isinstance(table, dict):
                raise fail(None, "must be a table")
            kind = table.get("type")
            if kind == "ports":
                unknown = set(table) - {"type", "range", "protocols"}
                if unknown:
                    raise fail(sorted(unknown)[0], "unknown key (known: type, range, protocols)")
                match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", str(table.get("range", "")))
                if not match or not 1 <= int(match[1]) <= int(match[2]) <= 65535:
                    raise fail("range", f"must be \"FIRST-LAST\" within 1-65535, not "
                                        f"{table.get('range')!r}")
                protocols = table.get("protocols", ["tcp"])
                if isinstance(protocols, str):
                    protocols = [protocols]
                if not isinstance(protocols, list) or not protocols or \
                        not set(protocols) <= {"tcp", "udp"} or len(set(protocols)) != len(protocols):
                    raise fail("protocols", f"must be [\"tcp\"], [\"udp\"] or [\"tcp\", \"udp\"], "
                                            f"not {protocols!r}")
                result[name] = PortRange(name, int(match[1]), int(match[2]), tuple(protocols))
            elif kind == "addresses":
                unknown = set(table) - {"type", "pool"}
                if unknown:
                    raise fail(sorted(unknown)[0], "unknown key (known: type, pool)")
                pool = table.get("pool")
                try:
                    network = ipaddress.ip_network(str(pool), strict=True)
                    result[name] = AddressPool(name, str(network))
                except ValueError as exc:
                    raise fail("pool", f"{pool!r} is not a network (CIDR such as "
                                       f"\"10.77.0.0/24\"): {exc}") from None
            else:
                raise fail("type", f"must be \"ports\" or \"addresses\", not {kind!r}")
        return result

    # -- [[service]] --------------------------------------------------------------------------
    def service(self, index: int, table: Any, allocators: Mapping[str, Allocator],
                agent: AgentSection) -> Service:
        path: tuple = (("service", index),)
        name = table.get("name") if isinstance(table, dict) else None
        label = f"service {name!r}" if isinstance(name, str) else f"service #{index + 1}"

        def fail(key: str | None, message: str) -> ConfigError:
            keys = tuple(key.split(".")) if key else ()
            return self.error(path + keys, f"{label}: {(key + ': ') if key else ''}{message}")

        if not isinstance(table, dict):
            raise fail(None, "must be a table")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise fail("name", f"missing or not a name (letters, digits and ._+~-): {name!r}")
        kind_name = table.get("kind", "exec")
        try:
            kind = get_kind(kind_name if isinstance(kind_name, str) else repr(kind_name))
        except LookupError as exc:
            raise fail("kind", str(exc)) from None
        allow_raw = table.get("allow")
        if allow_raw is None:
            allow_raw = [f"*@{agent.domain_host}"] if agent.domain_host else ["*"]
        if isinstance(allow_raw, str):
            allow_raw = [allow_raw]
        if not isinstance(allow_raw, list) or not allow_raw:
            raise fail("allow", "must be a list of caller patterns, e.g. [\"alice@example.com\", "
                                "\"*@10.0.0.*\"] or [\"*\"]")
        try:
            allow = tuple(compile_pattern(p, agent.domain_host) for p in allow_raw)
        except ValueError as exc:
            raise fail("allow", str(exc)) from None
        max_sessions = table.get("max_sessions", DEFAULT_MAX_SESSIONS)
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or \
                not 1 <= max_sessions <= 1_000_000:
            raise fail("max_sessions", f"must be a positive integer, not {max_sessions!r}")
        description = table.get("description", "")
        if not isinstance(description, str):
            raise fail("description", "must be a string")
        call = table.get("call", {})
        if not isinstance(call, dict):
            raise fail("call", "must be a table ([service.call])")
        options = {k: v for k, v in table.items() if k not in _SERVICE_COMMON}
        for key in options:
            if key not in kind.options:
                known = ", ".join(sorted(_SERVICE_COMMON | set(kind.options)))
                raise fail(key, f"unknown key for kind {kind.name!r} (known: {known})")
        for key in call:
            if key not in kind.call_options:
                raise fail(f"call.{key}", f"unknown key for kind {kind.name!r} (known: "
                                          f"{', '.join(kind.call_options) or 'none'})")
        profile = kind(name, allocators=allocators, state_dir=agent.state_dir, side=self.side)
        try:
            profile.configure(options, call)
            if self.side == "answer":
                profile.check()
        except ConfigValueError as exc:
            raise fail(exc.key, exc.message) from None
        except (ProfileError, ValueError) as exc:
            raise fail(None, str(exc)) from None
        return Service(name=name, kind=kind.name, profile=profile, allow=allow,
                       max_sessions=max_sessions, line=self.locator.line(path),
                       description=description, table=table)
