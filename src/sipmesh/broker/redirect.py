"""Redirect mode (RFC 3261 §8.3, §21.3.3): tell the caller where the callee is.

Instead of forwarding, the broker answers 302 Moved Temporarily with one Contact
per live binding, carrying its q-value and remaining lifetime, and the caller
contacts the UA itself. Nothing of the session passes through the broker.
"""

from __future__ import annotations

from sipmesh.broker.location import Binding

# Methods a redirect server answers with 3xx; BYE/ACK/CANCEL/REGISTER have their own rules.
REDIRECTABLE = frozenset({"INVITE", "OPTIONS", "MESSAGE", "SUBSCRIBE", "REFER", "PUBLISH", "INFO",
                          "UPDATE", "NOTIFY", "PRACK"})


def redirect_contacts(bindings: list[Binding], now: float) -> list[tuple[str, str]]:
    """Contact header fields for a 302, best (highest q) first."""
    headers = []
    for binding in sorted(bindings, key=lambda b: -b.q):
        params = f";q={binding.q:g}" if binding.q != 1.0 else ""
        headers.append(("Contact", f"<{binding.contact}>{params};expires={binding.remaining(now)}"))
    return headers
