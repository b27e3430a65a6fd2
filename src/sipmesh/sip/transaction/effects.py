"""What a transaction asks its layer to do (sans-I/O outputs, like h11 events).

Effects are returned in the order they must be carried out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipmesh.sip.message import Request, Response


@dataclass(frozen=True, slots=True)
class Send:
    """Transmit `message` to this transaction's peer."""

    message: Request | Response


@dataclass(frozen=True, slots=True)
class Deliver:
    """Pass `message` up to the transaction user (TU)."""

    message: Request | Response


@dataclass(frozen=True, slots=True)
class Timeout:
    """Timer `timer` ("B", "F", "H") fired: a client transaction got no final response
    (the TU acts as if it received 408), or a server INVITE never got its ACK."""

    timer: str


@dataclass(frozen=True, slots=True)
class TransportFailed:
    """The transport reported a failure for this transaction (RFC 3261 §17.1.4, §17.2.4)."""


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction is over: the layer forgets it (its key may be reused)."""


Effect = Send | Deliver | Timeout | TransportFailed | Terminated
