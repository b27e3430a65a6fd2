"""A configured service: its kind's profile, who may call it, how many sessions at once.

Every kind is an `AppProfile` (agent/profile.py) -- the same interface the
single-session agent runs -- extended by `ServiceProfile` with configuration
(``configure``), a per-session `Lease` for allocated resources, and the
service's name in the offer (``a=service:NAME``). The answering daemon and
`sipmesh call --service` therefore run the same definition, each its own half.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from sipmesh.agent.errors import Exit, ProfileError
from sipmesh.agent.params import Param, ParamType, Token
from sipmesh.agent.profile import AppProfile, SessionInfo
from sipmesh.daemon.allocators import Allocator, Lease, Ledger
from sipmesh.sip.uri import SipURI

__all__ = ["ConfigValueError", "DaemonSessionInfo", "SERVICE", "Service", "ServiceProfile",
           "caller_identity", "compile_pattern"]

SERVICE = Param("service", Token(64), required=False)  # a=service:NAME selects the service
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")


class ConfigValueError(ValueError):
    """A bad value in a service's configuration; `key` is its dotted path in the service."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass
class DaemonSessionInfo(SessionInfo):
    """SessionInfo plus what the daemon holds for the session."""

    lease: Lease | None = None
    service: str = ""
    kind: str = ""
    generation: int = 0  # of the configuration the session started with


class ServiceProfile(AppProfile):
    """Base of the service kinds. A subclass sets `name` (the kind), `options` (the keys
    it accepts in its ``[[service]]`` table) and `call_options` (in ``[service.call]``),
    and implements `configure`, `answer` and `caller_child`."""

    name: ClassVar[str] = "service"
    options: ClassVar[tuple[str, ...]] = ()
    call_options: ClassVar[tuple[str, ...]] = ()
    settable: ClassVar[tuple[str, ...]] = ()  # names `--param NAME=VALUE` may set when calling

    def __init__(self, service_name: str, *, allocators: Mapping[str, Allocator] | None = None,
                 state_dir: Path | None = None, side: str = "answer") -> None:
        self.service_name = service_name
        self.allocators = dict(allocators or {})
        self.state_dir = state_dir
        self.side = side
        self.call_values: dict[str, str] = {}
        self._caller_lease: Lease | None = None

    # -- configuration ------------------------------------------------------------------
    def configure(self, options: dict[str, Any], call: dict[str, Any]) -> None:
        """Read the kind's keys; raise ConfigValueError(key, reason) on a bad one."""

    def check(self) -> None:
        if self.side == "answer":
            self.check_answering()
        else:
            self.check_calling()

    def check_answering(self) -> None:
        """Raise ProfileError/ConfigValueError if this host cannot answer (program missing)."""

    def check_calling(self) -> None:
        """The same for the calling side."""

    def set_call_values(self, values: Mapping[str, str]) -> None:
        """Values given on the caller's command line (``--param NAME=VALUE``)."""
        for name, value in values.items():
            if name not in self.settable:
                known = ", ".join(self.settable) or "none"
                raise ProfileError(f"service {self.service_name!r} has no parameter {name!r} "
                                   f"to set when calling (settable: {known})", Exit.USAGE)
            self.call_values[name] = value

    # -- helpers for configure() ----------------------------------------------------------
    @staticmethod
    def option_str(options: Mapping[str, Any], key: str, default: str | None = None) -> str:
        value = options.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigValueError(key, f"must be a non-empty string, not {value!r}")
        return value

    @staticmethod
    def typed(options: Mapping[str, Any], key: str, kind: ParamType) -> str:
        value = options.get(key)
        try:
            return kind.check(str(value) if isinstance(value, int) and not isinstance(value, bool)
                              else value)
        except ValueError as exc:
            raise ConfigValueError(key, str(exc)) from None

    @staticmethod
    def int_option(options: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
        value = options.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigValueError(key, f"must be an integer in {low}..{high}, not {value!r}")
        return value

    def allocator_option(self, options: Mapping[str, Any], key: str, kind: str,
                         required: bool = False) -> str | None:
        """The name of an allocator of `kind` ("ports" or "addresses") named by `key`."""
        name = options.get(key)
        if name is None:
            if required:
                raise ConfigValueError(key, f"missing: the name of an {kind} allocator "
                                            f"(see [allocators.NAME])")
            return None
        if not isinstance(name, str):
            raise ConfigValueError(key, f"must be the name of an allocator, not {name!r}")
        allocator = self.allocators.get(name)
        if allocator is None:
            known = ", ".join(sorted(self.allocators)) or "none defined"
            raise ConfigValueError(key, f"no allocator named {name!r} (allocators: {known})")
        if allocator.kind != kind:
            raise ConfigValueError(key, f"allocator {name!r} gives {allocator.kind}, "
                                        f"this needs {kind}")
        return name

    # -- sessions -------------------------------------------------------------------------
    def offer(self, info: SessionInfo) -> dict[str, str]:
        return dict(super().offer(info), service=self.service_name)

    @property
    def label(self) -> str:
        return self.service_name

    def refusal(self, offer: dict[str, str]) -> str | None:
        return None  # the daemon chose this service by the offer's a=service (or a=APP)

    def lease_of(self, info: SessionInfo) -> Lease:
        """The session's lease: the daemon's on the answering side; on the calling side
        (one session per process) a lease of our own."""
        lease = getattr(info, "lease", None)
        if lease is not None:
            return lease
        if self._caller_lease is None:
            self._caller_lease = Lease(Ledger(), self.allocators)
        return self._caller_lease

    def release_caller_lease(self) -> None:
        if self._caller_lease is not None:
            self._caller_lease.release()

    def describe(self) -> str:
        return f"{self.service_name} ({self.name})"


# ------------------------------------------------------------------------------ callers


def caller_identity(uri: object) -> str:
    """'user@host' of a caller's URI: what `allow` patterns are matched against."""
    if isinstance(uri, SipURI):
        return f"{uri.user or ''}@{uri.host.lower().strip('[]')}"
    return ""


_PATTERN = re.compile(r"[A-Za-z0-9._~+*?!$&'()=,;%\[\]-]*@[A-Za-z0-9.*?:\[\]-]+")


def compile_pattern(text: str, default_host: str) -> str:
    """An allowed-caller pattern as 'user@host' glob: '*' (anyone), 'alice' (alice at our
    own domain), 'alice@example.com', '*@10.0.0.*', 'sip:bob@*'. ValueError if malformed."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise ValueError(f"{text!r} is not a caller pattern")
    pattern = text.removeprefix("sips:").removeprefix("sip:")
    if pattern == "*":
        return "*"
    if "@" not in pattern:
        pattern = f"{pattern}@{default_host}"
    user, _, host = pattern.rpartition("@")
    pattern = f"{user}@{host.lower().strip('[]')}"
    if not _PATTERN.fullmatch(pattern):
        raise ValueError(f"{text!r} is not a caller pattern ('user@host' with * and ? wildcards)")
    return pattern


@dataclass
class Service:
    """One ``[[service]]`` of a loaded configuration."""

    name: str
    kind: str
    profile: ServiceProfile
    allow: tuple[str, ...]
    max_sessions: int
    line: int | None = None
    description: str = ""
    table: dict[str, Any] = field(default_factory=dict, repr=False)  # as written, for reload diffs

    def allows(self, caller: object) -> bool:
        identity = caller_identity(caller)
        return bool(identity) and any(pattern == "*" or fnmatch.fnmatchcase(identity, pattern)
                                      for pattern in self.allow)
