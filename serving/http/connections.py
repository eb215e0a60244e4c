"""Every connection of the HTTP port, bounded: how long a client may take to say something, how long it may stay
silent between requests, how many connections are open at once.

    guard = ConnectionGuard(ConnectionPolicy(...), ssl_context)
    server = await loop.create_server(guard.factory(runner.server), host, port)
    guard.reading(request.transport)   # the middleware: the head has arrived, the body is being read
    guard.busy(request.transport)      # ... the body too: the request is being answered
    guard.idle(request.transport)      # ... the answer is written: the connection waits for the next request

aiohttp answers requests but bounds none of this (a connection that never sends a byte, or trickles a request head,
stays open for its keep-alive timeout: an hour), and each open connection holds a file descriptor: enough of them
and the process can accept nothing, on any port. So each connection is wrapped in a protocol of ours that sits
between the transport and aiohttp's, and is in one of these states, each with its own clock:

- `handshake` (TLS): the handshake must finish within `header_timeout`;
- `head`: a new connection's first request head, or a kept-alive one's next head from its first byte, must have
  arrived within `header_timeout` of the connection (or that byte): silent connects and slowloris heads;
- `body`: the body is read by the handler within --http-body-timeout (serving.http.bodies);
- `busy`: being answered; no clock here but the write timeout below;
- `idle`: answered and kept alive: closed after `idle_timeout` without a new byte.
A reply the client does not read (the transport's buffer full) must drain within `write_timeout`.
At most `max_connections` are open: a new one beyond that closes the connection that has been longest in its
state, whether idle, in a head, in a handshake or still sending a body (a trickling body is as old as its first
byte, a client that just connected is the youngest); a connection being answered is never closed to make room,
and when all are, the new one is closed at once. So one client holding as many connections as it
can still cannot keep another client's new connection out. Refusals and evictions are logged at most once per
LOG_EVERY_S per kind, at warning level.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from serving.logs import RateLimitedLog

__all__ = ["ConnectionGuard", "ConnectionPolicy"]

logger = logging.getLogger("serving.http")

HANDSHAKE, HEAD, BODY, BUSY, IDLE = "handshake", "head", "body", "busy", "idle"


@dataclass(frozen=True)
class ConnectionPolicy:
    """The limits of one port's connections (serving.connection_limits builds them from the flags)."""
    max_connections: int
    header_timeout: float
    idle_timeout: float
    write_timeout: float


class _Connection(asyncio.Protocol):
    """One accepted connection: forwards everything to aiohttp's protocol once it is ready, and keeps the clock
    of its current state."""

    def __init__(self, guard: "ConnectionGuard", inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.loop = guard.loop
        self.raw: asyncio.Transport | None = None
        self.transport: asyncio.BaseTransport | None = None  # what aiohttp's protocol holds (TLS or raw)
        self.state = HANDSHAKE
        self.since = 0.0
        self.started = False
        self.closed = False
        self.write_paused = False
        self._timer: asyncio.TimerHandle | None = None

    # --- transport callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        if not self.guard._admit(self):
            self.closed = True
            transport.abort()
            return
        if self.guard.ssl_context is None:
            self._start(transport)
            return
        self.enter(HANDSHAKE)
        transport.pause_reading()  # type: ignore[attr-defined]  # the ClientHello belongs to the TLS layer
        task = self.loop.create_task(self._handshake(transport))
        self.guard._handshakes.add(task)
        task.add_done_callback(self.guard._handshakes.discard)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.state == IDLE:
            self.enter(HEAD)  # a kept-alive connection's next request has begun
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.started else None

    def pause_writing(self) -> None:
        self.write_paused = True
        self._arm(self.guard.policy.write_timeout)
        if self.started:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._arm_for_state()
        if self.started:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel()
        self.guard._forget(self)
        if self.started:
            self.started = False
            self.inner.connection_lost(exc)

    # --- states ---

    def enter(self, state: str) -> None:
        if self.closed:
            return
        self.state = state
        self.since = time.monotonic()
        self.guard._moved(self)
        if not self.write_paused:
            self._arm_for_state()

    def abort(self) -> None:
        self.closed = True
        self._cancel()
        for transport in (self.transport, self.raw):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    async def _handshake(self, raw: asyncio.Transport) -> None:
        tls = None
        try:
            tls = await self.loop.start_tls(raw, self, self.guard.ssl_context, server_side=True,
                                            ssl_handshake_timeout=self.guard.policy.header_timeout,
                                            ssl_shutdown_timeout=self.guard.policy.write_timeout)
        except Exception:  # noqa: BLE001 (timeouts, failed handshakes, resets: the connection just goes)
            pass
        if tls is None or self.closed:
            self.abort()
            if tls is not None:
                tls.abort()
            self.guard._forget(self)
            return
        self._start(tls)

    def _start(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.started = True
        self.guard._by_transport[transport] = self
        self.enter(HEAD)
        self.inner.connection_made(transport)

    def _arm_for_state(self) -> None:
        policy = self.guard.policy
        delay = {HANDSHAKE: None, HEAD: policy.header_timeout, IDLE: policy.idle_timeout}.get(self.state)
        if delay is None:  # the TLS layer times its handshake; a body and an answer are timed by the handler
            self._cancel()
        else:
            self._arm(delay)

    def _arm(self, delay: float) -> None:
        self._cancel()
        self._timer = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.state == IDLE and not self.write_paused:  # routine, not a client's fault: closed politely
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]
            return
        self.guard._log.warning(f"http_{'write' if self.write_paused else self.state}_timeout",
                                hint="a client kept a connection without finishing what it owed; closed")
        self.abort()


class ConnectionGuard:
    """The connections of one HTTP listening port (see the module docstring)."""

    def __init__(self, policy: ConnectionPolicy, ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.ssl_context = ssl_context
        self.loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[_Connection, None] = {}
        self._evictable: dict[_Connection, None] = {}  # all but those being answered, longest in their state first
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}
        self._handshakes: set[asyncio.Task] = set()
        self._log = RateLimitedLog(logger)

    def factory(self, inner_factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for loop.create_server: aiohttp's protocol, guarded."""
        self.loop = asyncio.get_running_loop()
        return lambda: _Connection(self, inner_factory())

    # --- the request's side (the middleware) ---

    def reading(self, transport) -> None:
        self._enter(transport, BODY)

    def busy(self, transport) -> None:
        self._enter(transport, BUSY)

    def idle(self, transport) -> None:
        self._enter(transport, IDLE)

    def _enter(self, transport, state: str) -> None:
        connection = self._by_transport.get(transport)
        if connection is not None:
            connection.enter(state)

    def close_all(self) -> None:
        for connection in list(self._open):
            connection.abort()
        for task in self._handshakes:
            task.cancel()

    # --- the connections' side ---

    def _admit(self, connection: _Connection) -> bool:
        if len(self._open) >= self.policy.max_connections:
            victim = next(iter(self._evictable), None)
            if victim is None:
                self._log.warning("http_connection_refused", max_connections=self.policy.max_connections,
                                  hint="every connection is being answered; the new one is closed")
                return False
            self._log.warning("http_connection_evicted", max_connections=self.policy.max_connections,
                              state=victim.state, hint="at the connection cap: the longest quiet connection closed")
            victim.abort()
            self._forget(victim)
        self._open[connection] = None
        connection.since = time.monotonic()
        self._evictable[connection] = None
        return True

    def _moved(self, connection: _Connection) -> None:
        self._evictable.pop(connection, None)
        if connection.state != BUSY:
            self._evictable[connection] = None  # to the end: the order is how long each has been in its state

    def _forget(self, connection: _Connection) -> None:
        self._open.pop(connection, None)
        self._evictable.pop(connection, None)
        if connection.transport is not None:
            self._by_transport.pop(connection.transport, None)
