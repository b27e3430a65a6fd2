"""Any program as the application of a session (and the paper's VPN profile).

The answering side picks its application port (the configured one, else the
next free one, as the prototype's ``-v``) and sends ``a=IP4`` and ``a=PORT``; with
`vpn` set (the paper's VPN profile, `sip_app`) also ``a=VPN_LOCAL_ADDR`` and
``a=VPN_REMOTE_ADDR``. Both sides start their program with:

* ``SIPMESH_*`` environment variables (ROLE, CALL_ID, PEER, LOCAL_IP, REMOTE_IP,
  PORT, and one per negotiated value, e.g. SIPMESH_VPN_LOCAL_ADDR);
* ``{NAME}`` placeholders in the arguments replaced by validated values
  (PORT, IP4, LOCAL_IP, REMOTE_IP, VPN_LOCAL_ADDR, VPN_REMOTE_ADDR);
* with `append_args`, the prototype's arguments appended after the user's:
  answering side ``PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR``, calling side
  ``IP4 PORT VPN_LOCAL_ADDR VPN_REMOTE_ADDR`` (values as received).
"""

from __future__ import annotations

import ipaddress
import re

from sipmesh.agent.errors import AgentError, Exit
from sipmesh.agent.params import IPv4, Param
from sipmesh.agent.ports import pick_port
from sipmesh.agent.profile import (IP_PARAMS, PORT, AppProfile, Plan, SessionInfo, endpoint_env,
                                   offered_ip)
from sipmesh.agent.supervisor import ChildSpec, resolve_program

VPN_LOCAL = Param("VPN_LOCAL_ADDR", IPv4())
VPN_REMOTE = Param("VPN_REMOTE_ADDR", IPv4())
DEFAULT_VPN_LOCAL = "192.168.234.1"
DEFAULT_APP_PORT = 8000

_PLACEHOLDER = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")


def next_address(address: str) -> str:
    """The prototype's default remote tunnel address: local + 1 (last octet below 255)."""
    ip = ipaddress.IPv4Address(address)
    if int(ip) & 0xFF >= 255:
        raise ValueError(f"cannot derive the remote tunnel address from {address} "
                         "(last octet 255): give it explicitly")
    return str(ip + 1)


def substitute(args: list[str], values: dict[str, str]) -> list[str]:
    """Replace {NAME} by values[NAME] (validated values only); unknown names stay as they are."""
    return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in args]


class ExecProfile(AppProfile):
    """Runs `argv` on each side with the negotiated values."""

    name = "exec"

    def __init__(self, argv: list[str], *, app_port: int = DEFAULT_APP_PORT,
                 port_protocols: tuple[str, ...] = ("udp", "tcp"),
                 vpn: tuple[str, str] | None = None, append_args: bool = False,
                 media: str = "application", proto: str = "sipmesh") -> None:
        if not argv:
            raise AgentError("no program given (put it after --)", Exit.USAGE)
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
        remote_ip = offered_ip(offer)
        values = dict(attributes, LOCAL_IP=info.local_ip, REMOTE_IP=remote_ip or "")
        appended = [str(port)] + (list(self.vpn) if self.vpn else [])
        return Plan(attributes=attributes, port=port,
                    child=self._spec(info, values, appended, remote_ip, str(port), attributes,
                                     "server"))

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        remote_ip = offered_ip(answer) or ""
        values = dict(answer, LOCAL_IP=info.local_ip, REMOTE_IP=remote_ip)
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
