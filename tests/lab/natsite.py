"""The NAT lab's site (sipmesh.lab.natsite) with a choice of SIP server for tests: our broker,
or Kamailio with the shipped docs/kamailio/kamailio.cfg (``NatSite(..., server="kamailio")``,
digest on, the STUN of its `stun` module on the SIP port). Kamailio is a test's business: the
product's lab (what `sipmesh demo --lab` builds) runs only our broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sipmesh.lab.natsite import SIP_PORT, NatSite as BrokerSite, password, tunnel_services

from .kamailio import Kamailio

__all__ = ["KAMAILIO_CFG", "NatSite", "SIP_PORT", "password", "tunnel_services"]

KAMAILIO_CFG = Path(__file__).resolve().parents[2] / "docs" / "kamailio" / "kamailio.cfg"


class NatSite(BrokerSite):
    """Broker (or Kamailio) + coturn on ``lab[host]``; daemons and calls on the others."""

    def __init__(self, *args: Any, server: str = "broker", **kwargs: Any) -> None:
        assert server in ("broker", "kamailio"), server
        super().__init__(*args, **kwargs)
        self.kind = server
        self.kamailio: Kamailio | None = None

    def start_server(self, trace: bool) -> None:
        if self.kind != "kamailio":
            super().start_server(trace)
            return
        self.kamailio = Kamailio(self.run / "kamailio", host=self.host.ip, port=SIP_PORT,
                                 netns=self.host.ns, auth="db_text",
                                 users={u: password(u) for u in self.users},
                                 template=KAMAILIO_CFG, defines=["WITHOUT_MESH"]).start()

    def log_text(self) -> str:
        return self.kamailio.log_text() if self.kamailio is not None else super().log_text()

    def stop(self) -> None:
        super().stop()
        if self.kamailio is not None:
            self.kamailio.stop()
