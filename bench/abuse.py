"""Hostile-but-cheap clients against a running server, and whether other ("victim") clients still get answers.

    python -m bench.abuse [--scenario connections|grpc-connections|bodies|trickle|drain ...] \\
        [--cwd DIR] [--label NAME] [--model-repository REPO] [--server-flags "--workers 2"] [--nofile 1024] \\
        [--window-seconds 60] [--observe-seconds 150] [--body-window-seconds 20] [--json OUT] [--log-dir DIR]

    # before/after: the same scenarios against an older commit's serving/ and the working tree
    rm -rf /tmp/before && mkdir -p /tmp/before && git archive COMMIT serving | tar -x -C /tmp/before
    python -m bench.abuse --cwd /tmp/before --label before --json /tmp/abuse_before.json
    python -m bench.abuse --label after --json /tmp/abuse_after.json
    python -m bench.abuse --cwd /tmp/before --label before-w2 --scenario connections --server-flags "--workers 2"

An attack that costs the attacker nothing (an open socket, a byte every two seconds, one request body) must not
cost the server its ability to answer everybody else. Each scenario starts its own server (bench.server_process,
in --cwd, so any checkout of serving/ can be measured the same way: serve_ab's A/B), lowered to --nofile open files
from its start (through prlimit: a real deployment's default, where a flood of sockets exhausts descriptors long
before memory), attacks it from this process, measures the victims meanwhile, and stops it with SIGTERM:

- connections: --attack-connections TCP connections to the HTTP port, a third each silent (connect, send nothing),
  slowloris (a request head that never ends: one header byte every 2 s) and idle keep-alive (one cheap request,
  then silence). Once they are open (or failed: counted), for --window-seconds one thread each calls gRPC Classify,
  REST infer on a fresh connection per call, and the gRPC health check at ~20/s. Reported: victim calls, failures
  and latency; how many attacker connections the server closed and how long after connecting (watched for up to
  --observe-seconds after the window); how much the server logged meanwhile (a log an attacker can grow at will
  fills a disk); the server's RSS and threads (all its processes) before and after.
- grpc-connections: the same against the gRPC port: silent connections, and ones that send the HTTP/2 preface and
  an empty SETTINGS frame and then nothing.
- bodies: per body format, 8 threads send the largest body of its worst shape that the server accepts (sizes from
  the `ready` log record's http_limits, else max_message_bytes) in a loop for --body-window-seconds; the attacker's
  answers (status, time), the victims' latency, and the server's RSS at idle, at most (sampled every 100 ms) and
  after. One fresh server per format: memory kept after one format would be the next one's baseline.
- trickle: 512 connections send a whole POST head with Content-Length: 1000000 and then a body byte every 2 s
  (reconnecting when closed): the victims' p99 and how many got 429 / 503 / other failures.
- drain: 16 clients, each on ONE keep-alive connection, POST infer every 50 ms (retrying 503s on the same
  connection); SIGTERM after 3 s; per client the calls answered 200, clean 503s and lost calls (reset, closed
  mid-call, or a request sent on a connection the server then closed unanswered); a refused reconnect means the
  server is gone, not a lost call. Also the server's `drained` record and exit status.

Each scenario prints one JSON line per result as it finishes (bodies: one per format), --json writes them all with
the configuration, and a compact table ends the run. The victims' gRPC channels reconnect with a short backoff
(100 ms .. 1 s) so a failure measured is the server's, not the client library's back-off after one.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import http.client
import io
import json
import os
import random
import re
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.server_process import PROJECT_ROOT, ServerProcess

SCENARIOS = ("connections", "grpc-connections", "bodies", "trickle", "drain")
BODY_FORMATS = ("kserve-json-nested", "kserve-json-deep", "kserve-json-recursion", "kserve-json-valid",
                "kserve-binary", "typed-json-empty-images", "typed-json-valid", "raw-image", "multipart-tiny-parts",
                "gzip")
HOST = "127.0.0.1"
PIXELS = 784  # one 28x28 image
IMAGE_SHAPE = (1, 28, 28)  # serving.repository.format.IMAGE_DIMS (not imported: bench may measure another serving/)
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SLOWLORIS_HEAD = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
SLOWLORIS_DRIP = b"X-Slow: "  # then b"a" forever, never a CRLF: the head never ends
LIVE_REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
TRICKLE_HEAD = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000000\r\n\r\n")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
H2_FRAMES = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}


# ------------------------------------------------------------------------------------------- the server


def start_server(repository: Path, opts: argparse.Namespace, log_name: str) -> tuple[ServerProcess, dict]:
    """`python -m serving` in --cwd with --server-flags, under `prlimit --nofile=N:N` (N = --nofile; 0: as is);
    waits for `ready` and returns (server, the ready record)."""
    flags = shlex.split(opts.server_flags)
    limited = {}
    if opts.nofile:
        limited = dict(python="/usr/bin/prlimit",
                       entry=(f"--nofile={opts.nofile}:{opts.nofile}", "--", sys.executable, "-m", "serving"))
    log_path = opts.log_dir / f"abuse_{opts.label}_{log_name}.log" if opts.log_dir else None
    server = ServerProcess(repository, *flags, log_path=log_path, log_level="info", cwd=opts.cwd, **limited)
    try:
        server.start(180)
        return server, server.wait_for("ready")
    except BaseException:
        server.kill()
        raise


def _end_flood(result: dict, server: ServerProcess, flood, lines_before: int) -> None:
    """After a flood's window: the server's memory and what it logged meanwhile, then the attacker's own figures."""
    result["server_end"] = usage_mb(server.proc.pid) if server.proc.poll() is None else None
    result["server_log"] = log_digest(server.lines[lines_before:])
    flood.stop()
    result["attack"] = flood.stats()
    if flood.error:
        result["attack_error"] = flood.error


def stop_server(server: ServerProcess, timeout: float = 60.0) -> dict:
    """SIGTERM and the exit status; a server that died earlier or does not exit in time is reported (with its last
    log lines), never raised: the figures up to then are the result."""
    died = server.proc.poll() is not None
    started = time.monotonic()
    try:
        code: int | str = server.stop(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        code = f"killed: no exit within {timeout:g} s of SIGTERM"
    result = {"exit": code, "stop_s": round(time.monotonic() - started, 2), "died_before_stop": died}
    if died or code != 0:
        result["last_log"] = [line[:400] for line in server.lines[-12:]]
    return result


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant (a --workers server's workers), from /proc/PID/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:  # gone meanwhile
            continue
    return pids


def tree_usage(pid: int) -> tuple[int, int]:
    """(VmRSS KiB, threads) summed over the process tree."""
    rss = threads = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
        except OSError:
            continue
    return rss, threads


class Sampler(threading.Thread):
    """The server tree's RSS and threads every `every` s; `peak()` the highest since the last reset."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.stopped = threading.Event()
        self.max_rss = self.max_threads = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            rss, threads = tree_usage(self.pid)
            self.max_rss, self.max_threads = max(self.max_rss, rss), max(self.max_threads, threads)

    def reset(self) -> None:
        self.max_rss = self.max_threads = 0

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(2)


def usage_mb(pid: int) -> dict:
    rss, threads = tree_usage(pid)
    return {"rss_mb": round(rss / 1024, 1), "threads": threads}


def log_digest(lines: list[str], distinct: int = 6) -> dict:
    """What the server logged: line count, bytes, and the first `distinct` kinds of line (JSON: level + event;
    other text, e.g. gRPC core's own stderr, with numbers folded) with a count and a first example each."""
    kinds: dict[str, list] = {}
    for line in lines:
        try:
            record = json.loads(line)
            key = f"{record.get('level')} {record.get('logger')} {record.get('event')}"
        except (ValueError, AttributeError):
            key = re.sub(r"\d+", "N", line)[:120]
        if key in kinds:
            kinds[key][0] += 1
        else:
            kinds[key] = [1, line[:300]]
    return {"lines": len(lines), "bytes": sum(len(line.encode()) + 1 for line in lines), "kinds": len(kinds),
            "first": [{"count": n, "line": example} for n, example in list(kinds.values())[:distinct]]}


# ------------------------------------------------------------------------------------------ the victims


def summarize(latencies_s: list[float]) -> dict:
    """p50 / p99 / max in ms (nearest rank) of a list of seconds; None for each when empty."""
    if not latencies_s:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(latencies_s)

    def rank(p: float) -> float:
        return round(ordered[max(0, -(-len(ordered) * p // 100) - 1)] * 1000, 2)

    return {"p50_ms": rank(50), "p99_ms": rank(99), "max_ms": round(ordered[-1] * 1000, 2)}


class HttpStatus(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status


def failure_kind(exc: BaseException) -> str:
    """A short class for a failed call: `http 429`, `grpc UNAVAILABLE`, `timeout`, or the exception's type."""
    import grpc

    if isinstance(exc, HttpStatus):
        return f"http {exc.status}"
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"grpc {exc.code().name}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    return type(exc).__name__


def error_text(exc: BaseException) -> str:
    if hasattr(exc, "details") and callable(exc.details):
        return f"{failure_kind(exc)}: {exc.details()}"[:300]
    return f"{failure_kind(exc)}: {exc}"[:300]


def digit_png() -> bytes:
    """A 28x28 greyscale PNG of a '1' (MNIST polarity: white on black)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 13:16] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def kserve_image_json(model_input: str = "image") -> bytes:
    """One 28x28 UINT8 image as a KServe v2 infer request in JSON."""
    data = [0] * PIXELS
    for row in range(4, 24):
        data[row * 28 + 13: row * 28 + 16] = [255, 255, 255]
    return json.dumps({"inputs": [{"name": model_input, "datatype": "UINT8", "shape": [1, *IMAGE_SHAPE],
                                   "data": data}]}, separators=(",", ":")).encode()


def rest_infer_call(port: int, model: str, timeout: float = 5.0):
    """() → one REST infer on a fresh connection (http.client); raises on anything but 200."""
    body, path = kserve_image_json(), f"/v2/models/{model}/infer"

    def call() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            text = reply.read()
            if reply.status != 200:
                raise HttpStatus(reply.status, text[:200].decode("utf-8", "replace"))
        finally:
            conn.close()
    return lambda: call


def grpc_channel(port: int):
    import grpc

    return grpc.insecure_channel(f"{HOST}:{port}", options=[
        ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000)])


def grpc_classify_call(port: int, timeout: float = 5.0):
    """() → (made in the victim's thread: its channel is opened there, after the attack began) one Classify."""
    png = digit_png()

    def make():
        from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
        from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

        channel = grpc_channel(port)
        stub = pb_grpc.DigitServiceStub(channel)
        request = pb.ClassifyRequest(images=[pb.Image(encoded=png)])

        def call() -> None:
            stub.Classify(request, timeout=timeout)
        call.close = channel.close
        return call
    return make


def grpc_health_call(port: int, timeout: float = 5.0):
    def make():
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc_channel(port)
        stub = health_pb2_grpc.HealthStub(channel)

        def call() -> None:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            if answer.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")
        call.close = channel.close
        return call
    return make


class Victim(threading.Thread):
    """One kind of well-behaved call at `rate`/s (a slow call delays the next; no catching up in bursts)."""

    def __init__(self, kind: str, make_call, rate: float) -> None:
        super().__init__(daemon=True, name=f"victim-{kind}")
        self.kind, self.make_call, self.period = kind, make_call, 1.0 / rate
        self.stopped = threading.Event()
        self.latencies: list[float] = []
        self.ok_latencies: list[float] = []
        self.failures: Counter = Counter()
        self.first_error: str | None = None

    def run(self) -> None:
        try:
            call = self.make_call()
        except Exception as exc:  # noqa: BLE001 - reported as the victim's failure
            self.failures[failure_kind(exc)] += 1
            self.first_error = error_text(exc)
            return
        due = time.monotonic()
        while not self.stopped.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self.stopped.wait(wait):
                break
            started = time.monotonic()
            try:
                call()
                self.ok_latencies.append(time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - every failure is a figure
                self.failures[failure_kind(exc)] += 1
                self.first_error = self.first_error or error_text(exc)
            self.latencies.append(time.monotonic() - started)
            due = max(due + self.period, time.monotonic())
        if hasattr(call, "close"):  # a gRPC channel
            call.close()

    def result(self) -> dict:
        return {"calls": len(self.latencies), "failures": sum(self.failures.values()),
                "failure_kinds": dict(self.failures), "first_error": self.first_error, **summarize(self.latencies),
                "ok_p99_ms": summarize(self.ok_latencies)["p99_ms"]}


def run_victims(victims: list[Victim], seconds: float) -> dict:
    for v in victims:
        v.start()
    time.sleep(seconds)
    for v in victims:
        v.stopped.set()
    for v in victims:
        v.join(10)
    return {v.kind: v.result() for v in victims}


def victims_for(ready: dict, http_port: int, grpc_port: int, rate: float, health: bool = True) -> list[Victim]:
    victims = [Victim("grpc_classify", grpc_classify_call(grpc_port), rate),
               Victim("rest_infer", rest_infer_call(http_port, ready["model"]), rate)]
    if health:
        victims.append(Victim("grpc_health", grpc_health_call(grpc_port), rate))
    return victims


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


# ------------------------------------------------------------------------------------------ hostile bodies


@dataclass
class Body:
    path: str
    headers: dict
    body: bytes
    note: str = ""


def _kserve_json(size: int, model: str, item: bytes) -> Body:
    """A KServe infer JSON body of exactly `size` bytes whose input data is `item` repeated (comma-separated),
    as many as fit while the element count stays a whole number of images (the shape then agrees with the data:
    the server parses and flattens it all before any count check), padded with JSON whitespace."""
    def frame(images: int) -> tuple[bytes, bytes]:
        head = (b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[' + str(images).encode()
                + b',1,28,28],"data":[')
        return head, b"]}]}"
    head, tail = frame(10 ** 9)  # the longest frame: the count fits whatever it becomes
    items = (size - len(head) - len(tail) + 1) // (len(item) + 1)
    items -= items % PIXELS  # one number per item
    if items <= 0:
        raise ValueError(f"{size} bytes are too few for one image of {item[:20]!r}")
    head, tail = frame(items // PIXELS)
    body = head + b",".join([item] * items) + tail
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json"},
                body[:-len(tail)] + b" " * (size - len(body)) + tail, f"{items} items of {len(item)} B")


def kserve_json_nested(size: int, model: str) -> Body:
    """A huge list of small nested lists of numbers: `[[0]],[[0]],...` (two list objects per number)."""
    return _kserve_json(size, model, b"[[0]]")


def kserve_json_deep(size: int, model: str, depth: int = 28) -> Body:
    """Spines `[[[...[0]...]]]` `depth` deep, repeated: the densest list objects per byte that still parse."""
    return _kserve_json(size, model, b"[" * depth + b"0" + b"]" * depth)


def kserve_json_recursion(size: int, model: str) -> Body:
    """One `[[[[...]]]]` as deep as fills the body (millions of levels): past any recursion limit."""
    head = b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,1,28,28],"data":'
    tail = b"}]}"
    depth = (size - len(head) - len(tail)) // 2
    body = head + b"[" * depth + b"]" * depth + tail
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json"},
                body[:-len(tail)] + b" " * (size - len(body)) + tail, f"depth {depth}")


def kserve_json_valid(model: str, images: int) -> Body:
    """The largest valid KServe JSON request: `images` (--max-images-per-request) 28x28 images of 255s as nested
    [N,1,28,28] lists, pretty-printed (one number a line): every byte of it is parsed, and it is answered 200."""
    data = [[[[255] * 28] * 28]] * images
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [images, *IMAGE_SHAPE],
                                   "data": data}]}, indent=1).encode()
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json"}, body, f"{images} images")


def typed_json_valid(model: str, images: int) -> Body:
    """The largest valid typed-API JSON request of real images: `images` 240x240 noisy PNGs (~58 KB each, 15 MB in all), base64."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 240), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    body = json.dumps({"images": [{"encoded": base64.b64encode(png).decode()}] * images}).encode()
    return Body("/v1/classify", {"Content-Type": "application/json"}, body, f"{images} PNGs of {len(png)} B")


def kserve_binary(size: int, model: str) -> Body:
    """Triton's binary extension: a JSON header, then the largest raw UINT8 tail of whole images that fits."""
    def header(images: int) -> bytes:
        return json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [images, *IMAGE_SHAPE],
                                       "parameters": {"binary_data_size": images * PIXELS}}]},
                          separators=(",", ":")).encode()
    images = (size - len(header(10 ** 9))) // PIXELS
    head = header(images)
    head += b" " * (size - len(head) - images * PIXELS)  # whitespace after the JSON: the body is exactly `size`
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": str(len(head))},
                head + bytes(images * PIXELS), f"{images} images")


def typed_json_empty_images(size: int, model: str) -> Body:
    """POST /v1/classify {"images": [{}, {}, ...]}: a message object per 3 bytes."""
    head, tail = b'{"images":[', b"]}"
    count = (size - len(head) - len(tail) + 1) // 3
    body = head + b",".join([b"{}"] * count) + tail
    return Body("/v1/classify", {"Content-Type": "application/json"},
                body[:-len(tail)] + b" " * (size - len(body)) + tail, f"{count} images")


def raw_image(size: int, model: str) -> Body:
    """POST /v1/classify image/png: a real 28x28 PNG followed by random bytes up to `size` (decoders stop at IEND)."""
    png = digit_png()
    return Body("/v1/classify", {"Content-Type": "image/png"}, png + random.randbytes(size - len(png)),
                f"{len(png)} B PNG + padding")


MULTIPART_BOUNDARY = b"b"
MULTIPART_PART = (b"--" + MULTIPART_BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="a"'
                  b"\r\n\r\nX\r\n")


def multipart_tiny_parts(size: int, model: str, max_parts: int | None = None) -> Body:
    """multipart/form-data with as many 1-byte file parts as fit (and the server allows, when it says)."""
    closing = b"--" + MULTIPART_BOUNDARY + b"--\r\n"
    parts = (size - len(closing)) // len(MULTIPART_PART)
    if max_parts is not None:
        parts = min(parts, max_parts)
    return Body("/v1/classify", {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY.decode()}"},
                MULTIPART_PART * parts + closing, f"{parts} parts")


def gzip_bomb(model: str, inflated: int) -> Body:
    """A KServe infer JSON sent with Content-Encoding: gzip whose inflated size is `inflated` bytes (whitespace
    before the data: valid JSON once inflated), compressed ~1000:1."""
    head = b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,1,28,28],"data":'
    tail = b"[" + b",".join([b"0"] * PIXELS) + b"]}]}"
    spaces = inflated - len(head) - len(tail)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # the gzip wrapper
    out = [packer.compress(head)]
    chunk = b" " * (1 << 20)
    for _ in range(spaces // len(chunk)):
        out.append(packer.compress(chunk))
    out.append(packer.compress(b" " * (spaces % len(chunk)) + tail))
    out.append(packer.flush())
    body = b"".join(out)
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                body, f"inflates to {inflated} B")


LIMIT_KEYS = {  # which of the ready record's http_limits bounds each format's body, first present wins
    "kserve-json-nested": ("json_bytes", "body_bytes"), "kserve-json-deep": ("json_bytes", "body_bytes"),
    "kserve-json-recursion": ("json_bytes", "body_bytes"), "kserve-binary": ("body_bytes",),
    "kserve-json-valid": ("json_bytes", "body_bytes"), "typed-json-valid": ("typed_json_bytes", "body_bytes"),
    "typed-json-empty-images": ("typed_json_bytes", "body_bytes"), "raw-image": ("body_bytes",),
    "multipart-tiny-parts": ("body_bytes",), "gzip": ("body_bytes",)}


def body_limit(fmt: str, ready: dict) -> int:
    """The largest body of this format the server says it accepts: its http_limits entry, else max_message_bytes."""
    limits = ready.get("http_limits") or {}
    for key in LIMIT_KEYS[fmt]:
        if limits.get(key):
            return int(limits[key])
    return int(ready.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES)


def build_body(fmt: str, ready: dict, opts: argparse.Namespace) -> Body:
    size, model = body_limit(fmt, ready), ready["model"]
    if fmt == "kserve-json-deep":
        return kserve_json_deep(size, model, opts.deep_depth)
    if fmt == "multipart-tiny-parts":
        return multipart_tiny_parts(size, model, (ready.get("http_limits") or {}).get("multipart_parts"))
    if fmt == "gzip":
        return gzip_bomb(model, opts.gzip_inflated_bytes)
    if fmt in ("kserve-json-valid", "typed-json-valid"):
        images = int(ready.get("max_images_per_request") or 256)
        return (kserve_json_valid if fmt == "kserve-json-valid" else typed_json_valid)(model, images)
    return {"kserve-json-nested": kserve_json_nested, "kserve-json-recursion": kserve_json_recursion,
            "kserve-binary": kserve_binary, "typed-json-empty-images": typed_json_empty_images,
            "raw-image": raw_image}[fmt](size, model)


def exchange(port: int, body: Body, timeout: float) -> str:
    """Send one request on a fresh connection and read the answer's status; a send the server cuts short (it
    answered early and closed) still reads the answer. → "413", "timeout", "reset", "closed" (no answer)."""
    head = (f"POST {body.path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body.body)}\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in body.headers.items()) + "\r\n").encode()
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as exc:
        return f"connect {type(exc).__name__}"
    try:
        try:
            sock.sendall(head)
            sock.sendall(body.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # maybe answered early: read it
        buffer = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return "timeout"
            except OSError:
                return "reset"
            if not data:
                return "closed"
            buffer += data
            statuses = parse_responses(buffer)
            if statuses:
                return statuses[0]
    finally:
        sock.close()


class Sender(threading.Thread):
    """Sends `body` in a loop until stopped: each answer's status and time."""

    def __init__(self, port: int, body: Body, timeout: float) -> None:
        super().__init__(daemon=True, name="attacker")
        self.port, self.body, self.timeout = port, body, timeout
        self.stopped = threading.Event()
        self.answers: list[tuple[str, float]] = []
        self.busy_since: float | None = None

    def run(self) -> None:
        while not self.stopped.is_set():
            self.busy_since = time.monotonic()
            status = exchange(self.port, self.body, self.timeout)
            self.answers.append((status, time.monotonic() - self.busy_since))
            self.busy_since = None


# ------------------------------------------------------------------------------------------- the scenarios


def ports(server: ServerProcess) -> tuple[int, int]:
    listening = server.wait_for("listening")
    return int(listening["http_port"]), int(listening["port"])


def scenario_connections(repository: Path, opts: argparse.Namespace, grpc_port_target: bool) -> dict:
    name = "grpc-connections" if grpc_port_target else "connections"
    began = time.monotonic()
    server, ready = start_server(repository, opts, name)
    result: dict = {"scenario": name}
    try:
        http_port, grpc_port = ports(server)
        time.sleep(1)
        result["server_before"] = usage_mb(server.proc.pid)
        lines_before = len(server.lines)
        kinds = ("silent", "h2") if grpc_port_target else ("silent", "slowloris", "keepalive")
        flood = Flood(grpc_port if grpc_port_target else http_port, split_kinds(opts.attack_connections, kinds),
                      connect_timeout=opts.connect_timeout, h2=grpc_port_target)
        flood.start()
        flood.ready.wait(opts.connect_timeout + 60)
        result["attack_open_s"] = flood.open_seconds
        result["victims"] = run_victims(victims_for(ready, http_port, grpc_port, opts.victim_rate),
                                        opts.window_seconds)
        watched = time.monotonic()
        while flood.open_count > 0 and time.monotonic() - watched < opts.observe_seconds \
                and server.proc.poll() is None:
            time.sleep(0.5)
        result["observed_after_window_s"] = round(time.monotonic() - watched, 1)
        _end_flood(result, server, flood, lines_before)
    finally:
        result["stop"] = stop_server(server)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def scenario_bodies(repository: Path, opts: argparse.Namespace) -> list[dict]:
    results = []
    for fmt in opts.body_format or BODY_FORMATS:
        began = time.monotonic()
        server, ready = start_server(repository, opts, f"bodies_{fmt}")
        result: dict = {"scenario": "bodies", "format": fmt}
        sampler = Sampler(server.proc.pid)
        try:
            http_port, grpc_port = ports(server)
            body = build_body(fmt, ready, opts)
            result.update(limit=body_limit(fmt, ready), body_bytes=len(body.body), shape=body.note)
            time.sleep(1)
            result["server_idle"] = usage_mb(server.proc.pid)
            lines_before = len(server.lines)
            sampler.start()
            senders = [Sender(http_port, body, opts.body_timeout) for _ in range(opts.body_threads)]
            for s in senders:
                s.start()
            result["victims"] = run_victims(victims_for(ready, http_port, grpc_port, opts.victim_rate,
                                                        health=False), opts.body_window_seconds)
            for s in senders:
                s.stopped.set()
            deadline = time.monotonic() + opts.body_grace_seconds
            for s in senders:
                s.join(max(0.0, deadline - time.monotonic()))
            unfinished = [s for s in senders if s.is_alive()]
            answers = [a for s in senders for a in list(s.answers)]
            result["attack"] = {
                "requests": len(answers), "statuses": dict(Counter(status for status, _ in answers)),
                "seconds_median": round(statistics.median(t for _, t in answers), 3) if answers else None,
                "seconds_max": round(max((t for _, t in answers), default=0), 3),
                "unfinished_after_grace": len(unfinished),
                "unfinished_oldest_s": round(max((time.monotonic() - s.busy_since for s in unfinished
                                                  if s.busy_since), default=0), 1)}
            peak_rss, peak_threads = sampler.max_rss, sampler.max_threads
            sampler.stop()
            time.sleep(2)
            alive = server.proc.poll() is None
            result["server_max"] = {"rss_mb": round(peak_rss / 1024, 1), "threads": peak_threads}
            result["server_after"] = usage_mb(server.proc.pid) if alive else None
            result["server_log"] = log_digest(server.lines[lines_before:], distinct=4)
        finally:
            sampler.stop()
            result["stop"] = stop_server(server)
        result["seconds"] = round(time.monotonic() - began, 1)
        emit(result)
        results.append(result)
    return results


def scenario_trickle(repository: Path, opts: argparse.Namespace) -> dict:
    began = time.monotonic()
    server, ready = start_server(repository, opts, "trickle")
    result: dict = {"scenario": "trickle"}
    try:
        http_port, grpc_port = ports(server)
        time.sleep(1)
        result["server_before"] = usage_mb(server.proc.pid)
        lines_before = len(server.lines)
        flood = Flood(http_port, ["trickle"] * opts.trickle_connections, connect_timeout=opts.connect_timeout,
                      reconnect=True)
        flood.start()
        flood.ready.wait(opts.connect_timeout + 60)
        result["attack_open_s"] = flood.open_seconds
        result["victims"] = run_victims(victims_for(ready, http_port, grpc_port, opts.victim_rate, health=False),
                                        opts.window_seconds)
        _end_flood(result, server, flood, lines_before)
    finally:
        result["stop"] = stop_server(server)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


class DrainClient(threading.Thread):
    """One keep-alive connection, POST infer every `period`; 503 → retry on the same connection; a new connection
    only when the server closed the old one; stops when a reconnect is refused (the server is gone)."""

    def __init__(self, port: int, model: str, period: float, signalled: threading.Event) -> None:
        super().__init__(daemon=True, name="drain-client")
        self.port, self.period, self.signalled = port, period, signalled
        self.path, self.body = f"/v2/models/{model}/infer", kserve_image_json()
        self.counts: Counter = Counter()
        self.lost_errors: list[str] = []
        self.events: list[tuple[float, str]] = []  # (time, outcome) after SIGTERM
        self.stopped = threading.Event()

    def _note(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.signalled.is_set():
            self.events.append((time.monotonic(), outcome))

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stopped.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                try:
                    conn.connect()
                except ConnectionRefusedError:
                    if self.signalled.is_set():
                        self._note("server_gone")
                        return
                    self._note("refused_before_sigterm")
                    conn = None
                    time.sleep(self.period)
                    continue
                except OSError as exc:
                    self._note(f"connect {type(exc).__name__}")
                    conn = None
                    time.sleep(self.period)
                    continue
                self.counts["connections"] += 1
            try:
                conn.request("POST", self.path, self.body, {"Content-Type": "application/json"})
                reply = conn.getresponse()
                reply.read()
                self._note({200: "ok", 503: "refused_503"}.get(reply.status, f"http {reply.status}"))
                if reply.will_close:  # the server said Connection: close
                    self.counts["told_to_close"] += 1
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - the request is lost: it may or may not have run
                self._note("lost")
                self.lost_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                conn.close()
                conn = None
            time.sleep(self.period)
        if conn is not None:
            conn.close()


def scenario_drain(repository: Path, opts: argparse.Namespace) -> dict:
    began = time.monotonic()
    server, ready = start_server(repository, opts, "drain")
    result: dict = {"scenario": "drain"}
    signalled = threading.Event()
    clients: list[DrainClient] = []
    try:
        http_port, _ = ports(server)
        clients = [DrainClient(http_port, ready["model"], 0.05, signalled) for _ in range(opts.drain_clients)]
        for c in clients:
            c.start()
        time.sleep(opts.drain_after_seconds)
        since = len(server.records)
        sigterm = time.monotonic()
        signalled.set()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code: int | str = server.wait_exit(90)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed: no exit within 90 s of SIGTERM"
        result["sigterm_to_exit_s"] = round(time.monotonic() - sigterm, 2)
        for c in clients:
            c.join(15)
        for c in clients:
            c.stopped.set()
        totals = sum((c.counts for c in clients), Counter())
        result["totals"] = dict(totals)
        result["per_client"] = [[c.counts["ok"], c.counts["refused_503"], c.counts["lost"]] for c in clients]
        result["lost_errors"] = dict(Counter(re.sub(r"\d+", "N", e) for c in clients for e in c.lost_errors))
        events = sorted(e for c in clients for e in c.events)

        def first(outcome: str, last: bool = False):
            times = [t - sigterm for t, o in events if o == outcome]
            return round((times[-1] if last else times[0]), 3) if times else None

        result["after_sigterm_s"] = {"last_ok": first("ok", last=True), "first_503": first("refused_503"),
                                     "last_503": first("refused_503", last=True), "first_lost": first("lost"),
                                     "last_lost": first("lost", last=True), "first_gone": first("server_gone")}
        drained = [r for r in server.records[since:] if r.get("event") == "drained"]
        result["drained"] = {k: v for k, v in drained[0].items() if k not in ("ts", "logger")} if drained else None
        result["stop"] = {"exit": code, "died_before_stop": False}
        if code != 0:
            result["stop"]["last_log"] = [line[:400] for line in server.lines[-12:]]
    finally:
        for c in clients:
            c.stopped.set()
        if server.proc.poll() is None and "stop" not in result:
            result["stop"] = stop_server(server)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


# ----------------------------------------------------------------------------------------- output and main


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def _victims_text(victims: dict) -> str:
    return " | ".join(f"{kind} {v['calls']} calls {v['failures']} fail"
                      + (f" ({', '.join(f'{k} {n}' for k, n in v['failure_kinds'].items())})" if v["failures"] else "")
                      + f" p50 {v['p50_ms']} p99 {v['p99_ms']} max {v['max_ms']} ms" for kind, v in victims.items())


def _stop_text(stop: dict) -> str:
    return f"exit {stop.get('exit')}" + (" (died during the run)" if stop.get("died_before_stop") else "")


def format_table(results: list[dict], label: str) -> str:
    lines = [f"== bench.abuse [{label}]"]
    for r in results:
        s = r["scenario"]
        if s in ("connections", "grpc-connections", "trickle"):
            lines.append(f"{s}: attack opened in {r.get('attack_open_s')} s; took {r['seconds']} s; "
                         + _stop_text(r["stop"]))
            for kind, a in r.get("attack", {}).items():
                failed = sum(a["failed_to_open"].values())
                extra = f", reconnects {a['reconnects']}" if "reconnects" in a else ""
                lines.append(f"  {kind:9s} opened {a['opened']}/{a['connections']} (failed {failed}"
                             f"{': ' + str(a['failed_to_open']) if failed else ''}), closed by server "
                             f"{a['closed_by_server']} {a['closed_how'] or ''} after median {a['close_s_median']} "
                             f"max {a['close_s_max']} s{extra}; received {a['received'] or '-'}")
            if "victims" in r:
                lines.append("  victims: " + _victims_text(r["victims"]))
            log, before, end = r.get("server_log", {}), r.get("server_before", {}), r.get("server_end") or {}
            lines.append(f"  server log {log.get('lines')} lines {log.get('bytes')} B; RSS {before.get('rss_mb')} → "
                         f"{end.get('rss_mb')} MB, threads {before.get('threads')} → {end.get('threads')}")
        elif s == "bodies":
            a, idle, peak, after = r.get("attack", {}), r.get("server_idle", {}), r.get("server_max", {}), \
                r.get("server_after") or {}
            lines.append(f"bodies {r['format']}: {r.get('body_bytes')} B ({r.get('shape')}); attacker "
                         f"{a.get('requests')} answers {a.get('statuses')} median {a.get('seconds_median')} s "
                         f"max {a.get('seconds_max')} s, unfinished {a.get('unfinished_after_grace')}; RSS idle "
                         f"{idle.get('rss_mb')} max {peak.get('rss_mb')} after {after.get('rss_mb')} MB; "
                         f"log {r.get('server_log', {}).get('lines')} lines; {_stop_text(r['stop'])}; "
                         f"took {r['seconds']} s")
            if "victims" in r:
                lines.append("  victims: " + _victims_text(r["victims"]))
        elif s == "drain":
            t = r.get("totals", {})
            lines.append(f"drain: 200 {t.get('ok', 0)}, 503 {t.get('refused_503', 0)}, lost {t.get('lost', 0)} "
                         f"{r.get('lost_errors') or ''}, gone {t.get('server_gone', 0)}; after SIGTERM "
                         f"{r.get('after_sigterm_s')}; drained {r.get('drained')}; {_stop_text(r['stop'])}, "
                         f"SIGTERM→exit {r.get('sigterm_to_exit_s')} s; took {r['seconds']} s")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default: all")
    p.add_argument("--cwd", type=Path, default=PROJECT_ROOT, help="directory whose serving/ runs")
    p.add_argument("--label", default=None, help="tags the results (default: the --cwd's name)")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="default: bench.tiny_repo's one-matmul repository in a temporary directory")
    p.add_argument("--server-flags", default="", help='more server flags, e.g. "--workers 2" (shell-split)')
    p.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit, soft and hard (0: as is)")
    p.add_argument("--victim-rate", type=float, default=20.0, help="calls/s per victim kind")
    p.add_argument("--window-seconds", type=float, default=60.0, help="victims' window (connections, trickle)")
    p.add_argument("--observe-seconds", type=float, default=150.0,
                   help="how long after the window the attacker's connections are watched for the server to close")
    p.add_argument("--attack-connections", type=int, default=1100)
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="an attacker connect still pending after this counts as failed to open")
    p.add_argument("--body-format", action="append", choices=BODY_FORMATS, help="repeatable; default: all")
    p.add_argument("--body-window-seconds", type=float, default=20.0)
    p.add_argument("--body-threads", type=int, default=8)
    p.add_argument("--body-timeout", type=float, default=60.0, help="an attacker's wait for one answer")
    p.add_argument("--body-grace-seconds", type=float, default=30.0,
                   help="after the window, how long unanswered attacker requests are waited for")
    p.add_argument("--deep-depth", type=int, default=28, help="kserve-json-deep's spine depth")
    p.add_argument("--gzip-inflated-bytes", type=int, default=1 << 30)
    p.add_argument("--trickle-connections", type=int, default=512)
    p.add_argument("--drain-clients", type=int, default=16)
    p.add_argument("--drain-after-seconds", type=float, default=3.0)
    p.add_argument("--json", type=Path, default=None, help="write the configuration and every result here")
    p.add_argument("--log-dir", type=Path, default=None, help="write each server's log here")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = get_args_parser().parse_args(argv)
    opts.cwd = opts.cwd.resolve()
    opts.label = opts.label or opts.cwd.name
    if not (opts.cwd / "serving" / "__main__.py").is_file():
        print(f"error: {opts.cwd} has no serving/ package", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker's sockets: as many as allowed
    if opts.log_dir:
        opts.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="abuse_repo_") as tmp:
        repository = opts.model_repository
        if repository is None:
            from bench.tiny_repo import tiny_repo

            repository = tiny_repo(Path(tmp) / "repo")
        for scenario in opts.scenario or SCENARIOS:
            try:
                if scenario in ("connections", "grpc-connections"):
                    results.append(scenario_connections(repository, opts, scenario == "grpc-connections"))
                elif scenario == "bodies":
                    results.extend(scenario_bodies(repository, opts))
                    continue  # printed per format
                elif scenario == "trickle":
                    results.append(scenario_trickle(repository, opts))
                else:
                    results.append(scenario_drain(repository, opts))
            except AssertionError as exc:  # the server did not start
                results.append({"scenario": scenario, "error": str(exc)[-2000:], "stop": {}, "seconds": None})
            emit(results[-1])
    for r in results:
        r["label"] = opts.label
    print("\n" + format_table(results, opts.label))
    if opts.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
        config["seconds"] = round(time.time() - started, 1)
        opts.json.write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
