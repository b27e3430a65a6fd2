"""A member tells its broker which path each of its pairs took (RFC 3903 PUBLISH).

Only the members know whether a pair runs direct, through a relay or via another member,
and why; the broker's status page shows what they report (broker/paths.py). The
reporter PUBLISHes our view (ops/paths.py: the document, `Event: sipmesh-paths`) to the
network's AOR, the same URI as the roster:

* when it changes (a peer comes up, goes, changes path, its RTT moves by a quarter), at
  most once every `min_interval` seconds, changes in between coalesced; the member calls
  `poke()` where a peer changes, and the reporter also looks every `check_every` seconds;
* refreshed (SIP-If-Match, no body) before the publication runs out; a 412 (the broker
  lost it, e.g. restarted) publishes it anew;
* removed (Expires: 0) when we leave the network.

A server that does not take it (Kamailio: 489 Bad Event; or 403/405/415/501) is told
nothing more: one log line, then the reporter stays quiet. Other failures are retried, each
later (up to a minute), and logged once until it works again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from sipmesh.ops import paths
from sipmesh.ops.paths import Pair
from sipmesh.sip.message import Response
from sipmesh.sip.ua import CallFailed, UserAgent
from sipmesh.sip.uri import SipURI

log = logging.getLogger("sipmesh.agent.pathreport")

# The server will not take it (no such event package, method or type; or not from us):
# asking again would not change its mind.
UNSUPPORTED = frozenset({403, 405, 415, 489, 501})
REQUEST_TIMEOUT = 10.0
MAX_BACKOFF = 60.0


class PathReporter:
    """Our pairs' paths at the broker, for as long as we are in the network."""

    def __init__(self, ua: UserAgent, network: str, aor: SipURI, source: Callable[[], list[Pair]],
                 *, expires: int = 300, min_interval: float = 1.0, check_every: float = 2.0) -> None:
        self.ua = ua
        self.network = network
        self.aor = aor
        self.source = source
        self.expires = expires
        self.min_interval = min_interval
        self.check_every = check_every
        self.etag: str | None = None
        self.published: list[Pair] | None = None  # what the broker has
        self.state = "starting"  # -> publishing | unsupported | failing | stopped
        self._refresh_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed: int | None = None  # the status we last logged a failure for

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def poke(self) -> None:
        """Something about a peer changed: look soon."""
        self._wake.set()

    async def stop(self) -> None:
        """Remove our publication (we leave the network)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.etag is not None and self.state == "publishing":
            try:
                async with asyncio.timeout(5):
                    await self._send(None, expires=0)
            except (OSError, CallFailed, asyncio.TimeoutError) as exc:
                log.info("network %s: removing our path report: %s", self.network, exc)
        self.state = "stopped"

    # -- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 1.0
        while True:
            pairs = self.source()
            fresh = self.etag is None or paths.changed(self.published, pairs)
            if fresh or time.monotonic() >= self._refresh_at:
                ok = await self._publish(pairs if fresh else None)
                if self.state == "unsupported":
                    return
                if ok:  # at most one PUBLISH a min_interval: changes meanwhile coalesce
                    backoff = 1.0
                    await asyncio.sleep(self.min_interval)
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            try:
                async with asyncio.timeout(min(self.check_every,
                                               self._refresh_at - time.monotonic())):
                    await self._wake.wait()
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _publish(self, pairs: list[Pair] | None) -> bool:
        """PUBLISH our pairs (None: refresh); True when the broker has them."""
        try:
            # (asyncio.timeout, not wait_for: in 3.11 wait_for can lose the cancel of stop())
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await self._send(pairs, expires=self.expires)
            if response.status == 412:  # it lost ours (restarted, expired): publish anew
                self.etag = None
                pairs = self.source()
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    response = await self._send(pairs, expires=self.expires)
        except (OSError, CallFailed, asyncio.TimeoutError) as exc:
            self._failure(None, f"{type(exc).__name__}: {exc}")
            return False
        if response.status in UNSUPPORTED:
            self.state = "unsupported"
            log.info("network %s: the server does not take path reports (%d %s): not sending "
                     "them", self.network, response.status, response.reason)
            return False
        if response.status == 423:
            value = (response.headers.get("Min-Expires") or "").strip()
            if value.isdigit() and int(value) <= 3600:
                self.expires = max(self.expires, int(value))
        if response.status != 200:
            self._failure(response.status, f"{response.status} {response.reason}")
            return False
        self.etag = (response.headers.get("SIP-ETag") or "").strip() or None
        value = (response.headers.get("Expires") or "").strip()
        granted = int(value) if value.isdigit() else self.expires
        self._refresh_at = time.monotonic() + max(1.0, min(granted * 0.8, granted - 5))
        if pairs is not None:
            self.published = list(pairs)
        if self.state == "failing":
            log.info("network %s: path reports reach the server again", self.network)
        self.state, self._failed = "publishing", None
        return True

    async def _send(self, pairs: list[Pair] | None, *, expires: int) -> Response:
        request = self.ua.new_request("PUBLISH", self.aor.copy())
        request.headers.add("Event", paths.EVENT)
        request.headers.add("Expires", str(expires))
        if self.etag is not None:
            request.headers.add("SIP-If-Match", self.etag)
        if pairs is not None:
            request.headers.add("Content-Type", paths.CONTENT_TYPE)
            request.body = paths.serialise(self.ua.config.user, pairs)
        return await self.ua.request(request)

    def _failure(self, status: int | None, text: str) -> None:
        if self.state != "failing" or self._failed != status:
            log.warning("network %s: path report not taken: %s (trying again)", self.network, text)
        self.state, self._failed = "failing", status
