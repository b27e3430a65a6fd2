"""Transaction states and the timer-driven base class of the four state machines.

A transaction keeps its armed timers as absolute deadlines on the caller's clock.
The layer asks `next_deadline()`, sleeps until then and calls `on_timer(now)`.
Timers of value 0 (reliable transports) are armed at `now`: the layer's next tick fires them.
"""

from __future__ import annotations

import enum

from sipmesh.sip.message import Request
from sipmesh.sip.transaction.effects import Effect, Terminated, TransportFailed
from sipmesh.sip.transaction.timers import TimerValues


class State(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class Transaction:
    """State, armed timers and the timer loop shared by the four state machines."""

    def __init__(self, request: Request, key: tuple[object, ...], state: State, *,
                 reliable: bool, now: float, timers: TimerValues) -> None:
        self.request = request
        self.key = key
        self.state = state
        self.reliable = reliable
        self.timers = timers
        self.created_at = now
        self._deadlines: dict[str, float] = {}
        self._intervals: dict[str, float] = {}

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def next_deadline(self) -> float | None:
        """Absolute clock time of the earliest armed timer, None when none is armed."""
        return min(self._deadlines.values(), default=None)

    def on_timer(self, now: float) -> list[Effect]:
        """Fire every timer due at `now`, in deadline order (ties by timer name).

        A retransmission timer re-arms from its own deadline, so the schedule does not
        drift with a late tick; if the layer was so late that the next deadline has also
        passed, the missed retransmissions are coalesced into the one just sent.
        """
        effects: list[Effect] = []
        while not self.terminated:
            due = [(at, name) for name, at in self._deadlines.items() if at <= now]
            if not due:
                break
            deadline, name = min(due)
            del self._deadlines[name]
            effects += self._fire(name, deadline, now)
        return effects

    def transport_error(self, now: float) -> list[Effect]:
        """Inform the TU and end the transaction (RFC 3261 Figures 5, 6 and 8)."""
        if self.terminated:
            return []
        return [TransportFailed(), *self._terminate()]

    # -- helpers for the subclasses -------------------------------------------------
    def _fire(self, name: str, deadline: float, now: float) -> list[Effect]:
        raise NotImplementedError

    def _arm(self, name: str, at: float, interval: float | None = None) -> None:
        self._deadlines[name] = at
        if interval is not None:
            self._intervals[name] = interval

    def _rearm(self, name: str, deadline: float, interval: float, now: float) -> None:
        """Re-arm retransmission timer `name` (which fired at `deadline`) `interval` later."""
        at = deadline + interval
        self._arm(name, at if at > now else now + interval, interval)

    def _cancel(self, *names: str) -> None:
        for name in names:
            self._deadlines.pop(name, None)

    def _terminate(self) -> list[Effect]:
        self.state = State.TERMINATED
        self._deadlines.clear()
        return [Terminated()]
