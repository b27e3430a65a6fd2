"""RFC 3261 §17 transaction state machines with the RFC 6026 corrections (sans-I/O).

Transactions consume messages and clock values and return `Effect` lists; the layer
that owns sockets and timers carries the effects out.
"""

from sipmesh.sip.grammar import MAGIC_COOKIE
from sipmesh.sip.transaction.base import State, Transaction
from sipmesh.sip.transaction.client import (ClientInviteTransaction, ClientNonInviteTransaction,
                                            make_ack, make_cancel)
from sipmesh.sip.transaction.effects import (Deliver, Effect, Send, Terminated, Timeout,
                                             TransportFailed)
from sipmesh.sip.transaction.matching import (ack_server_key, client_key, invite_key_for_cancel,
                                              new_branch, server_key)
from sipmesh.sip.transaction.server import ServerInviteTransaction, ServerNonInviteTransaction
from sipmesh.sip.transaction.timers import TimerValues

__all__ = [
    "ClientInviteTransaction", "ClientNonInviteTransaction", "Deliver", "Effect",
    "MAGIC_COOKIE", "Send", "ServerInviteTransaction", "ServerNonInviteTransaction", "State",
    "Terminated", "Timeout", "TimerValues", "Transaction", "TransportFailed", "ack_server_key",
    "client_key", "invite_key_for_cancel", "make_ack", "make_cancel", "new_branch", "server_key",
]
