"""The service kinds of the daemon (``kind = "..."`` in a ``[[service]]``), in one list.

The daemon never imports an application: the command line hands it this list
(cli/common.py:register_builtin_kinds -> daemon/registry.py:register_kinds). A new
kind is a `ServiceProfile` subclass in its own module here, added to KINDS.
"""

from __future__ import annotations

from sipmesh.apps.exec import ExecService
from sipmesh.apps.forward import ForwardService
from sipmesh.apps.openvpn import OpenVPNService
from sipmesh.apps.wireguard import WireGuardService

KINDS = (ExecService, ForwardService, OpenVPNService, WireGuardService)
