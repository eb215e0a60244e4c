"""The connection flood: many sockets held open (silent, slowloris, idle keep-alive, HTTP/2 preface, trickling bodies) from one thread, and what the server did with each."""

from __future__ import annotations

import heapq
import os
import random
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.abuse.wire import H2_FRAMES, H2_PREFACE, HOST, LIVE_REQUEST, SLOWLORIS_DRIP, SLOWLORIS_HEAD, TRICKLE_HEAD

# -------------------------------------------------------------------------------------- the connection flood


def parse_responses(buffer: bytearray) -> list[str]:
    """Complete HTTP/1.1 responses at the front of `buffer` → their status codes (removed from it); anything that is
    not a response is reported as `garbage` and dropped; an incomplete one is left for the next read."""
    statuses = []
    while buffer:
        if len(buffer) < 5 and b"HTTP/".startswith(buffer):
            break  # the start of one
        if not buffer.startswith(b"HTTP/"):
            statuses.append("garbage")
            buffer.clear()
            break
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            break
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        if len(buffer) < end + 4 + length:
            break
        statuses.append(head[0].split(" ")[1] if " " in head[0] else "garbage")
        del buffer[:end + 4 + length]
    return statuses


@dataclass(eq=False)
class Conn:
    kind: str
    sock: socket.socket
    started: float
    state: str = "connecting"  # → open → closed; or failed
    opened: float | None = None
    closed: float | None = None
    how: str | None = None  # eof, reset, send-error (closed) or why it failed to open
    out: bytes = b""
    dripped: int = 0
    rbuf: bytearray = field(default_factory=bytearray)
    answers: list = field(default_factory=list)  # status codes of HTTP answers; HTTP/2 frame types
    first_generation: bool = True  # trickle reconnects are counted apart from the first connections


class Flood(threading.Thread):
    """TCP connections to one port, opened all at once with non-blocking sockets and driven by one selector loop.
    Kinds: silent, slowloris, keepalive (HTTP port); h2 (`h2`: a gRPC port); trickle (a POST body at a byte per
    `interval`, reconnecting when closed). A connection the server ends (EOF, reset, a send that fails) is closed
    here and its time since connecting kept. `ready` is set once no connection is still connecting (a connect
    that takes over `connect_timeout` counts as failed)."""

    def __init__(self, port: int, kinds: list[str], interval: float = 2.0, connect_timeout: float = 10.0,
                 reconnect: bool = False, h2: bool = False) -> None:
        super().__init__(daemon=True, name="flood")
        self.port, self.kinds, self.interval, self.h2 = port, kinds, interval, h2
        self.connect_timeout, self.reconnect = connect_timeout, reconnect
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.conns: list[Conn] = []
        self.open_count = 0
        self.open_seconds: float | None = None
        self.error: str | None = None
        self._timers: list = []
        self._seq = 0
        self._sel = selectors.DefaultSelector()

    # -------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported; the scenario goes on with what it has
            self.error = repr(exc)
            self.ready.set()
        finally:
            for conn in self.conns:
                if conn.state in ("connecting", "open"):
                    conn.sock.close()
            self._sel.close()

    def _loop(self) -> None:
        began = time.monotonic()
        for kind in self.kinds:
            self._connect(kind)
        while not self.stopped.is_set():
            now = time.monotonic()
            timeout = min(0.2, max(0.0, self._timers[0][0] - now)) if self._timers else 0.2
            for key, _ in self._sel.select(timeout):
                conn = key.data
                if conn.state == "connecting":
                    self._connected(conn)
                elif conn.state == "open":
                    self._readable(conn)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, action, conn = heapq.heappop(self._timers)
                action(conn)
            if not self.ready.is_set():
                pending = [c for c in self.conns if c.state == "connecting"]
                for conn in pending:
                    if now - conn.started > self.connect_timeout:
                        self._fail(conn, "connect timeout")
                if not any(c.state == "connecting" for c in self.conns):
                    self.open_seconds = round(time.monotonic() - began, 3)
                    self.ready.set()

    def _later(self, delay: float, action, conn: Conn) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, action, conn))

    def _connect(self, kind: str, first: bool = True) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = Conn(kind, sock, time.monotonic(), first_generation=first)
        self.conns.append(conn)
        code = sock.connect_ex((HOST, self.port))
        if code == 0:
            self._connected(conn, registered=False)
        elif code in (115, 11):  # EINPROGRESS, EAGAIN
            self._sel.register(sock, selectors.EVENT_WRITE, conn)
        else:
            self._fail(conn, os.strerror(code), registered=False)

    def _connected(self, conn: Conn, registered: bool = True) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(conn, os.strerror(code), registered)
            return
        conn.state, conn.opened = "open", time.monotonic()
        self.open_count += 1
        if registered:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        else:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        first = {"slowloris": SLOWLORIS_HEAD, "keepalive": LIVE_REQUEST, "h2": H2_PREFACE,
                 "trickle": TRICKLE_HEAD}.get(conn.kind, b"")
        self._send(conn, first)
        if conn.kind in ("slowloris", "trickle"):
            self._later(random.uniform(0, self.interval), self._drip, conn)  # spread, not all at once

    def _fail(self, conn: Conn, why: str, registered: bool = True) -> None:
        if registered:
            self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.state, conn.how = "failed", why
        if self.reconnect and not self.stopped.is_set():
            self._later(0.1, lambda c: self._connect(c.kind, first=False), conn)

    def _closed(self, conn: Conn, how: str) -> None:
        self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.state, conn.closed, conn.how = "closed", time.monotonic(), how
        self.open_count -= 1
        if self.reconnect and not self.stopped.is_set():
            self._later(0.1, lambda c: self._connect(c.kind, first=False), conn)

    def _send(self, conn: Conn, data: bytes) -> None:
        conn.out += data
        if not conn.out or conn.state != "open":
            return
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._closed(conn, "send-error")
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._later(0.05, lambda c: self._send(c, b""), conn)

    def _drip(self, conn: Conn) -> None:
        if conn.state != "open":
            return
        if conn.kind == "slowloris" and conn.dripped < len(SLOWLORIS_DRIP):
            byte = SLOWLORIS_DRIP[conn.dripped:conn.dripped + 1]
        else:
            byte = b"a"
        conn.dripped += 1
        self._send(conn, byte)
        if conn.state == "open":
            self._later(self.interval, self._drip, conn)

    def _readable(self, conn: Conn) -> None:
        while True:
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                self._closed(conn, "reset")
                return
            if not data:
                self._closed(conn, "eof")
                return
            conn.rbuf += data
            if self.h2:  # a gRPC port: the server's HTTP/2 frames (its SETTINGS reach silent connections too)
                while len(conn.rbuf) >= 9:
                    length = int.from_bytes(conn.rbuf[:3], "big")
                    if len(conn.rbuf) < 9 + length:
                        break
                    conn.answers.append(H2_FRAMES.get(conn.rbuf[3], f"type{conn.rbuf[3]}"))
                    del conn.rbuf[:9 + length]
            else:
                conn.answers.extend(parse_responses(conn.rbuf))
            del conn.rbuf[65536:]

    # -------------------------------------------------------------- control and figures

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def stats(self) -> dict:
        """Per kind: connections opened, failed to open (why), closed by the server (how), still open, the time
        from connect to the server's close (median, max; "never" where open ones decide it), what was received."""
        now = time.monotonic()
        out = {}
        for kind in dict.fromkeys(self.kinds):
            conns = [c for c in self.conns if c.kind == kind]
            first = [c for c in conns if c.first_generation]
            opened = [c for c in conns if c.opened is not None]
            closed = [c for c in opened if c.state == "closed"]
            still = [c for c in opened if c.state != "closed"]
            times = sorted([c.closed - c.opened for c in closed]) + [float("inf")] * len(still)

            def shown(t: float):
                return "never" if t == float("inf") else round(t, 2)

            out[kind] = {
                "connections": len(first), "opened": len([c for c in first if c.opened is not None]),
                "failed_to_open": dict(Counter(c.how for c in first if c.state == "failed")),
                "closed_by_server": len(closed), "closed_how": dict(Counter(c.how for c in closed)),
                "still_open": len(still),
                "close_s_median": shown(times[(len(times) - 1) // 2]) if times else None,
                "close_s_max": shown(times[-1]) if times else None,
                "received": dict(Counter(a for c in conns for a in c.answers)),
                "open_s_max_still_open": round(max((now - c.opened for c in still), default=0), 1),
            }
            if self.reconnect:
                out[kind]["reconnects"] = len(conns) - len(first)
                out[kind]["reconnect_failures"] = dict(Counter(c.how for c in conns
                                                               if not c.first_generation and c.state == "failed"))
        return out


def split_kinds(n: int, kinds: tuple[str, ...]) -> list[str]:
    """n connections shared out over kinds as evenly as possible, interleaved (so each kind meets the same
    server state while they open)."""
    return [kinds[i % len(kinds)] for i in range(n)]


