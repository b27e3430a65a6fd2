"""Following redirects (RFC 3261 §8.1.3.4), sans I/O: where to send an out-of-dialog
request next after a 3xx.

A 3xx names new targets in its Contacts. They are hostile input: only sip:/sips: URIs
count (no URI headers, no maddr), at most MAX_CONTACTS of one response are considered,
taken best q first; each target is tried once (one seen before is a loop and skipped),
and at most MAX_REDIRECTS requests are sent to redirect targets in all. The caller
(invite_client.send_invite, UserAgent.transact) sends the request to each `next()`
target in turn until one gives a final answer that is not a 3xx; when the targets run
out, `failure()` says why: the last real answer, else a loop or too many redirects.
"""

from __future__ import annotations

import math
from collections import deque

from sipmesh.sip.errors import ParseError
from sipmesh.sip.headers import parse_address
from sipmesh.sip.message import Request, Response
from sipmesh.sip.uri import URI, SipURI

MAX_CONTACTS = 10  # of one 3xx response
MAX_REDIRECTS = 5  # requests sent to redirect targets, in all

LOOP_STATUS = 482  # Loop Detected: what a redirect loop ends as
EXHAUSTED_STATUS = 483  # Too Many Hops: more redirects than MAX_REDIRECTS


def target_key(uri: URI) -> str:
    """What makes two targets the same for the loop check: scheme, user, host, port."""
    if not isinstance(uri, SipURI):
        return str(uri)
    port = uri.port or (5061 if uri.secure else 5060)
    return f"{uri.scheme}:{uri.user or ''}@{uri.host.lower()}:{port}"


def redirect_targets(response: Response, limit: int = MAX_CONTACTS) -> list[SipURI]:
    """The usable targets of a 3xx, best q first (ties in the order given): sip:/sips:
    URIs only, without URI headers or maddr, from its first `limit` Contact values."""
    found: list[tuple[float, int, SipURI]] = []
    for index, value in enumerate(response.headers.get_all("Contact")[:limit]):
        try:
            address = parse_address(value)
        except (ParseError, ValueError):
            continue
        uri = address.uri
        if not isinstance(uri, SipURI) or not uri.host:
            continue
        q = address.q
        q = q if math.isfinite(q) and 0.0 <= q <= 1.0 else 0.0
        uri = uri.copy(headers={})
        uri.params.pop("maddr", None)
        found.append((-q, index, uri))
    return [uri for _, _, uri in sorted(found, key=lambda item: (item[0], item[1]))]


class Redirects:
    """The redirect targets of one request still to try, and how we got to each."""

    def __init__(self, first: URI, *, max_redirects: int = MAX_REDIRECTS,
                 max_contacts: int = MAX_CONTACTS) -> None:
        self.max_redirects = max_redirects
        self.max_contacts = max_contacts
        self.sent = 0  # requests sent to redirect targets so far
        self._queue: deque[tuple[SipURI, tuple[str, ...]]] = deque()
        self._seen = {target_key(first)}
        self._paths: dict[str, tuple[str, ...]] = {target_key(first): (str(first),)}
        self.loop: tuple[str, ...] | None = None  # the first loop met, as a path of URIs
        self.exhausted = False  # targets were left when the bound was reached
        self.answer: Response | None = None  # the last final non-3xx answer of a target

    def on_response(self, target: URI, response: Response) -> None:
        """`target` answered `response` (final): a 3xx adds its targets, anything else
        is remembered as the answer to give if no other target succeeds."""
        if not 300 <= response.status < 400:
            self.answer = response
            return
        path = self._paths.get(target_key(target), (str(target),))
        for uri in redirect_targets(response, self.max_contacts):
            key = target_key(uri)
            if key in self._seen:
                if self.loop is None:
                    self.loop = (*path, str(uri))
                continue
            self._seen.add(key)
            self._paths[key] = (*path, str(uri))
            self._queue.append((uri, self._paths[key]))

    def next(self) -> SipURI | None:
        """The next target to send the request to, or None when there is none (or the
        bound is reached)."""
        if not self._queue:
            return None
        if self.sent >= self.max_redirects:
            self.exhausted = True
            return None
        self.sent += 1
        return self._queue.popleft()[0]

    def failure(self, last: Response) -> tuple[int, str, Response]:
        """(status, reason, response) for the failure once no target is left: a target's
        own answer if one gave one, else the loop, else too many redirects, else `last`
        (a 3xx without a usable Contact)."""
        if self.answer is not None:
            return self.answer.status, self.answer.reason, self.answer
        if self.loop is not None:
            return LOOP_STATUS, "redirect loop: " + " \u2192 ".join(self.loop), last
        if self.exhausted:
            return (EXHAUSTED_STATUS, f"too many redirects (more than {self.max_redirects})",
                    last)
        return last.status, last.reason, last


def redirected(request: Request, target: SipURI) -> Request:
    """`request` sent again to `target` (§8.1.3.4): same Call-ID, From, To; CSeq one
    higher; our Via gone (a new one is added); credentials for the old target gone."""
    retry = Request(headers=request.headers.copy(), method=request.method, uri=target,
                    body=request.body)
    retry.headers.pop_first("Via")
    retry.headers.remove("Authorization")
    retry.headers.remove("Proxy-Authorization")
    number, method = request.cseq
    retry.headers.set("CSeq", f"{number + 1} {method}")
    return retry
