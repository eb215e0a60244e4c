"""What clients do wrong is logged so that no client can grow the log at will (serving.logs), in-process: one warning
line per kind per minute carrying how many more there were, never a traceback; aiohttp's reports of malformed
requests and the event loop's "out of descriptors while accepting" go through it; library warnings are JSON lines.
Run: .venv/bin/python -m pytest tests/serving/test_serving_client_faults.py -q"""

from __future__ import annotations

import errno
import io
import json
import logging
import warnings
from unittest import mock

import pytest

from serving.logs import LoopFaults, RateLimitedLog, configure_logging


@pytest.fixture
def log_lines(monkeypatch):
    """configure_logging('info', 'json') writing to a buffer; returns a function giving the lines so far."""
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    configure_logging("info", "json")
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    logging.captureWarnings(False)
    logging.getLogger("aiohttp.server").filters.clear()


def test_a_fault_repeated_a_thousand_times_is_one_line_then_one_a_minute(log_lines):
    clock = [1000.0]
    log = RateLimitedLog(logging.getLogger("serving.http"))
    with mock.patch("serving.logs.time.monotonic", lambda: clock[0]):
        for _ in range(1000):
            log.warning("http_head_timeout")
        clock[0] += 61
        log.warning("http_head_timeout")
        log.warning("http_connection_evicted")
    lines = log_lines()
    assert [(line["event"], line["suppressed"], line["level"]) for line in lines] == [
        ("http_head_timeout", 0, "warning"), ("http_head_timeout", 999, "warning"),
        ("http_connection_evicted", 0, "warning")]


def test_aiohttp_bad_request_reports_lose_their_traceback(log_lines):
    server = logging.getLogger("aiohttp.server")
    for _ in range(50):
        try:
            raise ValueError("Invalid method encountered: b'G\\x00T'")
        except ValueError:
            server.exception("Error handling request from %s", "127.0.0.1")
    lines = log_lines()
    assert len(lines) == 1 and lines[0]["event"] == "http_client_fault" and lines[0]["level"] == "warning"
    assert lines[0]["error"] == "ValueError" and "exception" not in lines[0]


def test_running_out_of_descriptors_while_accepting_is_one_warning(log_lines):
    faults = LoopFaults(logging.getLogger("serving"))
    loop = mock.Mock()
    for _ in range(500):
        faults.handle(loop, {"message": "socket.accept() out of system resource",
                             "exception": OSError(errno.EMFILE, "Too many open files")})
    faults.handle(loop, {"message": "something else", "exception": RuntimeError("a bug")})
    lines = log_lines()
    assert [(line["event"], line["errno"]) for line in lines] == [("accept_failed", errno.EMFILE)]
    loop.default_exception_handler.assert_called_once()  # anything else is reported as asyncio does


def test_library_warnings_are_json_lines(log_lines):
    warnings.warn("invalid value encountered in cast", RuntimeWarning, stacklevel=1)
    lines = log_lines()
    assert lines and lines[-1]["logger"] == "py.warnings" and "invalid value" in lines[-1]["event"]
