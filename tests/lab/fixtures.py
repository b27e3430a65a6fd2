"""pytest fixtures of the test lab (loaded via ``pytest_plugins`` in tests/conftest.py).

* autouse ``_lab_reap_processes``: stops every process spawned (``procs.spawn``) during a test
* ``spawn_proc``     factory ``(argv, *, name=None, cwd=None, env=None, netns=None) -> ManagedProcess``
* ``netns_factory``  a :class:`NetnsFactory` (skips unless root + ``ip netns``); all deleted after
* ``lo_only_netns``  one namespace with only ``lo`` up
* ``kamailio``       factory ``(**Kamailio kwargs, start=True) -> Kamailio`` (skips w/o kamailio)
* ``sipp``           :class:`SippLab`: ``run(args, **kw)``, ``start(args, **kw)``, ``make_users(n)``
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from .kamailio import Kamailio, kamailio_unavailable_reason
from .netns import Netns, NetnsFactory, netns_unavailable_reason
from .procs import REGISTRY, ManagedProcess, spawn
from .sipp import SippProcess, SippResult, SippUsers, make_users, run_sipp, sipp_unavailable_reason, start_sipp


@pytest.fixture(autouse=True)
def _lab_reap_processes() -> Iterator[None]:
    mark = REGISTRY.mark()
    try:
        yield
    finally:
        REGISTRY.stop_since(mark)


@pytest.fixture
def spawn_proc(tmp_path: Path) -> Callable[..., ManagedProcess]:
    counter = itertools.count(1)

    def _spawn(argv: Sequence[str], *, name: str | None = None, cwd=None, env=None, netns=None) -> ManagedProcess:
        tag = name or f"{Path(str(argv[0])).name}{next(counter)}"
        return spawn(argv, cwd=cwd or tmp_path, env=env, netns=netns, name=tag,
                     log_path=tmp_path / "logs" / f"{tag}.log")

    return _spawn


@contextmanager
def stopped_gracefully(spawn: Callable[..., ManagedProcess], grace: float = 10.0
                       ) -> Iterator[Callable[..., ManagedProcess]]:
    """A spawner whose processes get SIGTERM and `grace` seconds, newest first, when the
    block ends: a fixture that yields from inside it (and depends on the SIP server or the
    namespaces) stops its agents before they go, so that the agents can unregister."""
    started: list[ManagedProcess] = []

    def start(argv: Sequence[str], **kwargs: object) -> ManagedProcess:
        proc = spawn(argv, **kwargs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop(grace=grace)


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def lo_only_netns(netns_factory: NetnsFactory) -> Netns:
    return netns_factory.lo_only()


@pytest.fixture
def kamailio(tmp_path: Path) -> Iterator[Callable[..., Kamailio]]:
    reason = kamailio_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started: list[Kamailio] = []
    counter = itertools.count(1)

    def _make(*, start: bool = True, run_dir=None, **kwargs) -> Kamailio:
        k = Kamailio(run_dir or tmp_path / f"kamailio{next(counter)}", **kwargs)
        started.append(k)
        if start:
            k.start()
        return k

    try:
        yield _make
    finally:
        for k in reversed(started):
            k.stop()


class SippLab:
    """SIPp runs whose files go to one directory (``tmp_path / 'sipp'``)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def run(self, args: Sequence[str], *, timeout: float = 60.0, **kwargs) -> SippResult:
        kwargs.setdefault("cwd", self.dir)
        return run_sipp(args, timeout=timeout, **kwargs)

    def start(self, args: Sequence[str], **kwargs) -> SippProcess:
        kwargs.setdefault("cwd", self.dir)
        return start_sipp(args, **kwargs)

    def make_users(self, n: int, **kwargs) -> SippUsers:
        return make_users(n, self.dir, **kwargs)


@pytest.fixture
def sipp(tmp_path: Path) -> SippLab:
    reason = sipp_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return SippLab(tmp_path / "sipp")
