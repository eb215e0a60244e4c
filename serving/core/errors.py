"""The serving error types: protocol-neutral (no gRPC, no HTTP), each a kind of failure the core can report.

The core, backends, image decoding and the repository reader raise these; each transport has the one table that
turns them into its statuses: serving.grpc.status (gRPC codes) and serving/http/errors.py (HTTP statuses).
"""

from __future__ import annotations

__all__ = [
    "ServingError", "InvalidInput", "ImageError", "LimitExceeded", "NotFound", "NotReady", "Overloaded",
    "Unauthenticated", "DeadlineExceeded", "StartupError", "UsageError",
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
