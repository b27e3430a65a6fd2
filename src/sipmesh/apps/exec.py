"""Any program as the application of a session: `sipmesh serve`/`call`/`sip_app`
(`ExecProfile`) and the daemon's ``kind = "exec"`` (`ExecService`).

ExecProfile: the answering side picks its application port (the configured one,
else the next free one, as the prototype's ``-v``) and sends ``a=IP4`` and
``a=PORT``; with `vpn` set (the paper's VPN profile, `sip_app`) also
``a=VPN_LOCAL_ADDR`` and ``a=VPN_REMOTE_ADDR``. Both sides start their program with:

* ``SIPMESH_*`` environment variables (ROLE, CALL_ID, PEER, LOCAL_IP, REMOTE_IP,
  PORT, and one per negotiated value, e.g. SIPMESH_VPN_LOCAL_ADDR; with a path
  also LOCAL_PORT, REMOTE_PORT and PATH);
* ``{NAME}`` placeholders in the arguments replaced by validated values
  (PORT, IP4, LOCAL_IP, REMOTE_IP, LOCAL_PORT, REMOTE_PORT, VPN_LOCAL_ADDR,
  VPN_REMOTE_ADDR), in the daemon's template language (daemon/templates.py),
  except that a name it does not know stays as written (the braces may be the
  program's own);
* with `append_args`, the prototype's arguments appended after the user's:
  answering side ``PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR``, calling side
  ``IP4 PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR``.

The contract, per transport (``transport``, ``--app-transport``, a service's
``transport`` key), the same in the prototype's names and the new ones:

``udp`` (the default; the prototype's OpenVPN)
    The program binds UDP ``{LOCAL_PORT}`` and exchanges datagrams with
    ``{REMOTE_IP}:{REMOTE_PORT}``. The answering side's ``{PORT}`` is its
    ``{LOCAL_PORT}``; the calling side's ``{IP4}``/``{PORT}`` are ``{REMOTE_IP}``/
    ``{REMOTE_PORT}``. With ICE on both sides these are the path ICE checked
    (agent/handover.py): direct through both NATs, or through the TURN relay (where our
    side relays, ``{REMOTE_IP}:{REMOTE_PORT}`` is sipmesh's proxy on 127.0.0.1).
    Binding ``{LOCAL_PORT}`` matters behind a NAT: it is the port the checks opened.
    The program sends something at least every 15 s (a heartbeat), because NATs forget
    silent flows and the session ends when nothing came from the peer for 30 s.
    Both programs start once the path is chosen, at about the same time: a datagram
    sent before the peer's program is up may be lost, so send again (UDP programs do).
    Against a peer without ICE the values are the paper's: the answering side's
    ``a=IP4``/``a=PORT`` (``{LOCAL_PORT}`` 0 on the calling side: any port).
``tcp``
    The answering program listens on TCP ``{PORT}`` (on 127.0.0.1 or any address), the
    calling one connects to ``{IP4}:{PORT}`` (``{REMOTE_IP}:{REMOTE_PORT}``), as in the
    prototype. With ICE on both sides that address is sipmesh's, on 127.0.0.1 of the
    calling host: each connection made there is carried as a QUIC stream over the path
    ICE checked (agent/streams.py: direct through both NATs, or through the TURN relay)
    and connected, on the answering host, to 127.0.0.1:``{PORT}``. Half-closes and
    resets travel; the peers are authenticated by the certificates whose fingerprints
    the SDP carries. Both programs start once the path is chosen; a connection made
    before the answering program listens is retried for 10 s. Against a peer without
    ICE the values are the paper's: ``a=IP4``/``a=PORT``, the answering program started
    before the 200 OK.

ExecService, ``kind = "exec"``: any program, with its parameters declared in the
daemon's configuration file.

    [[service]]
    name = "echo"
    kind = "exec"
    answer.command = ["socat", "TCP-LISTEN:{PORT},reuseaddr", "EXEC:cat"]
    call.command = ["socat", "STDIO", "TCP:{REMOTE_IP}:{PORT}"]
    [service.params.PORT]
    type = "port"
    from = "allocator"
    allocator = "tcp"

Where a parameter's value comes from (``from``):

* ``allocator`` -- the answering side allocates it (``allocator = NAME``; for an
  address pool also ``part = "local"`` or ``"remote"``) and sends it in the 200 OK;
* ``config`` -- the answering side's ``value``, sent in the 200 OK;
* ``peer`` -- the caller sends it in the INVITE (``--param NAME=VALUE``, else its
  ``value``, else from its ``allocator``); the answering side validates it, and
  uses ``value`` when the caller sent none;
* ``local`` -- each side's own value (``value`` or ``allocator``; the caller may
  set it with ``--param``), never sent.

Both programs get every value as ``{NAME}`` in their argv and env templates and
as ``SIPMESH_NAME`` in their environment, with the built-in variables of
`templates.BUILTINS`.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from sipmesh.agent.errors import AgentError, Exit, ProfileError
from sipmesh.agent.params import (TYPES, Base64Key, Choice, Fingerprint, Integer, IPAddress,
                                  IPv4, IPv6, Param, ParamError, ParamType, Port, Token,
                                  param_type)
from sipmesh.agent.ports import pick_port
from sipmesh.agent.profile import (COMMON_OFFER, IP_PARAMS, PORT, AppProfile, Plan, SessionInfo,
                                   endpoint_env, offered_ip, path_values)
from sipmesh.agent.supervisor import ChildSpec, resolve_program
from sipmesh.daemon import templates
from sipmesh.daemon.service import ConfigValueError, ServiceProfile

TRANSPORTS = ("udp", "tcp")
VPN_LOCAL = Param("VPN_LOCAL_ADDR", IPv4())
VPN_REMOTE = Param("VPN_REMOTE_ADDR", IPv4())
DEFAULT_VPN_LOCAL = "192.168.234.1"
DEFAULT_APP_PORT = 8000


def next_address(address: str) -> str:
    """The prototype's default remote tunnel address: local + 1 (last octet below 255)."""
    ip = ipaddress.IPv4Address(address)
    if int(ip) & 0xFF >= 255:
        raise ValueError(f"cannot derive the remote tunnel address from {address} "
                         "(last octet 255): give it explicitly")
    return str(ip + 1)


def vpn_pair(local: str, remote: str | None) -> tuple[str, str]:
    """The tunnel address pair (ours, the peer's), the peer's local + 1 by default;
    AgentError (usage) when one is not an IPv4 address or there is no local + 1."""
    try:
        local = VPN_LOCAL.parse(local)
        return local, VPN_REMOTE.parse(remote or next_address(local))
    except ValueError as exc:
        raise AgentError(str(exc), Exit.USAGE) from None


def substitute(args: list[str], values: dict[str, str]) -> list[str]:
    """Replace {NAME} by values[NAME] (validated values only); unknown names stay as they are."""
    return [templates.render(a, values, strict=False) for a in args]


class ExecProfile(AppProfile):
    """Runs `argv` on each side with the negotiated values."""

    name = "exec"

    def __init__(self, argv: list[str], *, app_port: int = DEFAULT_APP_PORT,
                 port_protocols: tuple[str, ...] = ("udp", "tcp"),
                 vpn: tuple[str, str] | None = None, append_args: bool = False,
                 media: str = "application", proto: str = "sipmesh",
                 transport: str = "udp") -> None:
        if not argv:
            raise AgentError("no program given (put it after --)", Exit.USAGE)
        if transport not in TRANSPORTS:
            raise AgentError(f"the program's transport is udp or tcp, not {transport!r}",
                             Exit.USAGE)
        self.transport = transport  # type: ignore[misc]
        self.argv = list(argv)
        self.app_port = app_port
        self.port_protocols = port_protocols
        self.vpn = vpn
        self.append_args = append_args
        self.media = media  # type: ignore[misc]
        self.proto = proto  # type: ignore[misc]
        self.answer_params = IP_PARAMS + (PORT,) + ((VPN_LOCAL, VPN_REMOTE) if vpn else ())
        self.program = argv[0]
        if vpn is not None:
            for param, value in zip((VPN_LOCAL, VPN_REMOTE), vpn):
                param.parse(value)

    def check(self) -> None:
        self.program = resolve_program(self.argv[0])

    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        port = pick_port(self.app_port, self.port_protocols)
        ip_name = "IP6" if ":" in info.local_ip else "IP4"
        attributes = {ip_name: info.local_ip, "PORT": str(port)}
        if self.vpn is not None:
            attributes["VPN_LOCAL_ADDR"], attributes["VPN_REMOTE_ADDR"] = self.vpn
        return Plan(attributes=attributes, port=port, path_port=port, context={"offer": offer},
                    child=self._server_child(info, attributes, offer))

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        return self._server_child(info, plan.attributes, plan.context["offer"])

    def _server_child(self, info: SessionInfo, attributes: dict[str, str],
                      offer: dict[str, str]) -> ChildSpec:
        """PORT is the port to bind: the one in our a=PORT, or the path's (the same port
        unless it was taken); REMOTE_IP is the caller's a=IP4, or the path's."""
        path = info.path
        attributes = dict(attributes)
        if path is not None:
            attributes["PORT"] = str(path.local_port)
        port = attributes["PORT"]
        remote_ip = path.remote_ip if path else offered_ip(offer)
        values = dict(attributes, LOCAL_IP=info.local_ip, REMOTE_IP=remote_ip or "",
                      LOCAL_PORT=port, REMOTE_PORT="0")
        values.update(path_values(path))
        appended = [port] + (list(self.vpn) if self.vpn else [])
        return self._spec(info, values, appended, remote_ip, port, attributes, "server")

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        """IP4 (or IP6) and PORT say where the peer's program is: its a=IP4/a=PORT, or the
        path's remote end (the same on paths the paper's values would work on)."""
        path = info.path
        answer = dict(answer)
        if path is not None:
            answer.pop("IP4", None)
            answer.pop("IP6", None)
            answer["IP6" if ":" in path.remote_ip else "IP4"] = path.remote_ip
            answer["PORT"] = str(path.remote_port)
        remote_ip = offered_ip(answer) or ""
        values = dict(answer, LOCAL_IP=info.local_ip, REMOTE_IP=remote_ip, LOCAL_PORT="0",
                      REMOTE_PORT=answer["PORT"])
        values.update(path_values(path))
        values.setdefault("IP4", remote_ip)
        appended = [remote_ip, answer["PORT"]]
        if self.vpn is not None:
            appended += [answer["VPN_LOCAL_ADDR"], answer["VPN_REMOTE_ADDR"]]
        return self._spec(info, values, appended, remote_ip, answer["PORT"], answer, "client")

    def _spec(self, info: SessionInfo, values: dict[str, str], appended: list[str],
              remote_ip: str | None, port: str, negotiated: dict[str, str], role: str) -> ChildSpec:
        """argv with placeholders and appended values; env with SIPMESH_* (the session's
        a= values as SIPMESH_IP4, SIPMESH_PORT, ... plus ROLE, PEER, LOCAL_IP, REMOTE_IP)."""
        argv = [self.program] + substitute(self.argv[1:], values)
        if self.append_args:
            argv += appended
        env = endpoint_env(negotiated, role=role, info=info, remote_ip=remote_ip, port=port)
        return ChildSpec(argv=argv, env=env)


# ------------------------------------------------------------------ kind = "exec"

SOURCES = ("allocator", "config", "peer", "local")
RESERVED = {"IP4", "IP6", "APP", "service", *templates.BUILTINS}
_PARAM_KEYS = {"type", "from", "value", "allocator", "part", "required", "description", "min",
               "max", "max_length", "size", "values", "algorithms"}
_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class ParamDecl:
    """One declared parameter of an exec service."""

    def __init__(self, name: str, table: Mapping[str, Any], allocators: Mapping[str, Any]) -> None:
        key = f"params.{name}"
        if not name or name[0].isdigit() or not set(name) <= _NAME_CHARS or len(name) > 64:
            raise ConfigValueError(key, "a parameter name is letters, digits and _ "
                                        "(not starting with a digit)")
        if name in RESERVED:
            raise ConfigValueError(key, f"{name!r} is reserved (built-in values: "
                                        f"{', '.join(sorted(RESERVED))})")
        if not isinstance(table, Mapping):
            raise ConfigValueError(key, "must be a table: { type = ..., from = ... }")
        unknown = set(table) - _PARAM_KEYS
        if unknown:
            raise ConfigValueError(f"{key}.{sorted(unknown)[0]}",
                                   f"unknown key (known: {', '.join(sorted(_PARAM_KEYS))})")
        self.name = name
        self.type = _make_type(key, table)
        self.source = table.get("from", "peer")
        if self.source not in SOURCES:
            raise ConfigValueError(f"{key}.from", f"must be one of {', '.join(SOURCES)}, "
                                                  f"not {self.source!r}")
        self.required = table.get("required", True)
        if not isinstance(self.required, bool):
            raise ConfigValueError(f"{key}.required", "must be true or false")
        self.value: str | None = None
        if "value" in table:
            raw = table["value"]
            if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                raise ConfigValueError(f"{key}.value", f"must be a string or integer, not {raw!r}")
            try:
                self.value = self.type.check(str(raw))
            except ValueError as exc:
                raise ConfigValueError(f"{key}.value", str(exc)) from None
        self.allocator: str | None = table.get("allocator")
        self.part: str | None = table.get("part")
        if self.source == "config" and self.value is None:
            raise ConfigValueError(f"{key}.value", "missing (from = \"config\" needs a value)")
        if self.source == "allocator" and self.allocator is None:
            raise ConfigValueError(f"{key}.allocator", "missing (from = \"allocator\" needs the "
                                                       "name of an allocator)")
        if self.allocator is not None:
            self._check_allocator(key, allocators)

    def _check_allocator(self, key: str, allocators: Mapping[str, Any]) -> None:
        if self.source not in ("allocator", "peer", "local"):
            raise ConfigValueError(f"{key}.allocator", f"not used with from = {self.source!r}")
        allocator = allocators.get(self.allocator)
        if allocator is None:
            known = ", ".join(sorted(allocators)) or "none defined"
            raise ConfigValueError(f"{key}.allocator",
                                   f"no allocator named {self.allocator!r} (allocators: {known})")
        if allocator.kind == "ports":
            if not isinstance(self.type, Port):
                raise ConfigValueError(f"{key}.type", "a port allocator gives ports: "
                                                      "type must be \"port\"")
            if self.part is not None:
                raise ConfigValueError(f"{key}.part", "only for address pools")
        else:
            if not isinstance(self.type, (IPv4, IPv6, IPAddress)):
                raise ConfigValueError(f"{key}.type", "an address pool gives addresses: type "
                                                      "must be ipv4, ipv6 or ip")
            if self.part not in ("local", "remote"):
                raise ConfigValueError(f"{key}.part", "must be \"local\" (the answering side's "
                                                      "address) or \"remote\" (the caller's)")

    @property
    def param(self) -> Param:
        return Param(self.name, self.type, required=self.required and self.value is None)

    @property
    def sent_in_answer(self) -> bool:
        return self.source in ("allocator", "config")

    def allocate(self, lease: Any, pairs: dict[str, tuple[str, str]]) -> str:
        assert self.allocator is not None
        if self.part is None:
            return str(lease.port(self.allocator))
        if self.allocator not in pairs:  # one pair per pool per session, local and remote
            pairs[self.allocator] = lease.pair(self.allocator)
        local, remote = pairs[self.allocator]
        return local if self.part == "local" else remote


def _make_type(key: str, table: Mapping[str, Any]) -> ParamType:
    name = table.get("type")
    if not isinstance(name, str):
        raise ConfigValueError(f"{key}.type", f"missing (one of: {', '.join(sorted(TYPES))}, "
                                              "choice)")
    try:
        if name == "int" and ("min" in table or "max" in table):
            return Integer(table.get("min"), table.get("max"))
        if name == "token" and "max_length" in table:
            return Token(int(table["max_length"]))
        if name == "base64key" and "size" in table:
            return Base64Key(int(table["size"]))
        if name == "fingerprint" and "algorithms" in table:
            return Fingerprint(tuple(table["algorithms"]))
        if name == "choice":
            values = table.get("values")
            if not isinstance(values, list) or not values or \
                    not all(isinstance(v, str) and v for v in values):
                raise ValueError("choice needs values = [\"a\", \"b\", ...]")
            return Choice(*values)
        return param_type(name)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigValueError(f"{key}.type", str(exc)) from None


def _command(key: str, table: Any) -> tuple[list[str] | None, dict[str, str]]:
    if table is None:
        return None, {}
    if not isinstance(table, Mapping):
        raise ConfigValueError(key, "must be a table with command = [...] and env = {...}")
    unknown = set(table) - {"command", "env"}
    if unknown:
        raise ConfigValueError(f"{key}.{sorted(unknown)[0]}", "unknown key (known: command, env)")
    command = table.get("command")
    if command is not None and (not isinstance(command, list) or not command
                                or not all(isinstance(a, str) for a in command)):
        raise ConfigValueError(f"{key}.command", "must be a non-empty list of strings "
                                                 "(the program and its arguments; no shell)")
    env = table.get("env", {})
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in env.items()):
        raise ConfigValueError(f"{key}.env", "must be a table of strings")
    for name in env:
        if not name or "=" in name or "\0" in name or not name.isascii():
            raise ConfigValueError(f"{key}.env", f"bad variable name {name!r}")
    return command, dict(env)


class ExecService(ServiceProfile):
    name = "exec"
    options = ("params", "answer", "transport")
    call_options = ("command", "env")

    def configure(self, options: dict[str, Any], call: dict[str, Any]) -> None:
        params = options.get("params", {})
        if not isinstance(params, Mapping):
            raise ConfigValueError("params", "must be a table of parameters")
        self.decls = [ParamDecl(name, table, self.allocators) for name, table in params.items()]
        self.answer_command, self.answer_env = _command("answer", options.get("answer"))
        self.call_command, self.call_env = _command("call", call or None)
        known = {d.name for d in self.decls} | set(templates.BUILTINS)
        for where, command, env in (("answer", self.answer_command, self.answer_env),
                                    ("call", self.call_command, self.call_env)):
            items = [(f"{where}.command", a) for a in command or []]
            items += [(f"{where}.env.{k}", v) for k, v in env.items()]
            for key, text in items:
                try:
                    unknown = [n for n in templates.names(text) if n not in known]
                except templates.TemplateError as exc:
                    raise ConfigValueError(key, str(exc)) from None
                if unknown:
                    raise ConfigValueError(key, f"{{{unknown[0]}}} is neither a declared "
                                                f"parameter nor a built-in "
                                                f"({', '.join(sorted(known))})")
        if command := self.call_command:
            if templates.names(command[0]):
                raise ConfigValueError("call.command", "the program itself cannot be a template")
        if self.answer_command and templates.names(self.answer_command[0]):
            raise ConfigValueError("answer.command", "the program itself cannot be a template")
        transport = options.get("transport", "udp")
        if transport not in TRANSPORTS:
            raise ConfigValueError("transport", f"must be \"udp\" or \"tcp\" (how the programs "
                                                f"talk to each other), not {transport!r}")
        self.transport = transport  # type: ignore[misc]
        self.offer_params = COMMON_OFFER + tuple(d.param for d in self.decls
                                                 if d.source == "peer")
        self.answer_params = IP_PARAMS + tuple(Param(d.name, d.type) for d in self.decls
                                               if d.sent_in_answer)
        self.settable = tuple(d.name for d in self.decls if d.source in ("peer", "local"))

    def check_answering(self) -> None:
        if not self.answer_command:
            raise ConfigValueError("answer.command", "missing: the program the answering side "
                                                     "runs")
        try:
            self.answer_program = resolve_program(self.answer_command[0])
        except ProfileError as exc:
            raise ConfigValueError("answer.command", str(exc)) from None

    def check_calling(self) -> None:
        if not self.call_command:
            raise ProfileError(f"service {self.service_name!r} has no call.command: "
                               "nothing to run on the calling side", Exit.USAGE)
        self.call_program = resolve_program(self.call_command[0])
        for decl in self.decls:
            if decl.source == "peer" and decl.required and decl.value is None \
                    and decl.allocator is None and decl.name not in self.call_values:
                raise ProfileError(f"service {self.service_name!r} needs a value for "
                                   f"{decl.name}: --param {decl.name}=VALUE", Exit.USAGE)
        for name, value in self.call_values.items():
            decl = next(d for d in self.decls if d.name == name)
            try:
                self.call_values[name] = decl.param.parse(value)
            except ParamError as exc:
                raise ProfileError(f"--param {exc}", Exit.USAGE) from None

    # -- answering side -------------------------------------------------------------------
    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        lease = self.lease_of(info)
        pairs: dict[str, tuple[str, str]] = {}
        values: dict[str, str] = {}
        for decl in self.decls:
            if decl.source == "peer":
                values[decl.name] = offer.get(decl.name, decl.value or "")
            elif decl.allocator is not None:
                values[decl.name] = decl.allocate(lease, pairs)
            else:
                values[decl.name] = decl.value or ""
        ip_name = "IP6" if ":" in info.local_ip else "IP4"
        attributes = {ip_name: info.local_ip}
        attributes.update({d.name: values[d.name] for d in self.decls if d.sent_in_answer})
        decl = self._port_decl(answered=True)
        port = int(values[decl.name]) if decl is not None else 0
        return Plan(attributes=attributes, child=self._server_child(info, values, offer),
                    port=port or 9, path_port=port, context={"values": values, "offer": offer})

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        return self._server_child(info, plan.context["values"], plan.context["offer"])

    def _server_child(self, info: SessionInfo, values: dict[str, str],
                      offer: dict[str, str]) -> ChildSpec:
        values = dict(values)
        remote_ip = offered_ip(offer)
        if info.path is not None:
            remote_ip = info.path.remote_ip
            port = self._port_decl(answered=True)
            if port is not None:      # the port the program binds: the path's
                values[port.name] = str(info.path.local_port)
        return self._spec(info, "server", values, remote_ip, self.answer_command or [],
                          self.answer_env, getattr(self, "answer_program", None))

    def _port_decl(self, *, answered: bool) -> ParamDecl | None:
        """The port the answering side sends (its program's port), if one is declared."""
        return next((d for d in self.decls if d.sent_in_answer == answered
                     and isinstance(d.type, Port)), None)

    # -- calling side ---------------------------------------------------------------------
    def _own_value(self, decl: ParamDecl, pairs: dict[str, tuple[str, str]], info: SessionInfo) -> str:
        if decl.name in self.call_values:
            return self.call_values[decl.name]
        if decl.value is not None:
            return decl.value
        if decl.allocator is not None:
            return decl.allocate(self.lease_of(info), pairs)
        return ""

    def offer(self, info: SessionInfo) -> dict[str, str]:
        attributes = super().offer(info)
        pairs: dict[str, tuple[str, str]] = {}
        self._offered: dict[str, str] = {}
        for decl in self.decls:
            if decl.source == "peer":
                value = self._own_value(decl, pairs, info)
                if value:
                    attributes[decl.name] = self._offered[decl.name] = value
        return attributes

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        pairs: dict[str, tuple[str, str]] = {}
        values: dict[str, str] = {}
        for decl in self.decls:
            if decl.sent_in_answer:
                values[decl.name] = answer.get(decl.name, "")
            elif decl.source == "peer":
                values[decl.name] = getattr(self, "_offered", {}).get(decl.name, "")
            else:
                values[decl.name] = self._own_value(decl, pairs, info)
        remote_ip = offered_ip(answer)
        if info.path is not None:
            remote_ip = info.path.remote_ip
            port = self._port_decl(answered=True)
            if port is not None:      # where the peer's program is: the path's remote end
                values[port.name] = str(info.path.remote_port)
        spec = self._spec(info, "client", values, remote_ip, self.call_command or [],
                          self.call_env, getattr(self, "call_program", None))
        spec.cleanup = self.release_caller_lease
        return spec

    def _spec(self, info: SessionInfo, role: str, values: dict[str, str], remote_ip: str | None,
              command: list[str], env_templates: dict[str, str], program: str | None) -> ChildSpec:
        if not command:
            raise ProfileError(f"service {self.service_name!r} has no command for the "
                               f"{'answering' if role == 'server' else 'calling'} side")
        context = dict(values, LOCAL_IP=info.local_ip, REMOTE_IP=remote_ip or "",
                       CALL_ID=info.call_id, PEER=info.peer, LOCAL_USER=info.local_user,
                       SERVICE=self.service_name, ROLE=role, LOCAL_PORT="0", REMOTE_PORT="0",
                       PATH="")
        context.update(path_values(info.path))
        argv = [program or command[0]] + [templates.render(a, context) for a in command[1:]]
        port = next((values[d.name] for d in self.decls if isinstance(d.type, Port)), None)
        env = endpoint_env(values, role=role, info=info, remote_ip=remote_ip, port=port)
        env["SIPMESH_SERVICE"] = self.service_name
        env.update({k: templates.render(v, context) for k, v in env_templates.items()})
        return ChildSpec(argv=argv, env=env)

