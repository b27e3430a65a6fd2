"""``{NAME}`` placeholders in a service's argv and environment templates.

A placeholder names a declared parameter or a built-in variable (`BUILTINS`);
``{{`` and ``}}`` are literal braces. Every name is checked when the configuration
is loaded, so a typo is a configuration error, not a program started with
``{PROT}`` in its arguments. Values are substituted into single argv elements
and never pass through a shell; they were validated against their declared types.
"""

from __future__ import annotations

import re

__all__ = ["BUILTINS", "TemplateError", "names", "render"]

# What the daemon knows about every session, besides the declared parameters.
BUILTINS = {
    "LOCAL_IP": "our address, as sent in a=IP4/a=IP6",
    "REMOTE_IP": "the peer's address, from its a=IP4/a=IP6 (empty if it sent none)",
    "CALL_ID": "the SIP Call-ID of the session",
    "PEER": "the peer's SIP URI",
    "LOCAL_USER": "our user name",
    "SERVICE": "the service's name",
    "ROLE": "'server' on the answering side, 'client' on the calling side",
    "LOCAL_PORT": "the UDP port our program binds: the path ICE chose (0 without ICE: any)",
    "REMOTE_PORT": "the UDP port of the peer's program on that path (0 without ICE)",
    "PATH": "'direct' or 'relayed' (empty without ICE)",
}

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


class TemplateError(ValueError):
    pass


def names(template: str) -> list[str]:
    """The placeholder names in `template`; TemplateError on a stray brace."""
    found = []
    for match in _TOKEN.finditer(template):
        text = match.group(0)
        if text in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise TemplateError(f"stray {text!r} in {template!r} (write {text * 2} for a "
                                "literal brace, {NAME} for a value)")
        found.append(match.group(1))
    return found


def render(template: str, values: dict[str, str], *, strict: bool = True) -> str:
    """`template` with each ``{NAME}`` replaced by ``values[NAME]``.

    TemplateError names a placeholder without a value (or a stray brace). With
    ``strict=False`` those stay as written instead: the arguments of `sipmesh serve
    -- PROGRAM ARGS` (apps/exec.py) are the user's, and braces may be the program's own.
    """
    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        name = match.group(1)
        if name is None or name not in values:
            if not strict:
                return text
            raise TemplateError(f"no value for {text} in {template!r}")
        return values[name]

    return _TOKEN.sub(replace, template)
