"""Service kinds by name. The daemon looks a kind up here and never imports an
application: the layer above hands it the list of kinds (sipmesh/apps/kinds.py,
through cli/common.py:register_builtin_kinds) before loading a configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from sipmesh.daemon.service import ServiceProfile

_KINDS: dict[str, type["ServiceProfile"]] = {}


def register_kinds(kinds: Iterable[type["ServiceProfile"]]) -> None:
    for kind in kinds:
        _KINDS[kind.name] = kind


def get_kind(name: str) -> type["ServiceProfile"]:
    try:
        return _KINDS[name]
    except KeyError:
        raise LookupError(f"unknown kind {name!r} (known: {', '.join(known_kinds())})") from None


def known_kinds() -> list[str]:
    return sorted(_KINDS)
