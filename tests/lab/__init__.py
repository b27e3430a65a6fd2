"""Reusable test lab: real SIP software (Kamailio, SIPp, and sipmesh's own programs as
processes), network namespaces, and the one bounded wait (``wait_for``/``wait_for_async``).

Import helpers with ``from tests.lab import ...``; the pytest fixtures live in
``tests.lab.fixtures`` (enabled by ``pytest_plugins`` in ``tests/conftest.py``). sipmesh's
broker and agents as processes: ``tests.lab.broker``, ``tests.lab.agents``.
"""

from sipmesh.lab.coturn import DENIED_PEERS, Coturn, coturn_unavailable_reason
from .kamailio import (
    AUTH_MODES,
    CFG_TEMPLATE,
    Kamailio,
    KamailioError,
    kamailio_unavailable_reason,
    render_config,
    shipped_kamailio,
    write_subscriber_table,
)
from .dnsmasq import Dnsmasq, dnsmasq_unavailable_reason
from sipmesh.lab.netns import Netns, NetnsFactory, NetnsUnavailable, Veth, list_netns, netns_unavailable_reason
from sipmesh.lab.netns import popen as netns_popen
from sipmesh.lab.netns import run as netns_run
from sipmesh.lab.procs import (
    REGISTRY,
    ManagedProcess,
    ProcessRegistry,
    free_port,
    ipv6_loopback,
    listening_sockets,
    pid_alive,
    spawn,
    wait_tcp_listening,
    wait_udp_listening,
)
from .topology import INTERNET, KINDS, Host, NatLab, Router
from .relay import LossyRelay, RelayStats
from .sipp import (
    SCENARIOS,
    SippProcess,
    SippResult,
    SippUsers,
    make_users,
    parse_stat_csv,
    run_sipp,
    scenario,
    sipp_args,
    sipp_unavailable_reason,
    start_sipp,
)
from sipmesh.lab.waiting import LabTimeout, wait_for, wait_for_async

__all__ = [
    "DENIED_PEERS", "Coturn", "coturn_unavailable_reason",
    "Dnsmasq", "dnsmasq_unavailable_reason", "LossyRelay", "RelayStats",
    "AUTH_MODES", "CFG_TEMPLATE", "Kamailio", "KamailioError", "kamailio_unavailable_reason",
    "render_config", "write_subscriber_table",
    "Netns", "NetnsFactory", "NetnsUnavailable", "Veth", "list_netns", "netns_unavailable_reason",
    "netns_popen", "netns_run",
    "REGISTRY", "ManagedProcess", "ProcessRegistry", "free_port", "ipv6_loopback", "listening_sockets",
    "pid_alive",
    "spawn", "LabTimeout", "wait_for", "wait_for_async", "wait_tcp_listening", "wait_udp_listening",
    "INTERNET", "KINDS", "Host", "NatLab", "Router",
    "SCENARIOS", "SippProcess", "SippResult", "SippUsers", "make_users", "parse_stat_csv", "run_sipp",
    "scenario", "sipp_args", "sipp_unavailable_reason", "start_sipp",
]
