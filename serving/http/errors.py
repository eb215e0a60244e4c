"""Errors over HTTP: the one table from serving.core.errors types to statuses, and the errors only HTTP has.

Every error body is `{"error": "<message>"}` (what tritonclient.http and the KServe v2 REST protocol read).
"""

from __future__ import annotations

import json

from aiohttp import web

from serving.core.errors import (DeadlineExceeded, InvalidInput, LimitExceeded, NotFound, NotReady, Overloaded,
                            ServingError, Unauthenticated)

__all__ = ["HttpError", "status_for", "error_response"]


class HttpError(ServingError):
    """An HTTP-only refusal with its own status: 405, 408, 413 (body too large), 415, 429 (concurrency cap)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


_STATUSES: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthenticated, 401),
    (NotFound, 404),
    (Overloaded, 429),  # before NotReady, its base class
    (NotReady, 503),
    (DeadlineExceeded, 504),
    (LimitExceeded, 413),
    (InvalidInput, 400),
)


def status_for(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message). Anything not listed is a server bug: 500 with the type only (details in the log)."""
    if isinstance(exc, HttpError):
        return exc.status, str(exc)
    for kind, status in _STATUSES:
        if isinstance(exc, kind):
            return status, str(exc)
    return 500, f"internal error ({type(exc).__name__}); see the server log"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    extra = dict(headers or {})
    if status == 401:
        extra.setdefault("WWW-Authenticate", "Bearer")
    return web.Response(status=status, body=json.dumps({"error": message}).encode(),
                        content_type="application/json", headers=extra)
