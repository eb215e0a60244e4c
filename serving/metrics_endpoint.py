"""The Prometheus endpoint: GET /metrics over HTTP or HTTPS, serving.metrics' counters for the served models.

    server = MetricsServer.start([stats, ...], host="127.0.0.1", port=8002)   # GET http://host:port/metrics
    server.port; server.close()
    MetricsServer.serve(render, host, port, ...)     # render() -> awaitable bytes: what --workers' parent serves
    MetricsServer.start_unix([stats, ...], path)     # a worker's private endpoint, for its parent to scrape

Served on the gRPC server's --host, over plain HTTP,
or HTTPS with the server's --tls-cert/--tls-key (and its --tls-client-ca: scrapers need a client certificate
too); with --auth-token* a scrape needs `Authorization: Bearer <token>` (Prometheus: `authorization:` in the
scrape config), as every gRPC call but health does.

The endpoint is one asyncio event loop on one thread, whatever the number of connections: a TLS handshake, a
request head, an idle kept-alive connection and an unread reply each have a timeout (5 s, 10 s, 30 s, 10 s),
and at most 64 connections are open (a new one beyond closes the one quiet longest), so a client that
connects and says nothing, or says it slowly, stalls no scrape. GET (and HEAD) of /metrics or / only: 404
for other paths, 405 for other methods, 401 (with `WWW-Authenticate: Bearer`) without the token. A body that
is rendered asynchronously (the parent of --workers scrapes its workers per request) pauses only its own
connection, bounded by the unread-reply timeout.

The HTTP/1.1 each connection speaks (parsing, timeouts, keep-alive, replies) is serving.metrics_http's; this
module owns the sockets, TLS, the loop thread and the connection limit.
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
from typing import Awaitable, Callable, Iterable

from prometheus_client import generate_latest

from serving.core.errors import StartupError
from serving.metrics import ModelStats, collector_registry
from serving.metrics_http import HttpConnection

__all__ = ["MetricsServer"]

logger = logging.getLogger("serving.metrics")


class MetricsServer:
    """An HTTP(S) server on its own thread serving only these models' metrics, bound to the gRPC server's host,
    with its TLS (client certificates required too under mutual TLS) and its bearer token.

    One asyncio event loop on one daemon thread serves every connection, so no client can stall another or
    cost a thread: the TLS handshake runs per connection with handshake_timeout (never in the accepting
    code), a new connection's request head must arrive within header_timeout (and fit in max_head_bytes), a
    kept-alive connection idle for idle_timeout is closed, a reply not read within write_timeout is dropped,
    and at most max_connections are open at once: a new one beyond it closes the one that has been quiet
    longest (a client that stays idle makes room; a scrape that just connected gets in). The listening
    socket's backlog is `backlog`. `render()` makes each 200 reply's body: bytes, or an awaitable of them."""

    def __init__(self, sock: socket.socket, render: Callable[[], bytes | Awaitable[bytes]],
                 context: ssl.SSLContext | None,
                 auth: Callable[[str | None], bool] | None, *, handshake_timeout: float, header_timeout: float,
                 idle_timeout: float, write_timeout: float, max_connections: int, max_head_bytes: int,
                 backlog: int) -> None:
        self._sock = sock
        self._render = render
        self._context = context
        self._auth = auth
        self._handshake_timeout = handshake_timeout
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._max_head_bytes = max_head_bytes
        self._backlog = backlog
        self._connections: set[HttpConnection] = set()
        self._handshakes: set[asyncio.Task] = set()
        self._renders: set[asyncio.Future] = set()
        self._ticks = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._stopped = False
        self.port: int | None = sock.getsockname()[1] if sock.family != socket.AF_UNIX else None
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    @classmethod
    def start(cls, stats: Iterable[ModelStats], host: str, port: int, certfile: str | None = None,
              keyfile: str | None = None, client_cafile: str | None = None,
              auth: Callable[[str | None], bool] | None = None, **limits) -> "MetricsServer":
        """These models' metrics: serve() with their registry's exposition as the body."""
        registry = collector_registry(stats)
        return cls.serve(lambda: generate_latest(registry), host, port, certfile, keyfile, client_cafile, auth,
                         **limits)

    @classmethod
    def serve(cls, render: Callable[[], bytes | Awaitable[bytes]], host: str, port: int, certfile: str | None = None,
              keyfile: str | None = None, client_cafile: str | None = None,
              auth: Callable[[str | None], bool] | None = None, *, handshake_timeout: float = 5.0,
              header_timeout: float = 10.0, idle_timeout: float = 30.0, write_timeout: float = 10.0,
              max_connections: int = 64, max_head_bytes: int = 8192, backlog: int = 128) -> "MetricsServer":
        """render() makes each scrape's body, on the endpoint's own loop: bytes, or an awaitable (a coroutine run
        there: the parent of --workers sums its workers' metrics so). auth: called with the Authorization header (or
        None); False → 401. The keyword arguments are the limits described in the class docstring (seconds,
        connections, bytes)."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
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
        server = cls(sock, render, context, auth, handshake_timeout=handshake_timeout,
                     header_timeout=header_timeout, idle_timeout=idle_timeout, write_timeout=write_timeout,
                     max_connections=max_connections, max_head_bytes=max_head_bytes, backlog=backlog)
        return server._launch()

    @classmethod
    def start_unix(cls, stats: Iterable[ModelStats], path: str, backlog: int = 16) -> "MetricsServer":
        """A --workers worker's private endpoint: plain HTTP on the unix socket `path`, in a folder only the server's
        user may enter (the parent made it 0700), so it needs neither TLS nor the token; the parent scrapes it."""
        registry = collector_registry(stats)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind the worker's metrics socket {path} ({exc.strerror or exc})") from None
        server = cls(sock, lambda: generate_latest(registry), None, None, handshake_timeout=5.0, header_timeout=10.0,
                     idle_timeout=30.0, write_timeout=10.0, max_connections=8, max_head_bytes=8192, backlog=backlog)
        return server._launch()

    def _launch(self) -> "MetricsServer":
        """Start the loop thread and wait until it accepts (or re-raise why it could not)."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            self._sock.close()
            raise self._failure
        return self

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
        server = await loop.create_server(lambda: HttpConnection(self), sock=self._sock, backlog=self._backlog)
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
            for render in list(self._renders):
                render.cancel()
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

    def _admit(self, connection: HttpConnection) -> None:
        """Count a new connection; at max_connections, close the one quiet longest to make room."""
        if len(self._connections) >= self._max_connections:
            quietest = min(self._connections, key=lambda c: c.last_active)
            self._connections.discard(quietest)
            quietest.abort()
        self._connections.add(connection)
