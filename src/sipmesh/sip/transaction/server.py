"""Server transactions: RFC 3261 §17.2 with the RFC 6026 corrections.

The TU sees each request once (`Deliver` from `start`); retransmissions go to
`receive` and are answered with the last response or absorbed, never delivered again.
"""

from __future__ import annotations

from sipmesh.sip.message import Request, Response, make_response
from sipmesh.sip.transaction.base import State, Transaction
from sipmesh.sip.transaction.effects import Deliver, Effect, Send, Timeout, TransportFailed
from sipmesh.sip.transaction.matching import ack_server_key, server_key
from sipmesh.sip.transaction.timers import TimerValues


class _Server(Transaction):
    def __init__(self, request: Request, state: State, *, reliable: bool, now: float,
                 timers: TimerValues) -> None:
        super().__init__(request, server_key(request), state, reliable=reliable, now=now,
                         timers=timers)
        self.last_response: Response | None = None

    def _resend(self) -> list[Effect]:
        return [] if self.last_response is None else [Send(self.last_response)]


class ServerInviteTransaction(_Server):
    """Proceeding -> Completed -> Confirmed (non-2xx) | Accepted (2xx) -> Terminated."""

    def __init__(self, request: Request, *, reliable: bool, now: float,
                 timers: TimerValues = TimerValues()) -> None:
        super().__init__(request, State.PROCEEDING, reliable=reliable, now=now, timers=timers)
        self.ack_key = self.key  # where the ACK will match; see matching.ack_server_key

    def start(self) -> list[Effect]:
        """Answer 100 Trying at once (§17.2.1, §8.2.6.1) and pass the INVITE up."""
        trying = make_response(self.request, 100)
        timestamp = self.request.headers.get("Timestamp")
        if timestamp is not None:
            trying.headers.add("Timestamp", timestamp)
        self.last_response = trying
        return [Send(trying), Deliver(self.request)]

    def receive(self, request: Request, now: float) -> list[Effect]:
        if request.method == "ACK":
            if self.state is State.COMPLETED:
                self.state = State.CONFIRMED
                self._cancel("G", "H")
                self._arm("I", now + (0.0 if self.reliable else self.timers.t4))
            elif self.state is State.ACCEPTED:
                return [Deliver(request)]  # RFC 6026: an ACK matching here goes to the TU
            return []
        if self.state in (State.PROCEEDING, State.COMPLETED):
            return self._resend()
        return []  # Accepted: the TU's own 2xx retransmissions answer the INVITE

    def respond(self, response: Response, now: float) -> list[Effect]:
        status = response.status
        if self.state is State.ACCEPTED and 200 <= status < 300:
            self.last_response = response
            return [Send(response)]  # the TU retransmitting its 2xx
        if self.state is not State.PROCEEDING:
            return []  # a TU bug (response after a final one): dropped
        self.last_response = response
        if status >= 200:
            self.ack_key = ack_server_key(self.request, response)
            t1 = self.timers.t1
            if status < 300:
                self.state = State.ACCEPTED
                self._arm("L", now + 64 * t1)
            else:
                self.state = State.COMPLETED
                if not self.reliable:
                    self._arm("G", now + t1, t1)
                self._arm("H", now + 64 * t1)
        return [Send(response)]

    def transport_error(self, now: float) -> list[Effect]:
        """RFC 6026: inform the TU but keep the state; the timers end the transaction."""
        return [] if self.terminated else [TransportFailed()]

    def _fire(self, name: str, deadline: float, now: float) -> list[Effect]:
        if name == "G":
            self._rearm("G", deadline, min(2 * self._intervals["G"], self.timers.t2), now)
            return self._resend()
        if name == "H":
            return [Timeout("H"), *self._terminate()]
        return self._terminate()  # I, L


class ServerNonInviteTransaction(_Server):
    """Trying -> Proceeding -> Completed -> Terminated (§17.2.2)."""

    def __init__(self, request: Request, *, reliable: bool, now: float,
                 timers: TimerValues = TimerValues()) -> None:
        super().__init__(request, State.TRYING, reliable=reliable, now=now, timers=timers)

    def start(self) -> list[Effect]:
        return [Deliver(self.request)]

    def receive(self, request: Request, now: float) -> list[Effect]:
        """A retransmission: discarded in Trying, answered with the last response after."""
        return [] if self.terminated else self._resend()

    def respond(self, response: Response, now: float) -> list[Effect]:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return []  # §17.2.2: further final responses are discarded
        self.last_response = response
        if response.status < 200:
            self.state = State.PROCEEDING
        else:
            self.state = State.COMPLETED
            self._arm("J", now + (0.0 if self.reliable else 64 * self.timers.t1))
        return [Send(response)]

    def _fire(self, name: str, deadline: float, now: float) -> list[Effect]:
        return self._terminate()  # J
