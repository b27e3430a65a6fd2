"""The one bounded wait of the tests: poll a predicate until it holds, or fail saying what
was awaited and for how long.

``wait_for`` blocks (tests that drive processes, threads); ``wait_for_async`` awaits
(tests whose event loop must keep running while they wait). Both share :class:`_Poll`,
so both time out the same way: :class:`LabTimeout` (an ``AssertionError``) naming
``what``, the timeout and the predicate's last exception.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

__all__ = ["LabTimeout", "wait_for", "wait_for_async"]

T = TypeVar("T")


class LabTimeout(AssertionError):
    """A bounded wait ran out of time."""


class _Poll:
    """One wait: each `step()` evaluates the predicate once; the value when truthy, None
    while time remains, LabTimeout when it has run out (or `abort` says why to stop)."""

    def __init__(self, predicate: Callable[[], T], timeout: float, what: str | None,
                 abort: Callable[[], str | None] | None) -> None:
        self.predicate, self.timeout, self.abort = predicate, timeout, abort
        self.what = what or repr(predicate)
        self.deadline = time.monotonic() + timeout
        self.last_exc: BaseException | None = None

    def step(self) -> T | None:
        try:
            value = self.predicate()
        except Exception as exc:  # noqa: BLE001 - predicate errors count as "not yet"
            value, self.last_exc = None, exc
        if value:
            return value
        if self.abort is not None:
            message = self.abort()
            if message:
                raise LabTimeout(f"gave up waiting for {self.what}: {message}")
        if time.monotonic() >= self.deadline:
            extra = f" (last error: {self.last_exc!r})" if self.last_exc else ""
            raise LabTimeout(f"timed out after {self.timeout:g}s waiting for {self.what}{extra}")
        return None


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, *,
             what: str | None = None, abort: Callable[[], str | None] | None = None) -> T:
    """Poll ``predicate`` until it returns a truthy value (which is returned).

    Raises :class:`LabTimeout` after ``timeout`` seconds. ``abort`` (optional) is polled too:
    if it returns a non-empty string, waiting stops at once with that message (e.g. "the
    server process exited").
    """
    poll = _Poll(predicate, timeout, what, abort)
    while (value := poll.step()) is None:
        time.sleep(interval)
    return value


async def wait_for_async(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01,
                         *, what: str | None = None,
                         abort: Callable[[], str | None] | None = None) -> T:
    """:func:`wait_for` for a coroutine: the event loop runs between two polls."""
    poll = _Poll(predicate, timeout, what, abort)
    while (value := poll.step()) is None:
        await asyncio.sleep(interval)
    return value
