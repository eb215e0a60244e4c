"""Structured logging for the server: one JSON object per line on stderr (or `key=value` text).

    from serving.logs import configure_logging, log_event
    configure_logging("info", "json")
    log_event(logger, logging.INFO, "ready", address="127.0.0.1:50051")
    → {"ts": "2026-11-28T19:30:00.123Z", "level": "info", "logger": "serving", "event": "ready", "address": ...}

Fields travel in the record's `fields` attribute, so they never collide with LogRecord's own attributes.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure_logging", "log_event", "LOG_LEVELS", "RateLimitedLog", "LOG_EVERY_S", "LoopFaults"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_EVERY_S = 60.0  # a client's fault of one kind is logged at most this often (the rest are counted into it)


def log_event(logger: logging.Logger, level: int, event: str, **fields) -> None:
    """Log `event` with structured fields (cheap no-op when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


class RateLimitedLog:
    """Warnings about what clients do (bad requests, timeouts, refused connections): at most one line per event per
    `every` seconds, carrying how many more there were (`suppressed`), so a client cannot grow the log at will."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY_S) -> None:
        self.logger = logger
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, event: str, **fields) -> None:
        now = time.monotonic()
        last, folded = self._seen.get(event, (float("-inf"), 0))
        if now - last < self.every:
            self._seen[event] = (last, folded + 1)
            return
        self._seen[event] = (now, 0)
        log_event(self.logger, logging.WARNING, event, suppressed=folded, **fields)


class _ClientFaults(logging.Filter):
    """aiohttp's server logger reports a client's malformed request or dropped connection as an error with a
    traceback: here it becomes one rate-limited warning line naming the exception, with no traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._log = RateLimitedLog(logging.getLogger("serving.http"))

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        self._log.warning("http_client_fault", error=type(error).__name__ if error else record.getMessage(),
                          detail=str(error)[:200] if error else None)
        return False


class LoopFaults:
    """The event loop's error reports (loop.set_exception_handler): running out of file descriptors or memory while
    accepting, which asyncio retries a second later by itself, is one rate-limited warning instead of an error with
    a traceback each time; anything else is reported as asyncio does."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = RateLimitedLog(logger)

    def handle(self, loop, context: dict) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and "accept" in context.get("message", ""):
            self._log.warning("accept_failed", error=error.strerror or str(error), errno=error.errno,
                              hint="out of file descriptors or memory; accepting again shortly")
            return
        loop.default_exception_handler(context)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
                 "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in getattr(record, "fields", {}).items())
        line = f"{_timestamp(record)} {record.levelname.lower():7s} {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route all logging to stderr with the chosen format; idempotent. `level` applies to the `serving`
    loggers; other libraries (asyncio, grpc) log at info and above only, so debug stays one line per request."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = getattr(logging, level.upper())
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger("serving").setLevel(numeric)
    logging.captureWarnings(True)  # a library's warning is a log line in the chosen format, not raw stderr
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [_ClientFaults()]
