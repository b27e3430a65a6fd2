"""Shared pytest configuration. Lab fixtures (processes, netns, Kamailio, SIPp) come from
tests/lab/fixtures.py; project-wide fixtures are below."""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.peers.raw import RawPeer

pytest_plugins = ["tests.lab.fixtures"]


@pytest.fixture
async def raw_peers() -> AsyncIterator[Callable[..., Awaitable[RawPeer]]]:
    """Factory of raw UDP peers read by the test's event loop (``await raw_peers(host,
    lenient=False)``), all closed after the test."""
    opened: list[RawPeer] = []

    async def open_peer(host: str = "127.0.0.1", *, lenient: bool = False) -> RawPeer:
        peer = await RawPeer.open(host, lenient=lenient)
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        peer.close()


@pytest.fixture(autouse=True, scope="session")
def machine_hosts_file_untouched() -> Iterator[None]:
    """`sipmesh up` writes its members' names to /etc/hosts unless told otherwise
    (--hosts-file, agent/hostsfile.py); the namespaces of a test share the machine's: every
    test member must get a file of its own. Checked once, after the session."""
    from pathlib import Path

    yield
    hosts = Path("/etc/hosts")
    text = hosts.read_text(errors="replace") if hosts.exists() else ""
    assert "# sipmesh network " not in text, "a test's `sipmesh up` wrote to /etc/hosts " \
        "(give it --hosts-file): " + text
