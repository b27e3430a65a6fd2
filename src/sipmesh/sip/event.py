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


def _split(value: str | None, what: str) -> tuple[str, dict[str, str]]:
    """`token;name=value;...` -> (token in lower case, {name: value})."""
    if value is None:
        raise ParseError(f"no {what} header field")
    first, *params = (part.strip() for part in value.split(";"))
    first = first.lower()
    if not _TOKEN.fullmatch(first):
        raise ParseError(f"bad {what} {first!r}")
    found: dict[str, str] = {}
    for param in params:
        name, _, val = param.partition("=")
        found[name.strip().lower()] = val.strip()
    return first, found


def parse_event(value: str | None) -> EventType:
    package, params = _split(value, "Event")
    event_id = params.get("id")
    return EventType(package, event_id.strip('"') if event_id is not None else None)


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
    state, found = _split(value, "Subscription-State")

    def number(name: str) -> int | None:
        text = found.get(name)
        return int(text) if text is not None and text.isdigit() and len(text) <= 10 else None

    return SubscriptionState(state, number("expires"), found.get("reason") or None, number("retry-after"),
                             found)
