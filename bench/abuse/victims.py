"""The victims: other clients' calls (gRPC Classify, REST infer on a fresh connection, gRPC health) timed while an attack runs."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter

from bench.abuse.wire import HOST, digit_png, kserve_image_json

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


