"""`python -m serving --workers 2`: every worker answers on the same ports, the parent's metrics are the workers' sums,
a killed worker is replaced while the other keeps answering, SIGTERM drains the calls in flight on every worker, a
parent that dies takes its workers with it, and startup failures end the server once, with the reason.
Which worker answered a call: the `worker` field of its debug `rpc` / `http` log line (each worker tags its lines).
Calls are held in flight at tests/serving/gated_server.py's gates (its workers run the same gated script).
Run: .venv/bin/python -m pytest tests/serving/test_serving_workers.py -q"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux (SO_REUSEPORT)")

WORKERS = ("--backend", "onnx", "--device", "cpu", "--workers", "2")
BLANK = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))])
MODEL = "lsoftmax_mnist_onnx"


def _worker_of_next_call(server, call, event: str = "rpc", field: str = "method", ending: str = "/Classify") -> int:
    """Make one call (the only one in flight) and return the index of the worker whose log line records it."""
    since = len(server.records)
    call()
    return server.wait_for(event, since=since, match=lambda r: r.get(field, "").endswith(ending))["worker"]


@contextlib.contextmanager
def _a_connection_to_each_worker(server, workers: int = 2, tries: int = 64, metadata=()):
    """{worker: stub} over one TCP connection each (a channel with its own subchannel pool): new connections until
    the kernel has handed one to every worker (the chance that 64 all land on one of two is 2**-63). Also yields
    how many calls that took."""
    channels, stubs, calls = [], {}, 0
    try:
        while len(stubs) < workers and calls < tries:
            channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            stub = pb_grpc.DigitServiceStub(channel)
            worker = _worker_of_next_call(server, lambda: stub.Classify(BLANK, timeout=30, metadata=metadata))
            calls += 1
            stubs.setdefault(worker, stub)
        assert len(stubs) == workers, f"{calls} connections reached only workers {sorted(stubs)}"
        yield stubs, calls
    finally:
        for channel in channels:
            channel.close()


def _pids(server) -> dict[int, int]:
    """worker index → pid of its latest process, from the parent's worker_started lines."""
    return {r["worker"]: r["pid"] for r in server.records if r.get("event") == "worker_started"}


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_every_worker_answers_on_the_ports_the_parent_chose(model_repository, helpers):
    from serving.client import Client

    with helpers.ServerProcess(model_repository, *WORKERS).start() as server:
        ready = server.wait_for("ready")
        assert ready["workers"] == 2 and len(set(ready["worker_pids"])) == 2
        listening = [r for r in server.records if r.get("event") == "worker_listening"]
        assert {(r["worker"], r["port"], r["http_port"]) for r in listening} == \
            {(w, server.port, ready["http_port"]) for w in (0, 1)}  # --port 0 / --http-port 0 chosen once
        with _a_connection_to_each_worker(server) as (stubs, _):
            assert sorted(stubs) == [0, 1]

        url = f"http://127.0.0.1:{ready['http_port']}/v1/model"  # urllib opens a connection per request
        seen = set()
        for _ in range(64):
            seen.add(_worker_of_next_call(server, lambda: urllib.request.urlopen(url, timeout=30).read(), "http",
                                          "path", "/v1/model"))
            if len(seen) == 2:
                break
        assert seen == {0, 1}

        # The client library's connections are distinct TCP connections (distinct client ports), taken in turn.
        since = len(server.records)
        with Client(server.address, timeout=30, connections=4) as client:
            client.wait_until_serving()
            for _ in range(8):
                client.classify(np.zeros((28, 28), np.uint8))
        rpcs = lambda: [r for r in server.records[since:]  # noqa: E731
                        if r.get("event") == "rpc" and r["method"].endswith("/Classify")]
        helpers.wait_until(lambda: len(rpcs()) == 8, what="the 8 calls' log lines")
        assert len({r["peer"] for r in rpcs()}) == 4


def test_the_parents_metrics_are_the_sums_over_its_workers_behind_the_token(model_repository, helpers):
    token = (("authorization", "Bearer s3cret"),)
    with helpers.ServerProcess(model_repository, *WORKERS, "--auth-token", "s3cret").start() as server:
        with pytest.raises(urllib.error.HTTPError) as info:  # the parent's endpoint keeps the server's protections
            helpers.scrape(server)
        assert info.value.code == 401
        with _a_connection_to_each_worker(server, metadata=token) as (stubs, pinning):
            three = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))] * 3)
            for _ in range(4):
                stubs[0].Classify(three, timeout=30, metadata=token)
            for _ in range(7):
                stubs[1].Classify(three, timeout=30, metadata=token)
        samples = helpers.scrape(server, token="s3cret")
        calls, images = pinning + 11, pinning + 33
        assert helpers.metric(samples, "nv_inference_request_success", model=MODEL) == calls
        assert helpers.metric(samples, "lsoftmax_inference_request_duration_seconds_count", model=MODEL) == calls
        assert helpers.metric(samples, "lsoftmax_inference_request_duration_seconds_bucket", model=MODEL,
                              le="+Inf") == calls
        assert helpers.metric(samples, "nv_inference_count", model=MODEL) == images
        assert helpers.metric(samples, "lsoftmax_inference_batch_size_sum", model=MODEL) == images
        assert helpers.metric(samples, "nv_inference_exec_count", model=MODEL) == \
            helpers.metric(samples, "lsoftmax_inference_batch_size_count", model=MODEL) > 0
        assert helpers.metric(samples, "nv_inference_request_failure", model=MODEL) == 0
        assert helpers.metric(samples, "nv_inference_pending_request_count", model=MODEL) == 0
        assert (helpers.metric(samples, "lsoftmax_workers"), helpers.metric(samples, "lsoftmax_workers_ready"),
                helpers.metric(samples, "lsoftmax_worker_restarts")) == (2, 2, 0)


def test_summing_keeps_the_counts_of_a_worker_that_cannot_answer_or_has_exited(tmp_path):
    """serving.worker_metrics in-process, over two real worker endpoints (unix sockets): counters and histograms
    add up; a worker that does not answer counts with its last counters (its gauges are left out), and one that has
    exited keeps its last counts in the sums."""
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import ModelStats
    from serving.metrics_endpoint import MetricsServer
    from serving.worker_metrics import SummedMetrics

    stats = [ModelStats(MODEL, "1"), ModelStats(MODEL, "1")]
    for calls, s in zip((2, 5), stats):
        for _ in range(calls):
            s.record_request(None, 1000)
        s.pending = 1
    paths = [str(tmp_path / f"w{i}.sock") for i in (0, 1)]
    endpoints = [MetricsServer.start_unix([s], path) for s, path in zip(stats, paths)]
    live = [(0, paths[0]), (1, paths[1])]
    summed = SummedMetrics(lambda: live)

    def scrape() -> dict:
        text = asyncio.run(summed.render()).decode()
        return {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    try:
        both = scrape()
        assert both[("nv_inference_request_success", None)] == 7
        assert both[("nv_inference_pending_request_count", None)] == 2
        assert both[("lsoftmax_inference_request_duration_seconds_bucket", "+Inf")] == 7
        endpoints[1].close()  # still listed, no longer answering: its last counters stand in
        silent = scrape()
        assert silent[("nv_inference_request_success", None)] == 7
        assert silent[("nv_inference_pending_request_count", None)] == 1
        del live[1]  # it has exited: its counts stay
        stats[0].record_request("OTHER", 1000)
        gone = scrape()
        assert gone[("nv_inference_request_success", None)] == 7
        assert gone[("lsoftmax_inference_request_duration_seconds_count", None)] == 8
    finally:
        for endpoint in endpoints:
            endpoint.close()


def test_a_killed_worker_is_replaced_while_the_other_keeps_answering(model_repository, helpers, gates):
    server = gates.server(model_repository, *WORKERS).start()
    try:
        with _a_connection_to_each_worker(server) as (stubs, pinning):
            survivor, victim = 0, 1
            before = helpers.metric(helpers.scrape(server), "nv_inference_request_success", model=MODEL)
            assert before == pinning
            since = len(server.records)
            gates.hold("infer")
            in_flight = [stubs[survivor].Classify.future(BLANK, timeout=120)]
            gates.wait_held(server, "infer", since=since)  # the survivor's call waits at its backend

            old_pid = _pids(server)[victim]
            os.kill(old_pid, signal.SIGKILL)
            exited = server.wait_for("worker_exited", since=since, match=lambda r: r["worker"] == victim)
            assert (exited["pid"], exited["status"], exited["was_ready"], exited["restart_in_s"]) == \
                (old_pid, -signal.SIGKILL, True, 0)
            started = server.wait_for("worker_started", since=since, match=lambda r: r["worker"] == victim)
            assert started["pid"] != old_pid and started["start"] == 2
            # The replacement is held in its warm-up (same gate) while more calls reach the survivor.
            server.wait_for("gate_waiting", since=since, match=lambda r: r.get("worker") == victim)
            in_flight += [stubs[survivor].Classify.future(BLANK, timeout=120) for _ in range(5)]
            gates.release("infer")
            assert all(len(f.result().results) == 1 for f in in_flight)  # raises if any was lost
            server.wait_for("worker_ready", since=since, match=lambda r: r["worker"] == victim)

        with _a_connection_to_each_worker(server) as (_, more):  # new connections reach the replacement
            samples = helpers.scrape(server)
        # What the killed worker had counted (scraped above) stays in the sums.
        assert helpers.metric(samples, "nv_inference_request_success", model=MODEL) == before + len(in_flight) + more
        assert helpers.metric(samples, "lsoftmax_worker_restarts") == 1
        assert helpers.metric(samples, "lsoftmax_workers_ready") == 2
        server.stop_cleanly()
    finally:
        gates.release()
        server.kill()


def test_sigterm_drains_the_calls_in_flight_on_every_worker(model_repository, helpers, gates):
    server = gates.server(model_repository, *WORKERS, "--grace-seconds", "60").start()
    try:
        with _a_connection_to_each_worker(server) as (stubs, _):
            since = len(server.records)
            gates.hold("infer")
            in_flight = {w: stub.Classify.future(BLANK, timeout=120) for w, stub in stubs.items()}
            for w in stubs:
                server.wait_for("gate_waiting", since=since, match=lambda r, w=w: r.get("worker") == w)
            server.proc.send_signal(signal.SIGTERM)
            for w in stubs:
                server.wait_for("stopping", since=since, match=lambda r, w=w: r.get("worker") == w)
            with pytest.raises(grpc.RpcError) as info:  # draining: new calls are refused, the held ones stay
                stubs[0].Classify(BLANK, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
            assert not any(f.done() for f in in_flight.values())
            gates.release("infer")
            assert all(len(f.result().results) == 1 for f in in_flight.values())
        assert server.wait_exit(timeout=60) == 0
        exits = {r["worker"]: r["status"] for r in server.records[since:] if r.get("event") == "worker_exited"}
        assert exits == {0: 0, 1: 0}
        assert all(_gone(pid) for pid in _pids(server).values())
        assert not any(r.get("event") == "worker_started" for r in server.records[since:])  # no restart
    finally:
        gates.release()
        server.kill()


def test_workers_drain_and_exit_when_their_parent_dies(model_repository, helpers):
    server = helpers.ServerProcess(model_repository, *WORKERS).start()
    try:
        pids = _pids(server)
        since = len(server.records)
        server.proc.kill()  # SIGKILL: the parent tells no one; its workers' control sockets close
        for w in pids:
            order = server.wait_for("parent_order", since=since, match=lambda r, w=w: r.get("worker") == w)
            assert order["reason"] == "parent_gone"
            server.wait_for("worker_stopped", since=since, match=lambda r, w=w: r.get("worker") == w)
        helpers.wait_until(lambda: all(_gone(pid) for pid in pids.values()), what="the workers' exit")
    finally:
        server.kill()
        for pid in _pids(server).values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _broken_copy(model_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    return repo


def _break(repo) -> None:
    model = repo / "lsoftmax_mnist_onnx/1/model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")  # its sha256 no longer matches the manifest


def test_a_repository_that_breaks_every_worker_ends_the_server_once_with_the_reason(model_repository, helpers,
                                                                                     tmp_path):
    repo = _broken_copy(model_repository, tmp_path)
    _break(repo)
    server = helpers.ServerProcess(repo, *WORKERS)
    try:
        assert server.wait_exit(timeout=60) == 1
    finally:
        server.kill()
    failed = [r for r in server.records if r.get("event") == "workers_failed"]
    assert len(failed) == 1 and "could not start: " in failed[0]["error"]
    assert "sha256 mismatch for model 'lsoftmax_mnist_onnx'" in failed[0]["error"]
    assert any(line.startswith("error: worker ") and "sha256 mismatch" in line for line in server.lines)
    assert sum(r.get("event") == "worker_started" for r in server.records) == 2  # no restart
    assert not any(r.get("event") in ("listening", "ready") for r in server.records)
    assert "Traceback" not in "\n".join(server.lines)


@pytest.mark.slow  # three failed starts with their backoff (1 s, 2 s) after the first start: ~15 s on 2 cores
def test_a_worker_that_cannot_be_replaced_ends_the_server_after_the_backoff(model_repository, helpers, tmp_path):
    repo = _broken_copy(model_repository, tmp_path)
    server = helpers.ServerProcess(repo, *WORKERS).start()
    try:
        _break(repo)
        os.kill(_pids(server)[0], signal.SIGKILL)
        assert server.wait_exit(timeout=120) == 1
    finally:
        server.kill()
    exits = [r for r in server.records if r.get("event") == "worker_exited" and r["worker"] == 0]
    assert [r["restart_in_s"] for r in exits] == [0, 1.0, 2.0, None]
    failed = server.wait_for("workers_failed")
    assert "worker 0 could not start 3 times in a row: " in failed["error"] and "sha256 mismatch" in failed["error"]
    assert [r["status"] for r in server.records if r.get("event") == "worker_exited" and r["worker"] == 1] == [0]


def test_a_port_another_program_holds_is_refused_before_any_worker_starts(model_repository, helpers):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag in ("--port", "--http-port"):
            result = subprocess.run([sys.executable, "-m", "serving", "--model-repository", str(model_repository),
                                     *WORKERS, "--port", "0", "--http-port", "0", "--metrics-port", "0", flag,
                                     str(port)], cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=60)
            assert result.returncode == 1 and f"error: cannot bind 127.0.0.1:{port}" in result.stderr, result.stderr
            assert "worker_started" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_workers_below_one_is_a_usage_error(value, capsys):
    from serving.options import get_args_parser

    assert get_args_parser().parse_args(["--model-repository", "REPO"]).workers == 1
    with pytest.raises(SystemExit) as exited:
        get_args_parser().parse_args(["--model-repository", "REPO", "--workers", value])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "usage:" in err and "--workers" in err
