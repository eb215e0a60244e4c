"""Server lifecycle in subprocesses: health NOT_SERVING → SERVING → NOT_SERVING, SIGTERM during requests loses
none of them and exits 0, and startup refusals (sha256 mismatch, broken manifest, busy port, no GPU) exit 1
with a clear message. Run: .venv/bin/python -m pytest tests/serving/test_serving_lifecycle.py -q"""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

triton_pb = pytest.importorskip("tritonclient.grpc.service_pb2")
triton_grpc = pytest.importorskip("tritonclient.grpc.service_pb2_grpc")

SERVICE = "lsoftmax.v1.DigitService"
MODEL = "lsoftmax_mnist_onnx"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_health_transitions(model_repository, helpers, gates):
    # The model is held loading (its warm-up waits at the infer gate) for as long as the checks take.
    gates.hold("infer")
    server = gates.server(model_repository, "--backend", "onnx", "--device", "cpu")
    try:
        address = server.wait_for("listening")["address"]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.DigitServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "not loaded" in info.value.details()
            kserve = triton_grpc.GRPCInferenceServiceStub(channel)
            assert not kserve.ServerReady(triton_pb.ServerReadyRequest(), timeout=10).ready
            assert not kserve.ModelReady(triton_pb.ModelReadyRequest(name=MODEL), timeout=10).ready
            infer = triton_pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[bytes(784)])
            infer.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 28, 28])
            with pytest.raises(grpc.RpcError) as info:
                kserve.ModelInfer(infer, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
            assert next(watch).status == NOT_SERVING
            assert not any(r.get("event") in ("model_ready", "ready") for r in server.records)  # still loading
            gates.release("infer")
            assert next(watch).status == SERVING
            server.wait_for("ready")
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING

            server.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            assert list(watch) == []  # the stream ends (OK) instead of holding shutdown for the grace period
        code = server.wait_exit()
        assert code == 0, "server log:\n" + "\n".join(server.lines[-60:])
        assert server.wait_for("stopped")
    finally:
        gates.release()
        server.kill()


def _photo_request() -> tuple[pb.ClassifyRequest, int]:
    """64 photo-sized JPEGs per request: decoding is part of every call."""
    canvas = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(canvas).line([(100, 80), (300, 80), (170, 340)], fill=0, width=30)
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=95)
    return pb.ClassifyRequest(images=[pb.Image(encoded=buffer.getvalue())] * 64), 64


@pytest.mark.slow  # its sibling under load runs in the default suite; `make test-slow`
def test_sigterm_finishes_in_flight_requests_and_exits_0(model_repository, helpers, gates):
    server = gates.server(model_repository, "--device", "cpu", "--grace-seconds", "30", "--max-batch-size", "64",
                          *helpers.SERVER_LIMITS).start()
    try:
        request, n = _photo_request()
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            expected = [r.label for r in stub.Classify(request, timeout=60).results]
            # 12 calls held in flight: the first batch waits at the backend, the rest queue behind it (each call is
            # one batch of 64). Calls arriving after SIGTERM would be refused, by design: wait until all 12 are in.
            since = len(server.records)
            with gates.holding("infer"):
                futures = [stub.Classify.future(request, timeout=120) for _ in range(12)]
                gates.wait_held(server, "infer", since=since)
                helpers.wait_until(lambda: helpers.pending(server) == 11, what="11 calls queued behind the held one")
                server.proc.send_signal(signal.SIGTERM)
                server.wait_for("stopping", since=since)
                assert not any(f.done() for f in futures)  # all 12 still in flight at the signal
            results = [f.result() for f in futures]  # raises if any call was lost
            assert all([r.label for r in res.results] == expected for res in results)
            assert len(results) == 12 and all(len(res.results) == n for res in results)
        assert server.wait_exit(timeout=60) == 0
        events = [r["event"] for r in server.records]
        assert events.index("signal") < events.index("stopping") < events.index("drained") < events.index("stopped")
        drained = server.wait_for("drained")
        assert drained["drained"] and drained["in_flight"] == 0
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.DigitServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gates.release()
        server.kill()


def _run_server(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                           "--log-format", "text",
                           *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_sha256_mismatch_is_refused_at_startup(model_repository, helpers, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    model = repo / "lsoftmax_mnist_onnx/1/model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    result = _run_server("--model-repository", str(repo), cwd=helpers.PROJECT_ROOT)
    assert result.returncode == 1
    assert "sha256 mismatch for model 'lsoftmax_mnist_onnx'" in result.stderr and "listening" not in result.stderr
    assert "Traceback" not in result.stderr


def test_broken_manifest_is_refused_at_startup(model_repository, helpers, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    manifest = json.loads((repo / "manifest.json").read_text())
    del manifest["models"]
    (repo / "manifest.json").write_text(json.dumps(manifest))
    result = _run_server("--model-repository", str(repo), cwd=helpers.PROJECT_ROOT)
    assert result.returncode == 1 and "manifest.json: models: missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_port_is_refused(model_repository, helpers):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_server("--model-repository", str(model_repository), "--device", "cpu", "--port", str(port),
                             cwd=helpers.PROJECT_ROOT)
    assert result.returncode == 1 and f"cannot bind 127.0.0.1:{port}" in result.stderr


def test_cuda_without_a_gpu_is_refused(model_repository, helpers):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _run_server("--model-repository", str(model_repository), "--backend", "torchscript", "--device", "cuda",
                         cwd=helpers.PROJECT_ROOT)
    assert result.returncode == 1 and "no CUDA GPU is available" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_batching_and_metrics_flags_are_refused(model_repository, helpers):
    result = _run_server("--model-repository", str(model_repository), "--backend", "onnx", "--device", "cpu",
                         "--max-batch-size", "1000", cwd=helpers.PROJECT_ROOT)
    assert result.returncode == 1 and "exceeds model 'lsoftmax_mnist_onnx'" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "serving", "--model-repository", str(model_repository),
                                 "--backend", "onnx", "--device", "cpu", "--port", "0", "--metrics-port", str(port), "--http-port", "0",
                                 "--log-format", "text"], cwd=helpers.PROJECT_ROOT, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1 and "cannot bind the metrics endpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_repository_is_one_line_naming_it(model_repository, helpers, tmp_path):
    """What the serving image (uid 10001) met with a 0700 repository exported by someone else."""
    import os
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix="lsoftmax-perm-"))
    try:
        parent.chmod(0o755)
        repo = parent / "repo"
        shutil.copytree(model_repository, repo)
        command = [sys.executable, "-m", "serving", "--model-repository", str(repo), "--port", "0", "--http-port", "0",
                   "--metrics-port", "-1", "--log-format", "text"]
        if os.geteuid() == 0:  # root reads anything: hand the folder to another owner and drop root's override
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
            for path in (repo, *repo.rglob("*")):
                os.chown(path, 65534, 65534)
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        repo.chmod(0o700 if os.geteuid() == 0 else 0o000)
        result = subprocess.run(command, cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    finally:
        (parent / "repo").chmod(0o755)
        shutil.rmtree(parent, ignore_errors=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(repo) in errors[0] and "Permission denied" in errors[0], result.stderr


def _raw_request(images: int = 1) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))] * images)


def test_a_second_sigterm_cuts_the_grace_period_short(model_repository, helpers, gates):
    """Calls still running when the drain gives up (half the grace) hold gRPC's stop() for the other half; a second
    signal then ends it at once. The calls are held at the backend by the test, so they are certainly running."""
    # The grace period is the feature's own clock: after `drained` the second signal must come within the other half
    # (2.5 s here), which takes milliseconds; whether it cut the wait short is read from the log, not timed.
    server = gates.server(model_repository, "--backend", "onnx", "--device", "cpu", "--grace-seconds", "5").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            since = len(server.records)
            gates.hold("infer")
            futures = [stub.Classify.future(_raw_request(), timeout=60) for _ in range(4)]
            gates.wait_held(server, "infer", since=since)
            server.proc.send_signal(signal.SIGTERM)
            drained = server.wait_for("drained", timeout=30)
            assert drained["drained"] is False and drained["in_flight"] > 0
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait_exit(timeout=30) == 0
            # forced_stop is logged only while gRPC's stop() is still waiting out the grace period for the held
            # calls; a stop that ran its course would log `stopped` instead.
            assert server.wait_for("forced_stop")["in_flight"] > 0
            assert "stopped" not in [r.get("event") for r in server.records]
            for future in futures:
                future.cancel()
    finally:
        gates.release()
        server.kill()


def test_a_second_sigterm_during_the_drain_leaves_a_stuck_backend_call_behind(model_repository, helpers, gates):
    """A backend call that never returns (held at the gate for the whole test) must not keep a server that was told
    twice to stop: the second signal during the drain exits 0 at once instead of waiting to release the model."""
    server = gates.server(model_repository, "--backend", "onnx", "--device", "cpu", "--grace-seconds", "600").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            since = len(server.records)
            gates.hold("infer")
            future = pb_grpc.DigitServiceStub(channel).Classify.future(_raw_request(), timeout=600)
            gates.wait_held(server, "infer", since=since)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for("stopping")
            server.proc.send_signal(signal.SIGTERM)  # the drain has 300 s to go; the call is still held
            assert server.wait_exit(timeout=60) == 0
            assert server.wait_for("forced_stop")["in_flight"] == 1
            future.cancel()
    finally:
        gates.release()
        server.kill()


def test_calls_beyond_max_concurrent_rpcs_get_resource_exhausted(model_repository, helpers, gates):
    server = gates.server(model_repository, "--backend", "onnx", "--device", "cpu",
                          "--max-concurrent-rpcs", "2", "--decode-threads", "2").start()
    encoded = pb.ClassifyRequest(images=[pb.Image(encoded=helpers.png_bytes(np.zeros((28, 28), np.uint8)))])
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            since = len(server.records)
            with gates.holding("decode"):
                running = [stub.Classify.future(encoded, timeout=60) for _ in range(2)]
                gates.wait_held(server, "decode", 2, since=since)  # both slots taken, certainly
                codes = []
                for _ in range(2):
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Classify(_raw_request(), timeout=30)
                    codes.append(info.value.code())
                assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
                assert not any(f.done() for f in running)
            assert all(len(f.result().results) == 1 for f in running)

            def answered() -> bool:  # gRPC frees the slots a moment after the answers went out
                try:
                    return len(stub.Classify(_raw_request(), timeout=30).results) == 1
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    return False

            helpers.wait_until(answered, interval=0.05, what="the server kept refusing after the calls had finished")
    finally:
        gates.release()
        server.stop_cleanly()
