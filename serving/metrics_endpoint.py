"""The Prometheus endpoint: GET /metrics over HTTP or HTTPS, serving.metrics' counters for the served models.

    server = MetricsServer.start([stats, ...], host="127.0.0.1", port=8002)   # GET http://host:port/metrics
    server.port; server.close()

Served on the gRPC server's --host, over plain HTTP,
or HTTPS with the server's --tls-cert/--tls-key (and its --tls-client-ca: scrapers need a client certificate
too); with --auth-token* a scrape needs `Authorization: Bearer <token>` (Prometheus: `authorization:` in the
scrape config), as every gRPC call but health does.

The endpoint is one asyncio event loop on one thread, whatever the number of connections: a TLS handshake, a
request head, an idle kept-alive connection and an unread reply each have a timeout (5 s, 10 s, 30 s, 10 s),
and at most 64 connections are open (a new one beyond closes the one quiet longest), so a client that
connects and says nothing, or says it slowly, stalls no scrape. GET (and HEAD) of /metrics or / only: 404
for other paths, 405 for other methods, 401 (with `WWW-Authenticate: Bearer`) without the token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
import threading
from contextlib import suppress
from email.utils import formatdate
from typing import Callable, Iterable
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry

from serving.core.errors import StartupError
from serving.metrics import ModelStats, collector_registry

__all__ = ["MetricsServer"]

logger = logging.getLogger("serving.metrics")


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


class _HttpConnection(asyncio.Protocol):
    """One connection, driven by the event loop's callbacks: no task (but for the TLS handshake) and no thread.
    Requests are answered as soon as their head is complete; one timer at a time bounds what the client owes:
    the first request head (header_timeout), the next one on a kept-alive connection (idle_timeout, then
    header_timeout from its first byte), a reply it does not read or a close that does not finish
    (write_timeout). `last_active` orders connections for eviction when the endpoint is full."""

    def __init__(self, server: "MetricsServer") -> None:
        self._server = server
        self._loop = server._loop
        self.transport: asyncio.Transport | None = None
        self.last_active = next(server._ticks)
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._answered = 0
        self._closing = False
        self._write_paused = False
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
        if not self._buffer and self._answered and not self._write_paused:
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
        if self._closing:
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
        if not self._closing and not self._write_paused and self._ready:
            fresh = self._answered == 0 or self._buffer
            self._arm(self._server._header_timeout if fresh else self._server._idle_timeout)

    def _close(self) -> None:
        """After a reply: close once it is sent (a TLS close included), or abort after write_timeout."""
        self._closing = True
        self._arm(self._server._write_timeout)
        self.transport.close()  # type: ignore[union-attr]

    def _process(self) -> None:
        limit = self._server._max_head_bytes
        while not self._closing and not self._write_paused:
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
            self._reply(200, generate_latest(self._server._registry), CONTENT_TYPE_LATEST, (), keep_alive,
                        head_only)

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


class MetricsServer:
    """An HTTP(S) server on its own thread serving only these models' metrics, bound to the gRPC server's host,
    with its TLS (client certificates required too under mutual TLS) and its bearer token.

    One asyncio event loop on one daemon thread serves every connection, so no client can stall another or
    cost a thread: the TLS handshake runs per connection with handshake_timeout (never in the accepting
    code), a new connection's request head must arrive within header_timeout (and fit in max_head_bytes), a
    kept-alive connection idle for idle_timeout is closed, a reply not read within write_timeout is dropped,
    and at most max_connections are open at once: a new one beyond it closes the one that has been quiet
    longest (a client that stays idle makes room; a scrape that just connected gets in). The listening
    socket's backlog is `backlog`."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry, context: ssl.SSLContext | None,
                 auth: Callable[[str | None], bool] | None, *, handshake_timeout: float, header_timeout: float,
                 idle_timeout: float, write_timeout: float, max_connections: int, max_head_bytes: int,
                 backlog: int) -> None:
        self._sock = sock
        self._registry = registry
        self._context = context
        self._auth = auth
        self._handshake_timeout = handshake_timeout
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._max_head_bytes = max_head_bytes
        self._backlog = backlog
        self._connections: set[_HttpConnection] = set()
        self._handshakes: set[asyncio.Task] = set()
        self._ticks = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._stopped = False
        self.port: int = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    @classmethod
    def start(cls, stats: Iterable[ModelStats], host: str, port: int, certfile: str | None = None,
              keyfile: str | None = None, client_cafile: str | None = None,
              auth: Callable[[str | None], bool] | None = None, *, handshake_timeout: float = 5.0,
              header_timeout: float = 10.0, idle_timeout: float = 30.0, write_timeout: float = 10.0,
              max_connections: int = 64, max_head_bytes: int = 8192, backlog: int = 128) -> "MetricsServer":
        """auth: called with the Authorization header (or None); False → 401. The keyword arguments are the
        limits described in the class docstring (seconds, connections, bytes)."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        registry = collector_registry(stats)
        context = None
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            if client_cafile:
                context.load_verify_locations(cafile=client_cafile)
                context.verify_mode = ssl.CERT_REQUIRED
        host = host.strip("[]")
        # proto IPPROTO_TCP (not 0): asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind the metrics endpoint to {host}:{port} ({exc}); "
                               "choose another --metrics-port (0: any free port, -1: no metrics)") from None
        server = cls(sock, registry, context, auth, handshake_timeout=handshake_timeout,
                     header_timeout=header_timeout, idle_timeout=idle_timeout, write_timeout=write_timeout,
                     max_connections=max_connections, max_head_bytes=max_head_bytes, backlog=backlog)
        server._thread.start()
        server._ready.wait()
        if server._failure is not None:
            server._thread.join()
            sock.close()
            raise server._failure
        return server

    def close(self) -> None:
        """Stop accepting, drop every connection, stop the loop and join its thread."""
        if self._closed:
            return
        self._closed = True
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop has already finished
                pass
        self._thread.join(5)
        self._sock.close()

    # --- on the loop thread ---

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 (start() re-raises it if it happened while starting)
            if not self._ready.is_set():
                self._failure = exc
                self._ready.set()
            else:
                logger.warning("metrics endpoint stopped: %r", exc)

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        self._loop, self._stopping = loop, asyncio.Event()
        server = await loop.create_server(lambda: _HttpConnection(self), sock=self._sock, backlog=self._backlog)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            # Stop accepting first and let connections accepted just now reach connection_made (which aborts
            # them): one accepted once Server.close() has run would never get a transport, and its socket would
            # stay open (asyncio asserts in Server._attach).
            self._stopped = True
            with suppress(NotImplementedError, ValueError, OSError):
                loop.remove_reader(self._sock.fileno())
            for _ in range(4):
                await asyncio.sleep(0)
            server.close()
            for connection in list(self._connections):
                connection.abort()
            self._connections.clear()
            if self._handshakes:  # each ends once its connection is aborted; asyncio.run cancels any left
                await asyncio.wait(list(self._handshakes), timeout=1)
            await asyncio.sleep(0)  # aborted transports close their sockets on the next iteration

    @staticmethod
    def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # What misbehaving clients cause (failed handshakes, resets) is no news; keep it out of the logs.
        logger.debug("metrics endpoint: %s", context.get("message"), exc_info=context.get("exception"))

    def _admit(self, connection: _HttpConnection) -> None:
        """Count a new connection; at max_connections, close the one quiet longest to make room."""
        if len(self._connections) >= self._max_connections:
            quietest = min(self._connections, key=lambda c: c.last_active)
            self._connections.discard(quietest)
            quietest.abort()
        self._connections.add(connection)
