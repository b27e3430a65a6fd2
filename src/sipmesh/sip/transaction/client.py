"""Client transactions: RFC 3261 §17.1 with the RFC 6026 Accepted state, and the
ACK (§17.1.1.3) and CANCEL (§9.1) a client builds from its INVITE.

The request must already carry its top Via with a branch (see `matching.new_branch`).
"""

from __future__ import annotations

from sipmesh.sip.errors import ParseError
from sipmesh.sip.message import Headers, Message, Request, Response
from sipmesh.sip.transaction.base import State, Transaction
from sipmesh.sip.transaction.effects import Deliver, Effect, Send, Timeout
from sipmesh.sip.transaction.matching import client_key
from sipmesh.sip.transaction.timers import TIMER_D_UNRELIABLE, TimerValues
from sipmesh.sip.uri import SipURI


def _header(message: Message, name: str) -> str:
    value = message.headers.get(name)
    if value is None:
        raise ParseError(f"missing {name}")
    return value


def _derived(invite: Request, method: str, to: str) -> Request:
    """Same Request-URI, Call-ID, From and CSeq number; only the top Via; the Routes."""
    headers = Headers()
    headers.add("Via", _header(invite, "Via"))
    for route in invite.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("Max-Forwards", "70")
    headers.add("From", _header(invite, "From"))
    headers.add("To", to)
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", f"{invite.cseq[0]} {method}")
    uri = invite.uri.copy() if isinstance(invite.uri, SipURI) else invite.uri
    return Request(headers=headers, method=method, uri=uri)


def make_ack(invite: Request, response: Response) -> Request:
    """The ACK for a 300-699 response (§17.1.1.3): To (with its tag) from the response."""
    return _derived(invite, "ACK", _header(response, "To"))


def make_cancel(invite: Request) -> Request:
    """A CANCEL for `invite` (§9.1): same To as the INVITE, same branch, so it matches."""
    return _derived(invite, "CANCEL", _header(invite, "To"))


class _Client(Transaction):
    def __init__(self, request: Request, state: State, *, reliable: bool, now: float,
                 timers: TimerValues) -> None:
        super().__init__(request, client_key(request), state, reliable=reliable, now=now,
                         timers=timers)


class ClientInviteTransaction(_Client):
    """Calling -> Proceeding -> Completed (non-2xx) | Accepted (2xx) -> Terminated."""

    def __init__(self, request: Request, *, reliable: bool, now: float,
                 timers: TimerValues = TimerValues()) -> None:
        super().__init__(request, State.CALLING, reliable=reliable, now=now, timers=timers)
        self.ack: Request | None = None

    def start(self) -> list[Effect]:
        t1 = self.timers.t1
        if not self.reliable:
            self._arm("A", self.created_at + t1, t1)
        self._arm("B", self.created_at + 64 * t1)
        return [Send(self.request)]

    def receive(self, response: Response, now: float) -> list[Effect]:
        status = response.status
        if self.state in (State.CALLING, State.PROCEEDING):
            self._cancel("A", "B")  # B only matters in Calling (§17.1.1.2)
            if status < 200:
                self.state = State.PROCEEDING
            elif status < 300:
                self.state = State.ACCEPTED
                self._arm("M", now + 64 * self.timers.t1)
            else:
                self.state = State.COMPLETED
                self.ack = make_ack(self.request, response)
                wait = 0.0 if self.reliable else max(TIMER_D_UNRELIABLE, 64 * self.timers.t1)
                self._arm("D", now + wait)
                return [Send(self.ack), Deliver(response)]
            return [Deliver(response)]
        if self.state is State.COMPLETED and status >= 300 and self.ack is not None:
            return [Send(self.ack)]  # retransmitted final: re-ACK, do not deliver again
        if self.state is State.ACCEPTED and 200 <= status < 300:
            return [Deliver(response)]  # the TU ACKs every 2xx itself
        return []

    def _fire(self, name: str, deadline: float, now: float) -> list[Effect]:
        if name == "A":  # doubles without the T2 cap (§17.1.1.2)
            self._rearm("A", deadline, 2 * self._intervals["A"], now)
            return [Send(self.request)]
        if name == "B":
            return [Timeout("B"), *self._terminate()]
        return self._terminate()  # D, M


class ClientNonInviteTransaction(_Client):
    """Trying -> Proceeding -> Completed -> Terminated (§17.1.2)."""

    def __init__(self, request: Request, *, reliable: bool, now: float,
                 timers: TimerValues = TimerValues()) -> None:
        super().__init__(request, State.TRYING, reliable=reliable, now=now, timers=timers)

    def start(self) -> list[Effect]:
        t1 = self.timers.t1
        if not self.reliable:
            self._arm("E", self.created_at + t1, t1)
        self._arm("F", self.created_at + 64 * t1)
        return [Send(self.request)]

    def receive(self, response: Response, now: float) -> list[Effect]:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return []  # retransmitted finals are absorbed in Completed
        if response.status < 200:
            self.state = State.PROCEEDING
        else:
            self.state = State.COMPLETED
            self._cancel("E", "F")
            self._arm("K", now + (0.0 if self.reliable else self.timers.t4))
        return [Deliver(response)]

    def _fire(self, name: str, deadline: float, now: float) -> list[Effect]:
        if name == "E":
            t2 = self.timers.t2
            interval = t2 if self.state is State.PROCEEDING else min(2 * self._intervals["E"], t2)
            self._rearm("E", deadline, interval, now)
            return [Send(self.request)]
        if name == "F":
            return [Timeout("F"), *self._terminate()]
        return self._terminate()  # K
