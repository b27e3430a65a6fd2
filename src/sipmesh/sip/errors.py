"""The one error type of the SIP parsers."""

from __future__ import annotations


class ParseError(ValueError):
    """Malformed SIP input. `status` is the response code to answer with where one can be formed."""

    def __init__(self, reason: str, status: int = 400, partial: object | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        # What could be parsed before the error (a Request or Response), so that a
        # transport can still answer a broken request with 400 (or 505, 513, ...).
        self.partial: object | None = partial
