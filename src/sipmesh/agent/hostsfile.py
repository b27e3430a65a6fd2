"""Names for a mesh network's members (issue 12, item 8; nebula#66): a marked block in a
hosts file (``/etc/hosts`` by default, `sipmesh up --hosts-file`).

    # sipmesh network lab: begin (written by `sipmesh up`, do not edit)
    100.64.0.2 bob.lab bob
    100.64.0.3 carol.lab carol
    # sipmesh network lab: end

Every member (ourselves too) gets ``NAME.NETWORK``, and plain ``NAME`` when no other line
of the file names it (another network's member of the same name, a host of the machine).
The block is all that is ours: every other byte of the file is kept as it was.

Roster input is hostile (agent/roster.py accepts any SIP user name): a name reaches the
file only if it is a hostname label (letters, digits, inner hyphens, at most 63), an
address only if it is an IPv4 or IPv6 address; anything else is left out (`render`
returns what it refused, for the log).

Sans-I/O: `render` and `merge` are pure; `HostsFile` reads, merges and writes atomically
(a temporary file in the same directory, then rename; under an flock of the directory, so
two `sipmesh up` on one machine do not lose each other's blocks). A hosts file that is a
mount point (a container's bind-mounted /etc/hosts) cannot be renamed over: it is then
rewritten in place.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("sipmesh.agent.hostsfile")

DEFAULT_PATH = Path("/etc/hosts")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENCODING = dict(encoding="utf-8", errors="surrogateescape")  # any bytes back as they were


def valid_label(name: str) -> bool:
    """A hostname label (RFC 1123): what a member or network name must be to get a name."""
    return bool(_LABEL.match(name))


def begin_marker(network: str) -> str:
    return f"# sipmesh network {network}: begin (written by `sipmesh up`, do not edit)"


def end_marker(network: str) -> str:
    return f"# sipmesh network {network}: end"


def _names_elsewhere(lines: Iterable[str]) -> set[str]:
    """Host names the other lines of a hosts file give (lower case, comments left out)."""
    names: set[str] = set()
    for line in lines:
        fields = line.split("#", 1)[0].split()
        names.update(n.lower() for n in fields[1:])
    return names


def _split(text: str, network: str) -> tuple[list[str], list[str], int]:
    """(lines outside our block, lines inside it, where it was: the index in the outside
    lines, -1 if none). Lines keep their endings. A begin without an end runs to the end."""
    begin, end = begin_marker(network), end_marker(network)
    outside: list[str] = []
    inside: list[str] = []
    at, within = -1, False
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if not within and bare == begin:
            within = True
            if at < 0:
                at = len(outside)
        elif within:
            if bare == end:
                within = False
            else:
                inside.append(line)
        else:
            outside.append(line)
    return outside, inside, at


def render(network: str, members: dict[str, str], taken: Iterable[str] = ()
           ) -> tuple[list[str], list[str]]:
    """(the block's entry lines, without markers; the members refused and why). `members`:
    name -> mesh address; `taken`: names other lines already give (no short NAME then)."""
    refused: list[str] = []
    if not valid_label(network):
        return [], [f"network {network!r}: not a hostname label"]
    taken = {n.lower() for n in taken}
    lines = []
    for name in sorted(members):
        address = members[name]
        if not valid_label(name):
            refused.append(f"{name!r}: not a hostname label")
            continue
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            refused.append(f"{name}: {address!r} is not an address")
            continue
        names = [f"{name}.{network}".lower()]
        if name.lower() not in taken:
            names.append(name.lower())
        lines.append(f"{ip} {' '.join(names)}")
    return lines, refused


def merge(text: str, network: str, members: dict[str, str]) -> tuple[str, list[str]]:
    """(`text` with the network's block holding `members` (none: no block), what was
    refused). Idempotent; the other lines are kept byte for byte, the block stays where
    it was (a new one goes at the end)."""
    outside, _, at = _split(text, network)
    entries, refused = render(network, members, _names_elsewhere(outside))
    if not entries:
        return "".join(outside), refused
    block = [begin_marker(network) + "\n", *(e + "\n" for e in entries),
             end_marker(network) + "\n"]
    if at < 0:
        at = len(outside)
    if at > 0 and not outside[at - 1].endswith("\n"):
        outside[at - 1] += "\n"  # a last line without its newline gets one
    return "".join(outside[:at] + block + outside[at:]), refused


def entries_of(text: str, network: str) -> dict[str, str]:
    """The names our block gives and their addresses (for status and tests)."""
    _, inside, _ = _split(text, network)
    names: dict[str, str] = {}
    for line in inside:
        fields = line.split()
        for name in fields[1:]:
            names[name] = fields[0]
    return names


class HostsFile:
    """One network's block in one hosts file."""

    def __init__(self, path: Path, network: str) -> None:
        self.path = Path(path)
        self.network = network
        self._refused: set[str] = set()

    def update(self, members: dict[str, str]) -> None:
        """The block holds exactly `members` (name -> address); {} removes it."""
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            try:
                with open(self.path, newline="", **_ENCODING) as f:  # CRLF stays CRLF
                    old = f.read()
            except FileNotFoundError:
                old = ""
            new, refused = merge(old, self.network, members)
            for reason in set(refused) - self._refused:
                log.warning("network %s: no name in %s for %s", self.network, self.path, reason)
            self._refused = set(refused)
            if new != old:
                self._write(new)
        finally:
            os.close(directory)  # and the lock with it

    def remove(self) -> None:
        self.update({})

    def _write(self, text: str) -> None:
        data = text.encode(**_ENCODING)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    st = os.stat(self.path)
                    os.fchmod(f.fileno(), st.st_mode & 0o7777)
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except FileNotFoundError:
                    os.fchmod(f.fileno(), 0o644)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.replace(temp, self.path)
                return
            except OSError:  # EBUSY: a bind-mounted file; in place then
                pass
            with open(self.path, "r+b") as f:
                f.write(data)
                f.truncate()
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
