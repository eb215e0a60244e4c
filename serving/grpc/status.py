"""The one table from serving.core.errors types to gRPC status codes (the HTTP transport has its own:
serving/http/errors.py)."""

from __future__ import annotations

import grpc

from serving.core.errors import DeadlineExceeded, InvalidInput, LimitExceeded, NotFound, NotReady, Unauthenticated

__all__ = ["status_for"]

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, details) for an exception raised while handling an RPC. Anything not listed is a
    server bug: INTERNAL with the exception type only (the traceback goes to the log, not to the caller)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
