"""Service kinds by name. The generic `exec` kind registers itself; the built-in
applications (apps/forward.py, apps/wireguard.py, the CLI's openvpn wiring) register
theirs, so that the daemon never imports the layer above it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sipmesh.daemon.service import ServiceProfile

_KINDS: dict[str, type["ServiceProfile"]] = {}


def register_kind(name: str, kind: type["ServiceProfile"]) -> None:
    _KINDS[name] = kind


def get_kind(name: str) -> type["ServiceProfile"]:
    if not _KINDS.get("exec"):
        from sipmesh.daemon import exec as _exec  # noqa: F401  (registers "exec")
    try:
        return _KINDS[name]
    except KeyError:
        raise LookupError(f"unknown kind {name!r} (known: {', '.join(known_kinds())})") from None


def known_kinds() -> list[str]:
    if "exec" not in _KINDS:
        from sipmesh.daemon import exec as _exec  # noqa: F401
    return sorted(_KINDS)
