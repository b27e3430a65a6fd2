"""Is the peer of an established dialog still there? (sans-I/O)

A peer whose agent dies without a BYE (SIGKILL, a host that is gone, a NAT path that
was cut) would leave our session running forever. We ask it, with in-dialog OPTIONS:
RFC 3261 §12.2.1.2 says a dialog ends when a request inside it gets a 481 or a 408, or
no response at all, and every UA answers OPTIONS (a 405 or 501 still proves the peer
is there). The rule, with K = `interval` and W = min(2K, 64*T1):

- after K seconds without a sign of life from the peer, send an OPTIONS, and another
  every K seconds while it stays silent (each one retransmitted by its transaction);
- a sign of life is any request from the peer in the dialog, its ACK, or a final
  response to any request of ours in the dialog other than 408, 481 and 503 (503 is
  what a transport error gives us, and a proxy's 503 says nothing about the peer);
- a 481 or a 408 to a request of ours ends the dialog at once;
- so does a probe that has had no answer for W seconds (two probes unanswered, the
  default: "no answer to 2 in-dialog OPTIONS in 30 s").

The peer is therefore declared gone at most K + W seconds after its last sign of life:
45 s with the default K = 15 s and T1 = 0.5 s, 6 s with K = 2 s. The traffic is one
OPTIONS and its 200 per K seconds of silence, through the proxies of the route set
(so a broker that is down for longer than W also ends the sessions routed through it;
a shorter restart is survived, the probe's retransmissions reach it when it is back).

Why not RFC 4028 session timers: Min-SE may not be below 90 s, so the side waiting for
a refresh notices a dead peer only after up to 60 s, and the refresher after 45 s plus
its re-INVITE's Timer B (77 s); the probes' bound is ours to choose, and they need
nothing from the peer beyond RFC 3261.
"""

from __future__ import annotations

import enum

DEFAULT_INTERVAL = 15.0  # K: probe after this much silence (0: never)
MAX_INTERVAL = 3600.0
# Responses to a request in a dialog that end it (RFC 3261 §12.2.1.2).
ENDS_DIALOG = (408, 481)
# A response that is no sign of life: a transport error gives it, so may any proxy.
NO_SIGN = 503


def check_interval(value: float) -> float:
    """A probe interval as configured: 0 (never) or 1..3600 seconds; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value == 0 or 1 <= value <= MAX_INTERVAL):
        raise ValueError(f"must be 0 (off) or 1..{MAX_INTERVAL:g} seconds, not {value!r}")
    return float(value)


class Action(enum.Enum):
    PROBE = "probe"  # send an OPTIONS in the dialog now
    GONE = "gone"  # the peer is gone: end the dialog (`Liveness.reason` says why)


class Liveness:
    """What we know about the peer's liveness, fed clock values; see the module docstring."""

    def __init__(self, interval: float, t1: float, now: float) -> None:
        if interval <= 0:
            raise ValueError("the probe interval must be positive")
        self.interval = interval
        self.timeout = min(2 * interval, 64 * t1)  # W
        self.heard = now  # the peer's last sign of life
        self.unanswered: list[float] = []  # when the probes sent since then went out
        self.reason: str | None = None  # why the peer is gone, once it is

    @property
    def bound(self) -> float:
        """The longest time from the peer's last sign of life to our noticing its loss."""
        return self.interval + self.timeout

    def alive(self, now: float) -> None:
        """A sign of life from the peer."""
        if self.reason is None and now >= self.heard:
            self.heard = now
            self.unanswered.clear()

    def answered(self, status: int, method: str, now: float) -> bool:
        """A final response to our request `method` in the dialog; True if it ends the dialog."""
        if self.reason is not None:
            return True
        if status in ENDS_DIALOG:
            self.reason = (f"the peer is gone: {status} to our in-dialog {method} "
                           f"({'no answer' if status == 408 else 'it no longer knows the session'})")
            return True
        if status != NO_SIGN:
            self.alive(now)
        return False

    def poll(self, now: float) -> tuple[Action | None, float]:
        """What to do now (PROBE: send one, which is recorded as sent), and when to ask again."""
        if self.reason is not None:
            return Action.GONE, now
        if self.unanswered and now - self.unanswered[0] >= self.timeout:
            count = len(self.unanswered)
            self.reason = (f"the peer stopped answering: no answer to {count} in-dialog "
                           f"OPTIONS in {self.timeout:g} s")
            return Action.GONE, now
        action = None
        if now - self._last_contact() >= self.interval:
            self.unanswered.append(now)
            action = Action.PROBE
        wake = self._last_contact() + self.interval
        if self.unanswered:
            wake = min(wake, self.unanswered[0] + self.timeout)
        return action, wake

    def _last_contact(self) -> float:
        """The peer's last sign of life or our last probe since, whichever is later."""
        return self.unanswered[-1] if self.unanswered else self.heard
