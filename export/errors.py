"""The export's one error type, in a module of its own so that every step can raise it without a cycle."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """The export could not be done; nothing was written to the output folder."""
