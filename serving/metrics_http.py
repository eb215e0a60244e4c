"""The metrics endpoint's HTTP/1.1, one connection at a time: request heads parsed, requests answered, the timeouts
that bound what a client owes, keep-alive and replies.

It exists apart from serving.metrics_endpoint (which owns the sockets, TLS, the loop thread and the connection
limit) so that the protocol can be read on its own. A connection shares its endpoint's state (the `Endpoint`
protocol below: MetricsServer's attributes), and nothing here imports the endpoint.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import ssl
from email.utils import formatdate
from typing import Awaitable, Callable, Protocol
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["Endpoint", "HttpConnection"]

logger = logging.getLogger("serving.metrics")


class Endpoint(Protocol):
    """What a connection reads and updates of the endpoint that accepted it (serving.metrics_endpoint.MetricsServer)."""
    _loop: asyncio.AbstractEventLoop | None
    _ticks: itertools.count
    _context: ssl.SSLContext | None
    _stopped: bool
    _connections: set[HttpConnection]
    _handshakes: set[asyncio.Task]
    _renders: set[asyncio.Future]
    _render: Callable[[], bytes | Awaitable[bytes]]
    _auth: Callable[[str | None], bool] | None
    _handshake_timeout: float
    _header_timeout: float
    _idle_timeout: float
    _write_timeout: float
    _max_head_bytes: int

    def _admit(self, connection: HttpConnection) -> None: ...


class _BadRequest(Exception):
    def __init__(self, code: int, message: bytes) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


_REASON_PHRASES = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                   431: "Request Header Fields Too Large", 500: "Internal Server Error",
                   505: "HTTP Version Not Supported"}


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (names lower-cased; a repeated header keeps its last value)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _BadRequest(400, b"bad request line\n")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, b"HTTP/1.0 or HTTP/1.1 only\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, b"bad header line\n")
        headers[name.lower()] = value.strip()
    return method, target, version, headers


class HttpConnection(asyncio.Protocol):
    """One connection, driven by the event loop's callbacks: no task (but for the TLS handshake) and no thread.
    Requests are answered as soon as their head is complete; one timer at a time bounds what the client owes:
    the first request head (header_timeout), the next one on a kept-alive connection (idle_timeout, then
    header_timeout from its first byte), a reply it does not read or a close that does not finish
    (write_timeout). `last_active` orders connections for eviction when the endpoint is full."""

    def __init__(self, server: Endpoint) -> None:
        self._server = server
        self._loop = server._loop
        self.transport: asyncio.Transport | None = None
        self.last_active = next(server._ticks)
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._answered = 0
        self._closing = False
        self._write_paused = False
        self._rendering = False  # an asynchronous body is being made: no reading, no next request until it is sent
        self._ready = server._context is None  # under TLS: once start_tls has handed over the TLS transport

    # --- transport callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._server._stopped:
            self.abort()
            return
        self._server._admit(self)
        if self._server._context is None:
            self._await_request()
            return
        # No plain byte may be read before the TLS layer takes over: the ClientHello is its.
        transport.pause_reading()  # type: ignore[attr-defined]
        task = self._loop.create_task(self._handshake(transport))
        self._server._handshakes.add(task)
        task.add_done_callback(self._server._handshakes.discard)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_active = next(self._server._ticks)
        if not self._buffer and self._answered and not self._write_paused and not self._rendering:
            self._arm(self._server._header_timeout)  # a kept-alive connection's next request has begun
        self._buffer += data
        if self._ready:
            self._process()
        # else: TLS data that came in before start_tls returned, answered as soon as it does

    def eof_received(self) -> bool:
        return False  # the transport closes itself once what was written is sent

    def pause_writing(self) -> None:  # the client does not read its replies
        self._write_paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._arm(self._server._write_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._closing or self._rendering:
            return
        self.transport.resume_reading()  # type: ignore[union-attr]
        self._await_request()
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self._server._connections.discard(self)

    # --- the connection's life ---

    async def _handshake(self, raw: asyncio.BaseTransport) -> None:
        server = self._server
        tls = None
        try:
            tls = await self._loop.start_tls(raw, self, server._context, server_side=True,  # type: ignore[arg-type]
                                             ssl_handshake_timeout=server._handshake_timeout,
                                             ssl_shutdown_timeout=server._handshake_timeout)
        except Exception:  # noqa: BLE001 (timeouts, failed handshakes, resets: the connection just goes)
            pass
        finally:
            if tls is None:  # failed, or closed by us (evicted, shutdown) while in progress
                self._closing = True
                raw.abort()
                server._connections.discard(self)
        if tls is not None and not self._closing:
            self.transport = tls  # type: ignore[assignment]
            self._ready = True
            self.last_active = next(server._ticks)
            self._await_request()
            self._process()

    def abort(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, self.abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _await_request(self) -> None:
        if not self._closing and not self._write_paused and not self._rendering and self._ready:
            fresh = self._answered == 0 or self._buffer
            self._arm(self._server._header_timeout if fresh else self._server._idle_timeout)

    def _close(self) -> None:
        """After a reply: close once it is sent (a TLS close included), or abort after write_timeout."""
        self._closing = True
        self._arm(self._server._write_timeout)
        self.transport.close()  # type: ignore[union-attr]

    def _process(self) -> None:
        limit = self._server._max_head_bytes
        while not self._closing and not self._write_paused and not self._rendering:
            while self._buffer[:2] == b"\r\n":  # empty lines before a request line are allowed
                del self._buffer[:2]
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0 and len(self._buffer) <= limit:
                return
            if end < 0 or end + 4 > limit:
                self._reply(431, b"request head too large\n", "text/plain", (), keep_alive=False)
                return
            head = bytes(self._buffer[:end])
            del self._buffer[:end + 4]
            try:
                method, target, version, headers = _parse_head(head)
            except _BadRequest as bad:
                self._reply(bad.code, bad.message, "text/plain", (), keep_alive=False)
                return
            keep_alive = (version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
                          and "transfer-encoding" not in headers and headers.get("content-length", "0") == "0")
            try:
                self._answer(method, target, headers, keep_alive)
            except Exception:  # noqa: BLE001 (a collector's or the auth callback's bug: logged, and a 500)
                logger.exception("metrics endpoint: cannot answer %s %s", method, target)
                self._reply(500, b"internal error\n", "text/plain", (), keep_alive=False)
                return
            self._answered += 1
            self.last_active = next(self._server._ticks)
            self._await_request()

    def _answer(self, method: str, target: str, headers: dict[str, str], keep_alive: bool) -> None:
        """GET (or HEAD) /metrics only; with a token configured, the same `Authorization: Bearer` the gRPC
        API requires."""
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._reply(405, b"method not allowed: GET /metrics\n", "text/plain", (("Allow", "GET, HEAD"),),
                        keep_alive)
        elif urlsplit(target).path not in ("/metrics", "/"):
            self._reply(404, b"not found: the metrics are at /metrics\n", "text/plain", (), keep_alive, head_only)
        elif self._server._auth is not None and not self._server._auth(headers.get("authorization")):
            self._reply(401, b"missing or invalid credentials: send `Authorization: Bearer <token>`\n",
                        "text/plain", (("WWW-Authenticate", "Bearer"),), keep_alive, head_only)
        else:
            body = self._server._render()
            if inspect.isawaitable(body):
                self._reply_when_rendered(body, keep_alive, head_only)
            else:
                self._reply(200, body, CONTENT_TYPE_LATEST, (), keep_alive, head_only)

    def _reply_when_rendered(self, body: Awaitable[bytes], keep_alive: bool, head_only: bool) -> None:
        """Reply once `body` is made, reading nothing meanwhile; the unread-reply timeout bounds the wait."""
        self._rendering = True
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._arm(self._server._write_timeout)
        task = asyncio.ensure_future(body)
        self._server._renders.add(task)
        task.add_done_callback(lambda done: self._rendered(done, keep_alive, head_only))

    def _rendered(self, task: asyncio.Future, keep_alive: bool, head_only: bool) -> None:
        self._server._renders.discard(task)
        self._rendering = False
        error = None if task.cancelled() else task.exception()
        if self._closing or task.cancelled():
            return
        if error is not None:
            logger.error("metrics endpoint: cannot render the metrics", exc_info=error)
            self._reply(500, b"internal error\n", "text/plain", (), keep_alive=False)
            return
        self._reply(200, task.result(), CONTENT_TYPE_LATEST, (), keep_alive, head_only)
        if not self._closing and not self._write_paused:
            self.transport.resume_reading()  # type: ignore[union-attr]
            self._await_request()
            self._process()

    def _reply(self, code: int, body: bytes, content_type: str, headers, keep_alive: bool,
               head_only: bool = False) -> None:
        lines = [f"HTTP/1.1 {code} {_REASON_PHRASES.get(code, 'Error')}", f"Date: {formatdate(usegmt=True)}",
                 f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if not keep_alive:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")  # type: ignore[union-attr]
                             + (b"" if head_only else body))
        if not keep_alive:
            self._close()
