"""The user agent (RFC 3261 §8, §10.2, §12-15) on top of the transaction layer.

- `useragent`: `UserAgent` and `UAConfig`: lifecycle, REGISTER, out-of-dialog requests,
  and the dispatch of what arrives (it is the transaction user);
- `invite_client`: calling out (INVITE, forks, CANCEL, ACK of each 2xx);
- `invite_server`: `IncomingCall`, an INVITE awaiting the application (ring, reject, accept);
- `call`: `Call`, the established dialog (in-dialog requests, BYE, re-INVITE, the ACK
  and 2xx retransmissions, probing a silent peer), and `CallFailed`;
- `liveness`: when a silent peer is probed and when it counts as gone (sans-I/O);
- `subscription`: `Subscription`, an event subscription we hold (RFC 6665: SUBSCRIBE,
  NOTIFYs, refresh).
"""

from sipmesh.sip.ua.call import ALLOW, Call, CallFailed
from sipmesh.sip.ua.invite_server import IncomingCall
from sipmesh.sip.ua.subscription import Notification, Subscription
from sipmesh.sip.ua.useragent import UAConfig, UserAgent, names_a_domain

__all__ = ["ALLOW", "Call", "CallFailed", "IncomingCall", "Notification", "Subscription", "UAConfig",
           "UserAgent", "names_a_domain"]
