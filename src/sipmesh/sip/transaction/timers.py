"""Timer values (RFC 3261 Appendix A): the base values every transaction timer derives from."""

from __future__ import annotations

from dataclasses import dataclass

TIMER_D_UNRELIABLE = 32.0  # §17.1.1.2: "at least 32 seconds"; we use max(32, 64*T1)


@dataclass(frozen=True)
class TimerValues:
    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmission interval for non-INVITE requests and INVITE responses
    t4: float = 5.0  # maximum time a message stays in the network
