"""SIP-specific event notification (RFC 6665): the Event and Subscription-State header
fields, sans-I/O, for both sides (the broker's notifier, the UA's subscriber)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sipmesh.sip.errors import ParseError
from sipmesh.sip import grammar

_TOKEN = grammar.TOKEN


@dataclass(frozen=True, slots=True)
class EventType:
    """`Event: reg;id=7`: the package and the subscription's id parameter (RFC 6665 §8.2.1)."""

    package: str
    id: str | None = None

    def __str__(self) -> str:
        return self.package if self.id is None else f"{self.package};id={self.id}"

    def matches(self, other: "EventType") -> bool:
        return self.package == other.package and self.id == other.id


def parse_event(value: str | None) -> EventType:
    if value is None:
        raise ParseError("no Event header field")
    package, *params = (part.strip() for part in value.split(";"))
    package = package.lower()
    if not _TOKEN.fullmatch(package):
        raise ParseError(f"bad Event package {package!r}")
    event_id = None
    for param in params:
        name, _, val = param.partition("=")
        if name.strip().lower() == "id":
            event_id = val.strip().strip('"')
    return EventType(package, event_id)


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """`Subscription-State: active;expires=600` / `terminated;reason=timeout` (§8.2.3)."""

    state: str  # active | pending | terminated (others are treated as pending)
    expires: int | None = None
    reason: str | None = None
    retry_after: int | None = None
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        out = self.state
        if self.reason is not None:
            out += f";reason={self.reason}"
        if self.expires is not None:
            out += f";expires={self.expires}"
        if self.retry_after is not None:
            out += f";retry-after={self.retry_after}"
        return out


def parse_subscription_state(value: str | None) -> SubscriptionState:
    if value is None:
        raise ParseError("no Subscription-State header field")
    state, *params = (part.strip() for part in value.split(";"))
    state = state.lower()
    if not _TOKEN.fullmatch(state):
        raise ParseError(f"bad Subscription-State {state!r}")
    found: dict[str, str] = {}
    for param in params:
        name, _, val = param.partition("=")
        found[name.strip().lower()] = val.strip()

    def number(name: str) -> int | None:
        text = found.get(name)
        return int(text) if text is not None and text.isdigit() and len(text) <= 10 else None

    return SubscriptionState(state, number("expires"), found.get("reason") or None, number("retry-after"),
                             found)
