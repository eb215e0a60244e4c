"""The serving error types and the one table that maps them to gRPC status codes.

Code below the servicers raises these (never grpc calls), so backends, image decoding and the repository
reader stay independent of gRPC; `status_for(exc)` is the only place an exception becomes a status.
Imported by serving.interceptors (the RPC boundary) and serving.server (startup errors).
"""

from __future__ import annotations

import grpc

__all__ = [
    "ServingError", "InvalidInput", "ImageError", "LimitExceeded", "NotFound", "NotReady", "Overloaded",
    "Unauthenticated", "DeadlineExceeded", "StartupError", "UsageError", "status_for",
]


class ServingError(Exception):
    """Base class; the message is what the caller sees in the status details."""


class InvalidInput(ServingError):
    """The request is malformed (zero images, bad top_k, ...)."""


class ImageError(InvalidInput):
    """One image of a batch cannot be used; the message names its index and the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


class LimitExceeded(ServingError):
    """A per-request limit of the server was exceeded (too many images)."""


class NotFound(ServingError):
    """The request names something the server does not have (e.g. a model)."""


class NotReady(ServingError):
    """The model is not loaded and warm yet, or the server is shutting down; the client may retry."""


class Overloaded(NotReady):
    """The model's request queue is full (--max-queue-size); the client may retry later. The message starts
    with Triton's words, "Exceeds maximum queue size"."""


class Unauthenticated(ServingError):
    """The call lacks the `authorization: Bearer <token>` metadata the server was started with, or it is wrong."""


class DeadlineExceeded(ServingError):
    """The call's deadline passed before the server finished it (work stops between images)."""


class StartupError(ServingError):
    """The server cannot start (bad repository, checksum mismatch, unavailable device); exits 1."""


class UsageError(StartupError):
    """Flags that cannot work together (--tls-cert without --tls-key, ...); exits 2, as argparse does."""


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
