"""The paper's VPN profile with OpenVPN 2.6, without a pre-shared key.

The answering side runs OpenVPN in point-to-point TLS server mode on its
application port; the caller runs the TLS client towards ``a=IP4``/``a=PORT``.
The tunnel addresses are the paper's ``a=VPN_LOCAL_ADDR``/``a=VPN_REMOTE_ADDR``
(the caller uses them swapped, like the paper's client wrapper). Instead of the
paper's static key (deprecated in OpenVPN 2.6), each host has a self-signed
certificate and each side sends its SHA-256 fingerprint in ``a=fingerprint``
(RFC 8122); OpenVPN checks the peer's certificate with ``--peer-fingerprint``.
The static-key setup of the paper remains available through `sip_app` and the
wrapper scripts in examples/paper/.

`OpenVPNProfile` runs a session of `sipmesh serve/call --app openvpn`;
`OpenVPNService` is the daemon's ``kind = "openvpn"``: the same, with the UDP port
and the tunnel address pair allocated per session.

Each session gets its own configuration file in a private directory that is
removed when OpenVPN has stopped. All values in it were validated as their
types (addresses, port, hex fingerprint), so none can add a line or an option.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sipmesh.agent.errors import AgentError, Exit, ProfileError
from sipmesh.agent.handover import KEEPALIVE, UdpEndpoint
from sipmesh.agent.params import Fingerprint, Param
from sipmesh.agent.ports import pick_port
from sipmesh.agent.profile import (COMMON_OFFER, IP_PARAMS, PORT, AppProfile, Plan, SessionInfo,
                                   endpoint_env)
from sipmesh.agent.supervisor import ChildSpec, resolve_program
from sipmesh.agent.certs import HostCertificate, default_state_dir, host_certificate
from sipmesh.apps.exec import DEFAULT_APP_PORT, DEFAULT_VPN_LOCAL, VPN_LOCAL, VPN_REMOTE, vpn_pair
from sipmesh.daemon.service import ConfigValueError, ServiceProfile

log = logging.getLogger("sipmesh.apps.openvpn")

FINGERPRINT = Param("fingerprint", Fingerprint(("sha-256",)))


class OpenVPNProfile(AppProfile):
    name = "openvpn"
    media = "application/vpn"
    proto = "OpenVPN"
    transport = "udp"
    through_agent = True   # its peer cannot change as it runs: via the agent it follows moves
    offer_params = COMMON_OFFER + (FINGERPRINT,)
    answer_params = IP_PARAMS + (PORT, VPN_LOCAL, VPN_REMOTE, FINGERPRINT)

    def __init__(self, *, openvpn: str = "openvpn", state_dir: Path | None = None,
                 app_port: int = DEFAULT_APP_PORT, vpn_local: str = DEFAULT_VPN_LOCAL,
                 vpn_remote: str | None = None, extra_args: list[str] | None = None,
                 ping: int = 10, ping_exit: int = 30, verb: int = 3) -> None:
        if not 0 < ping <= KEEPALIVE:   # NATs forget a silent flow (agent/handover.py)
            raise AgentError(f"OpenVPN's ping must be 1..{KEEPALIVE:g} s", Exit.USAGE)
        self.openvpn = openvpn
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.app_port = app_port
        self.vpn_local, self.vpn_remote = vpn_pair(vpn_local, vpn_remote)
        self.extra_args = list(extra_args or [])
        self.ping, self.ping_exit, self.verb = ping, ping_exit, verb
        self.cert: HostCertificate | None = None

    def check(self) -> None:
        self.openvpn = resolve_program(self.openvpn)
        if not os.path.exists("/dev/net/tun"):
            raise ProfileError("/dev/net/tun is missing: OpenVPN cannot make a tunnel here "
                               "(a container needs --device /dev/net/tun and CAP_NET_ADMIN)",
                               Exit.PROGRAM)
        self.cert = host_certificate(self.state_dir / "openvpn")
        if os.geteuid() != 0:
            log.warning("not running as root: OpenVPN needs CAP_NET_ADMIN to create its tunnel")

    def _certificate(self) -> HostCertificate:
        if self.cert is None:
            self.cert = host_certificate(self.state_dir / "openvpn")
        return self.cert

    def offer(self, info: SessionInfo) -> dict[str, str]:
        return dict(super().offer(info), fingerprint=self._certificate().fingerprint)

    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        port = pick_port(self.app_port, ("udp",))
        cert = self._certificate()
        attributes = {"IP6" if ":" in info.local_ip else "IP4": info.local_ip,
                      "PORT": str(port), "VPN_LOCAL_ADDR": self.vpn_local,
                      "VPN_REMOTE_ADDR": self.vpn_remote, "fingerprint": cert.fingerprint}
        return Plan(attributes=attributes, child=self._server_child(info, attributes, offer),
                    port=port, path_port=port, context={"offer": offer})

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        """On a path: the plan's program with the path's port and peer (its configuration
        directory replaced)."""
        if plan.child.cleanup is not None:
            plan.child.cleanup()
        return self._server_child(info, plan.attributes, plan.context["offer"])

    def _server_child(self, info: SessionInfo, attributes: dict[str, str],
                      offer: dict[str, str]) -> ChildSpec:
        """The TLS server on our a=PORT, taking the first peer that comes; on a path, on
        its port and towards its remote end."""
        lines = [*self._path_lines(info.path, attributes["PORT"]),
                 f"ifconfig {attributes['VPN_LOCAL_ADDR']} {attributes['VPN_REMOTE_ADDR']}",
                 "tls-server", "dh none", "float"]
        return self._child(info, "server", lines, offer["fingerprint"], attributes,
                           remote_ip=offer.get("IP4") or offer.get("IP6"),
                           port=attributes["PORT"])

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        remote = answer.get("IP4") or answer["IP6"]
        path = info.path
        lines = [f"remote {remote} {answer['PORT']}", "nobind"] if path is None \
            else [*self._path_lines(path, answer["PORT"]), "float"]
        lines += [f"ifconfig {answer['VPN_REMOTE_ADDR']} {answer['VPN_LOCAL_ADDR']}",
                  "tls-client"]
        return self._child(info, "client", lines, answer["fingerprint"], answer,
                           remote_ip=remote, port=answer["PORT"])

    @staticmethod
    def _path_lines(path: UdpEndpoint | None, port: str) -> list[str]:
        """Where OpenVPN binds and sends: on a path (agent/handover.py) the port ICE
        checked and the peer's end of it; without one the answering side's a=PORT."""
        if path is None:
            return [f"lport {port}"]
        local = ["local 127.0.0.1"] if path.proxied else []   # the agent's end is there
        return [*local, f"lport {path.local_port}", f"remote {path.remote_ip} {path.remote_port}"]

    def _child(self, info: SessionInfo, role: str, role_lines: list[str], peer_fingerprint: str,
               values: dict[str, str], *, remote_ip: str | None, port: str) -> ChildSpec:
        cert = self._certificate()
        run_dir = self.state_dir / "run"
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            directory = Path(tempfile.mkdtemp(prefix=f"openvpn-{role}-", dir=run_dir))
            config = directory / "openvpn.conf"
            config.write_text(self.config_text(role_lines, cert, peer_fingerprint))
        except OSError as exc:
            raise ProfileError(f"cannot write the OpenVPN configuration: {exc}") from None
        env = endpoint_env(values, role=role, info=info, remote_ip=remote_ip, port=port)
        return ChildSpec(argv=[self.openvpn, "--config", str(config), *self.extra_args], env=env,
                         cleanup=lambda: shutil.rmtree(directory, ignore_errors=True))

    def config_text(self, role_lines: list[str], cert: HostCertificate, peer_fingerprint: str) -> str:
        hexpairs = Fingerprint(("sha-256",)).check(peer_fingerprint).split(" ", 1)[1]
        lines = ["# written by sipmesh for one session; removed when the session ends",
                 "dev tun", "proto udp", *role_lines,
                 f"cert {_path(cert.cert)}", f"key {_path(cert.key)}",
                 f"peer-fingerprint {hexpairs}",
                 "disable-dco", f"ping {self.ping}", f"ping-exit {self.ping_exit}",
                 f"verb {self.verb}"]
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ProfileError(f"refusing a configuration line with a line break: {line!r}")
        return "\n".join(lines) + "\n"


def _path(path: Path) -> str:
    """A file name for an OpenVPN config line (quoted when it has spaces)."""
    text = str(path)
    if any(c in text for c in '"\\\n\r'):
        raise ProfileError(f"cannot put this path in an OpenVPN configuration: {text!r}")
    return f'"{text}"' if " " in text or "\t" in text else text


class OpenVPNService(ServiceProfile):
    """kind = "openvpn": an OpenVPNProfile per session, with an allocated UDP port
    (``port = ALLOCATOR``) and tunnel address pair (``addresses = POOL``)."""

    name = "openvpn"
    media = OpenVPNProfile.media
    proto = OpenVPNProfile.proto
    transport = OpenVPNProfile.transport
    through_agent = OpenVPNProfile.through_agent
    offer_params = OpenVPNProfile.offer_params
    answer_params = OpenVPNProfile.answer_params
    options = ("port", "addresses", "openvpn", "extra_args")

    def configure(self, options: dict[str, Any], call: dict[str, Any]) -> None:
        self.port_allocator = self.allocator_option(options, "port", "ports")
        self.pool = self.allocator_option(options, "addresses", "addresses", required=True)
        if ":" in str(getattr(self.allocators[self.pool], "network", "")):
            raise ConfigValueError("addresses", "OpenVPN's tunnel addresses are IPv4: "
                                                "use an IPv4 pool")
        self.openvpn = self.option_str(options, "openvpn", "openvpn")
        extra = options.get("extra_args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise ConfigValueError("extra_args", "must be a list of strings")
        self.extra_args = extra
        self._caller: OpenVPNProfile | None = None

    def _profile(self, port: int = DEFAULT_APP_PORT, local: str = DEFAULT_VPN_LOCAL,
                 remote: str | None = None) -> OpenVPNProfile:
        return OpenVPNProfile(openvpn=self.openvpn, state_dir=self.state_dir, app_port=port,
                              vpn_local=local, vpn_remote=remote, extra_args=self.extra_args)

    def check(self) -> None:
        probe = self._profile()
        probe.check()  # the binary, /dev/net/tun, the host certificate
        self.openvpn = probe.openvpn

    def offer(self, info: SessionInfo) -> dict[str, str]:
        self._caller = self._caller or self._profile()
        return dict(self._caller.offer(info), service=self.service_name)

    async def answer(self, info: SessionInfo, offer: dict[str, str]) -> Plan:
        lease = self.lease_of(info)
        port = lease.port(self.port_allocator, ("udp",))
        local, remote = lease.pair(self.pool)
        return await self._profile(port, local, remote).answer(info, offer)

    def answer_child(self, info: SessionInfo, plan: Plan) -> ChildSpec:
        return self._profile().answer_child(info, plan)   # the plan holds the session's values

    def caller_child(self, info: SessionInfo, offer: dict[str, str],
                     answer: dict[str, str]) -> ChildSpec:
        self._caller = self._caller or self._profile()
        return self._caller.caller_child(info, offer, answer)
