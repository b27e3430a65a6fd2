"""Reusable test lab: real third-party SIP software (Kamailio, SIPp) and network namespaces.

Import helpers with ``from tests.lab import ...``; the pytest fixtures live in
``tests.lab.fixtures`` (enabled by ``pytest_plugins`` in ``tests/conftest.py``).
"""

from .kamailio import (
    AUTH_MODES,
    CFG_TEMPLATE,
    Kamailio,
    KamailioError,
    kamailio_unavailable_reason,
    render_config,
    write_subscriber_table,
)
from .dns import Dnsmasq, dnsmasq_unavailable_reason
from .netns import Netns, NetnsFactory, NetnsUnavailable, Veth, list_netns, netns_unavailable_reason
from .netns import popen as netns_popen
from .netns import run as netns_run
from .procs import (
    REGISTRY,
    LabTimeout,
    ManagedProcess,
    ProcessRegistry,
    free_port,
    listening_sockets,
    spawn,
    wait_for,
    wait_tcp_listening,
    wait_udp_listening,
)
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

__all__ = [
    "Dnsmasq", "dnsmasq_unavailable_reason", "LossyRelay", "RelayStats",
    "AUTH_MODES", "CFG_TEMPLATE", "Kamailio", "KamailioError", "kamailio_unavailable_reason",
    "render_config", "write_subscriber_table",
    "Netns", "NetnsFactory", "NetnsUnavailable", "Veth", "list_netns", "netns_unavailable_reason",
    "netns_popen", "netns_run",
    "REGISTRY", "LabTimeout", "ManagedProcess", "ProcessRegistry", "free_port", "listening_sockets",
    "spawn", "wait_for", "wait_tcp_listening", "wait_udp_listening",
    "SCENARIOS", "SippProcess", "SippResult", "SippUsers", "make_users", "parse_stat_csv", "run_sipp",
    "scenario", "sipp_args", "sipp_unavailable_reason", "start_sipp",
]
