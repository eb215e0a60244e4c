"""No client can take the server down by holding connections (a real server in a subprocess, its open-file limit
lowered to 256 with prlimit): hundreds of silent connects, slowloris heads, idle keep-alives over HTTP, and silent or
idle HTTP/2 connections over gRPC, more than the process could hold at once. The server closes every one of them
itself (its timeouts set small here, so the test waits on the server's own clock, never guesses one), other
clients' calls answer throughout (gRPC Classify, a REST infer on a fresh connection, the health check), the log
holds a few rate-limited lines about it and no traceback, and threads and RSS stay flat. Bodies that trickle in
hold no concurrency slot; a shutdown under clients that retry tells them to close and ends when nothing is in flight.
Run: .venv/bin/python -m pytest tests/serving/test_serving_connections.py -q"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

PRLIMIT = shutil.which("prlimit")
pytestmark = pytest.mark.skipif(PRLIMIT is None, reason="needs prlimit (util-linux)")
MODEL = "lsoftmax_mnist_onnx"
INFER = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                "data": [0] * 784}]}).encode()
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _limited_server(helpers, repository, *flags, nofile: int = 256):
    """The server with its open-file limit (soft and hard) at `nofile` from its first instruction."""
    return helpers.ServerProcess(repository, "--backend", "onnx", "--device", "cpu", *flags, python=PRLIMIT,
                                 entry=(f"--nofile={nofile}:{nofile}", "--", sys.executable, "-m", "serving"))


def _rest_infer(port: int, timeout: float = 10.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", INFER, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class _Victim:
    """Another client's calls in a loop on its own thread: gRPC Classify and health on a channel it had before,
    and a REST infer on a fresh connection each time. Every failure is kept."""

    def __init__(self, server) -> None:
        self.http_port = server.wait_for("listening")["http_port"]
        self.channel = grpc.insecure_channel(server.address)
        self.stub = pb_grpc.DigitServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def once(self) -> None:
        request = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))])
        try:
            self.stub.Classify(request, timeout=10)
            status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, status
            assert _rest_infer(self.http_port) == 200
        except Exception as exc:  # noqa: BLE001 (recorded, asserted on by the test)
            self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
        self.calls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.once()

    def __enter__(self) -> "_Victim":
        self.once()  # the channel is connected before the attack
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.channel.close()


def _open(port: int, n: int, first: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first:
            sock.sendall(first)
        sockets.append(sock)
    return sockets


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset: closed too
        return True


def test_held_connections_are_closed_and_other_clients_answer(model_repository, helpers):
    server = _limited_server(helpers, model_repository, "--header-timeout", "1", "--idle-timeout", "2",
                             "--grpc-max-connection-idle", "2", "--max-concurrent-rpcs", "4",
                             "--http-body-timeout", "1").start()
    limits = server.wait_for("connection_limits")
    assert limits["open_files"] == 256 and limits["max_connections_per_port"] < 128
    http_port, grpc_port = server.wait_for("listening")["http_port"], server.port
    attackers: list[socket.socket] = []
    stop_trickling = threading.Event()
    try:
        with _Victim(server) as victim:
            threads, rss = _threads(server.proc.pid), server.rss_kib()
            lines = len(server.lines)
            silent = _open(http_port, 100)
            heads = _open(http_port, 100, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
            idle = _open(http_port, 100, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            grpc_held = _open(grpc_port, 30) + _open(grpc_port, 30, HTTP2_PREFACE)
            # bodies that trickle in: they hold connections, never one of the 4 concurrency slots
            bodies = _open(http_port, 100, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                         b"Content-Length: 100000\r\n\r\n\x89PNG")
            attackers = silent + heads + idle + grpc_held + bodies

            def trickle() -> None:  # slowloris: one more header byte at a time, never the end of the head
                while not stop_trickling.wait(0.2):
                    for sock in heads + bodies:
                        try:
                            sock.send(b"X")
                        except OSError:
                            pass
            threading.Thread(target=trickle, daemon=True).start()
            assert victim.calls >= 1
            helpers.wait_until(lambda: all(_closed_by_server(s) for s in attackers), timeout=120, interval=0.2)
            calls = victim.calls
            helpers.wait_until(lambda: victim.calls >= calls + 3, timeout=60)  # and still answering after
        assert victim.failures == [], victim.failures[:5]
        assert _threads(server.proc.pid) <= threads + 2
        assert server.rss_kib() - rss < 64 * 1024
        about_it = [line for line in server.lines[lines:] if '"level": "debug"' not in line]
        assert len(about_it) <= 12, "\n".join(about_it)
        assert not any("Traceback" in line or '"exception"' in line or '"level": "error"' in line
                       for line in server.lines), "\n".join(server.lines[-20:])
    finally:
        stop_trickling.set()
        for sock in attackers:
            sock.close()
        server.stop_cleanly()


def test_sigterm_under_retrying_keep_alive_clients_loses_no_call(model_repository, helpers):
    server = helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu").start()
    port = server.wait_for("listening")["http_port"]
    outcomes: list[list[str]] = [[] for _ in range(8)]
    answered = threading.Semaphore(0)

    def client(record: list[str]) -> None:
        connection = None
        while True:
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    connection.connect()
            except ConnectionRefusedError:
                record.append("gone")  # the server no longer listens: nothing was sent
                return
            try:
                connection.request("POST", f"/v2/models/{MODEL}/infer", INFER, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
            except Exception as exc:  # noqa: BLE001 (a call lost: sent, never answered)
                record.append(f"lost {type(exc).__name__}")
                connection.close()
                connection = None
                continue
            record.append(str(response.status))
            answered.release()
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                connection = None
            if response.status == 503:
                assert response.getheader("Connection", "").lower() == "close"

    threads = [threading.Thread(target=client, args=(record,), daemon=True) for record in outcomes]
    for thread in threads:
        thread.start()
    for _ in range(16):
        assert answered.acquire(timeout=30)
    server.proc.send_signal(15)
    assert server.wait_exit(60) == 0
    for thread in threads:
        thread.join(30)
    drained = server.wait_for("drained")
    assert drained["drained"] is True, drained
    seen = [outcome for record in outcomes for outcome in record]
    assert not [o for o in seen if o.startswith("lost")], seen
    assert set(seen) <= {"200", "503", "gone"} and "200" in seen
