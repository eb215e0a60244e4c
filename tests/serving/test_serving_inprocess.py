"""The in-process tier: a grpc.aio server on port 0 in the test process, with a fake backend, for the typed API,
the RPC boundary (auth, drain, error mapping, request metrics) and the batcher behind it. Milliseconds per test,
no subprocess. (KServe needs `inference.*` protos that clash with tritonclient's in one process: its
conformance tests run against subprocess servers.) Run: .venv/bin/python -m pytest tests/serving/test_serving_inprocess.py -q"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.tiny_repo import tiny_repo
from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc
from serving.backends.batching import BatchingConfig
from serving.core.inference import InferenceCore
from serving.images.lanes import Decoder
from serving.core.errors import (DeadlineExceeded, ImageError, InvalidInput, LimitExceeded, NotFound, NotReady, Overloaded,
                            Unauthenticated)
from serving.grpc.status import status_for
from serving.grpc.health import SERVING, HealthServicer
from serving.grpc.interceptors import BoundaryInterceptor, Drain
from serving.metrics import ModelStats
from serving.repository.reader import read_manifest
from serving.backends.runner import ModelRunner
from serving.security import TokenAuth
from serving.grpc.typed import SERVICE_NAME, DigitServicer, Limits

TOKEN = "in-process-token"


class FakeBackend:
    """logits = one-hot of (mean pixel // 26) scaled by 5, embedding = [mean, max], and with known_score the
    max pixel as the score (a blank image is "unknown"); or an exception."""
    kind, device, providers = "fake", "cpu", ()

    def __init__(self, fail: bool = False, known_score: bool = False) -> None:
        self.fail = fail
        self.has_known_score = known_score
        self.batches: list[int] = []
        self.gate = threading.Event()  # cleared: calls wait (in the model's worker thread) until a test sets it
        self.gate.set()
        self.entered = threading.Event()  # a call has reached the backend

    def infer(self, images: np.ndarray):
        self.entered.set()
        self.gate.wait(60)
        if self.fail:
            raise RuntimeError("the fake backend broke")
        self.batches.append(len(images))
        flat = images.reshape(len(images), -1).astype(np.float32)
        logits = np.zeros((len(images), 10), np.float32)
        logits[np.arange(len(images)), np.minimum(flat.mean(1) // 26, 9).astype(int)] = 5.0
        embedding = np.stack([flat.mean(1), flat.max(1)], 1)
        return (logits, embedding, flat.max(1)) if self.has_known_score else (logits, embedding)

    def close(self) -> None:
        pass


@dataclass
class App:
    address: str
    stats: ModelStats
    drain: Drain
    backend: FakeBackend
    runners: dict = field(default_factory=dict)


async def _serve(tmp_path, scenario, *, token: str | None = None, fail: bool = False, ready: bool = True,
                 limits: Limits = Limits(max_images_per_request=8), open_set: bool = False):
    """Start the typed API behind the boundary interceptor on port 0, run scenario(app), stop. open_set: the
    manifest says temperature 2 and threshold 100 on known_score, and the backend computes it."""
    repo = tmp_path / "repo"
    if not repo.exists():
        tiny_repo(repo)
        if open_set:
            path = repo / "manifest.json"
            data = json.loads(path.read_text())
            data["calibration"] = {"temperature": 2.0, "fitted_on": "test"}
            data["open_set"] = {"detector": "max_pixel", "threshold": 100.0, "accept_rate": 0.99, "fitted_on": "test"}
            path.write_text(json.dumps(data))
    manifest = read_manifest(repo)
    entry = manifest.select()
    stats = ModelStats(entry.name, entry.version)
    backend = FakeBackend(fail, known_score=open_set)
    runners = {entry.name: ModelRunner(backend, entry, manifest, BatchingConfig(max_batch_size=4), stats)} \
        if ready else {}
    drain = Drain()
    server = grpc.aio.server(interceptors=[BoundaryInterceptor(TokenAuth(token) if token else None, drain)])
    decoder = Decoder(threads=1)
    core = InferenceCore(runners, entry.name, [entry], manifest, limits, decoder)
    pb_grpc.add_DigitServiceServicer_to_server(DigitServicer(core), server)
    health = HealthServicer([SERVICE_NAME])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set_all(SERVING)
    try:
        return await scenario(App(f"127.0.0.1:{port}", stats, drain, backend, runners))
    finally:
        backend.gate.set()
        await server.stop(None)
        decoder.close()
        for runner in runners.values():
            runner.close()


def _run(tmp_path, scenario, **kwargs):
    return asyncio.run(_serve(tmp_path, scenario, **kwargs))


def _pixels(value: int) -> pb.Image:
    return pb.Image(pixels=bytes([value]) * 784)


async def _until(condition, timeout: float = 30.0) -> bool:
    """Yield to the event loop until condition() holds (True) or `timeout` s pass (False): for states the test has
    caused, however long this machine takes to get there."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def _status(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_classify_batches_and_answers_each_image(tmp_path):
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            response = await stub.Classify(pb.ClassifyRequest(images=[_pixels(v) for v in (0, 60, 130, 250, 200)],
                                                               top_k=2, return_logits=True))
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        return response, info

    response, info = _run(tmp_path, scenario)
    assert [r.label for r in response.results] == [0, 2, 5, 9, 7]
    first = response.results[0]
    assert first.probability == pytest.approx(np.exp(5) / (np.exp(5) + 9)) and len(first.top_k) == 2
    assert list(first.logits)[0] == 5.0 and info.backend == "fake" and info.max_batch_size == 4


def test_errors_map_to_status_codes_and_are_counted(tmp_path):
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            codes = [await _status(classify(pb.ClassifyRequest(images=[_pixels(0), pb.Image(encoded=b"junk")]))),
                     await _status(classify(pb.ClassifyRequest(images=[_pixels(0)] * 9))),
                     await _status(classify(pb.ClassifyRequest(images=[]))),
                     await _status(classify(pb.ClassifyRequest(images=[_pixels(0)], top_k=11)))]
        return codes, dict(app.stats.request_failure), app.stats.request_success

    codes, failures, successes = _run(tmp_path, scenario)
    assert codes[0][0] == grpc.StatusCode.INVALID_ARGUMENT and codes[0][1].startswith("image 1: ")
    assert codes[1][0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-images-per-request" in codes[1][1]
    assert codes[2] == (grpc.StatusCode.INVALID_ARGUMENT, "the request has no images")
    assert codes[3][0] == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in codes[3][1]
    assert failures["OTHER"] == 4 and successes == 0


def test_a_backend_failure_is_internal_without_its_message(tmp_path):
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            return (await _status(pb_grpc.DigitServiceStub(channel).Classify(pb.ClassifyRequest(images=[_pixels(0)])))), \
                dict(app.stats.request_failure)

    (code, details), failures = _run(tmp_path, scenario, fail=True)
    assert code == grpc.StatusCode.INTERNAL and details == "internal error (RuntimeError); see the server log"
    assert failures["BACKEND"] == 1


def test_not_loaded_yet_is_unavailable(tmp_path):
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            return await _status(pb_grpc.DigitServiceStub(channel).Classify(pb.ClassifyRequest(images=[_pixels(0)])))

    code, details = _run(tmp_path, scenario, ready=False)
    assert code == grpc.StatusCode.UNAVAILABLE and "not loaded yet" in details


def test_the_token_is_required_but_health_stays_open(tmp_path):
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            request = pb.ClassifyRequest(images=[_pixels(0)])
            results = [await _status(classify(request)),
                       await _status(classify(request, metadata=(("authorization", "Bearer wrong"),))),
                       await _status(classify(request, metadata=(("authorization", f"Bearer {TOKEN}"),)))]
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return results, health.status

    results, health = _run(tmp_path, scenario, token=TOKEN)
    assert [code for code, _ in results] == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.OK]
    assert "authorization: Bearer" in results[0][1] and health == health_pb2.HealthCheckResponse.SERVING


def test_a_draining_server_refuses_new_calls_and_counts_calls_until_answered(tmp_path):
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            app.backend.gate.clear()  # the first call is held at the backend: certainly in flight
            held = asyncio.ensure_future(_status(classify(pb.ClassifyRequest(images=[_pixels(0)]))))
            counted = await _until(lambda: app.drain.in_flight == 1 and app.backend.entered.is_set())
            app.backend.gate.set()
            answered = await held
            # The call counts until its status is sent (the context's done callback, a moment after the answer).
            released = await _until(lambda: app.drain.in_flight == 0)
            app.drain.draining = True
            refused = await _status(classify(pb.ClassifyRequest(images=[_pixels(0)])))
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        released_end = await _until(lambda: app.drain.in_flight == 0)
        return counted, answered, released, refused, health.status, released_end, await app.drain.wait(0.01, 30.0)

    counted, answered, released, refused, health, released_end, drained = _run(tmp_path, scenario)
    assert counted and answered[0] == grpc.StatusCode.OK and released
    assert refused[0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused[1]
    assert health == health_pb2.HealthCheckResponse.SERVING and released_end and drained


def test_queued_requests_share_backend_calls(tmp_path):
    async def scenario(app: App):
        batcher = next(iter(app.runners.values())).batcher
        async with grpc.aio.insecure_channel(app.address) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            app.backend.gate.clear()  # the first call waits at the backend while the other 11 queue behind it
            first = asyncio.ensure_future(classify(pb.ClassifyRequest(images=[_pixels(0)])))
            assert await _until(app.backend.entered.is_set)
            rest = [asyncio.ensure_future(classify(pb.ClassifyRequest(images=[_pixels(26 * (i % 10))])))
                    for i in range(1, 12)]
            assert await _until(lambda: batcher.pending() == 11)
            app.backend.gate.set()
            responses = await asyncio.gather(first, *rest)
        return [r.results[0].label for r in responses], app.backend.batches, app.stats.exec_count

    labels, batches, executions = _run(tmp_path, scenario)
    assert labels == [i % 10 for i in range(12)]
    assert batches == [1, 4, 4, 3] and executions == 4  # max_batch_size 4


@pytest.mark.parametrize("error, code", [
    (ImageError(3, "bad"), grpc.StatusCode.INVALID_ARGUMENT), (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED), (NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (NotReady("x"), grpc.StatusCode.UNAVAILABLE), (Overloaded("x"), grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED), (KeyError("secret"), grpc.StatusCode.INTERNAL),
])
def test_status_for_is_the_one_table(error, code):
    got, details = status_for(error)
    assert got == code
    assert ("secret" not in details) if code == grpc.StatusCode.INTERNAL else details == str(error)


def test_token_check_is_exact():
    auth = TokenAuth(TOKEN)
    assert auth.check([("authorization", f"Bearer {TOKEN}")]) and auth.check([("authorization", f"bearer {TOKEN} ")])
    assert not auth.check([("authorization", f"Bearer {TOKEN}x")]) and not auth.check([("authorization", TOKEN)])
    assert not auth.check([]) and TokenAuth.public("/grpc.health.v1.Health/Check")


def test_rejected_answers_and_calibrated_probabilities(tmp_path):
    """A blank image scores below the manifest's threshold and comes back rejected; probabilities use the
    temperature (softmax(logits / 2)); GetModelInfo reports both."""
    async def scenario(app: App):
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            response = await stub.Classify(pb.ClassifyRequest(images=[_pixels(0), _pixels(200)]))
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        return response, info

    response, info = _run(tmp_path, scenario, open_set=True)
    blank, ink = response.results
    assert blank.rejected and blank.known_score == 0.0
    assert not ink.rejected and ink.known_score == 200.0
    assert ink.probability == pytest.approx(np.exp(2.5) / (np.exp(2.5) + 9), rel=1e-5)
    assert info.temperature == 2.0 and info.known_score_detector == "max_pixel"
    assert info.known_score_threshold == 100.0


def test_client_cli_marks_rejected_inputs_and_evaluate_counts_them(tmp_path, capsys):
    """What a user of `serving.client` sees for non-digits: a REJECTED column in classify's text, rejected and
    known_score in --json, and evaluate's rejection rate (the fake's known_score is the max pixel, threshold 100)."""
    from PIL import Image

    from serving.client.cli import get_args_parser, main

    files = []
    for name, value in (("blank", 0), ("faint", 60), ("inked", 200)):
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((28, 28), value, np.uint8)).save(path)
        files.append(str(path))
    images = np.stack([np.full((1, 28, 28), v, np.uint8) for v in (0, 200, 60, 220)])
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.array([0, 7, 2, 8], np.int64))

    def cli(address: str, *argv: str) -> tuple[int, str]:
        code = main(get_args_parser().parse_args([argv[0], "--server", address, *argv[1:]]))
        return code, capsys.readouterr().out

    async def scenario(app: App):  # the CLI blocks: run it beside the server's event loop
        text = await asyncio.to_thread(cli, app.address, "classify", "--invert", "never", "--fit", "resize",
                                   *files)
        as_json = await asyncio.to_thread(cli, app.address, "classify", "--invert", "never", "--fit", "resize",
                                      "--json", *files)
        evaluated = await asyncio.to_thread(cli, app.address, "evaluate", "--input", str(tmp_path / "x.npy"),
                                            "--labels", str(tmp_path / "y.npy"), "--no-progress")
        return text, as_json, evaluated

    (code, text), (json_code, as_json), (eval_code, evaluated) = _run(tmp_path, scenario, open_set=True)
    assert code == json_code == eval_code == 0
    lines = dict(line.split("\t", 1) for line in text.strip().splitlines())
    assert "REJECTED: not a digit (known_score 0)" in lines[files[0]]
    assert "REJECTED: not a digit (known_score 60)" in lines[files[1]]
    assert "REJECTED" not in lines[files[2]]
    rows = json.loads(as_json)
    assert [(r["rejected"], r["known_score"]) for r in rows] == [(True, 0.0), (True, 60.0), (False, 200.0)]
    assert "rejected as not a digit 50.00% (2/4)" in evaluated


def test_a_refused_request_leaves_no_reference_cycle_holding_it(tmp_path):
    """The boundary used to keep the caught exception in a local: exception → traceback → frames (holding the request
    and the images it opened) → the exception. Only the cyclic GC freed them, so a flood of refused requests held
    hundreds of MiB. Now nothing of a refused request is left for the GC to find."""
    import gc
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4096, 4096), 255).save(buffer, "PNG")  # five of them: over the request's 64 Mpx budget
    over_budget = pb.ClassifyRequest(images=[pb.Image(encoded=buffer.getvalue())] * 5)

    async def scenario(app):
        async with grpc.aio.insecure_channel(app.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.DigitServiceStub(channel).Classify(over_budget, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    gc.collect()
    gc.disable()
    try:
        _run(tmp_path, scenario)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # grpc.aio's own AbortError ↔ frames cycle remains (its frames include the boundary's, with nothing held)
        left = [o for o in gc.garbage if isinstance(o, (LimitExceeded, Image.Image, pb.ClassifyRequest))
                or (type(o).__name__ == "frame" and "/serving/" in o.f_code.co_filename
                    and any(o.f_locals.get(name) is not None for name in ("request", "error", "exc")))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == [], left[:5]


def test_the_core_is_protocol_neutral():
    """The core, its boundary and the error types import neither gRPC nor protobuf (each transport adapts them)."""
    import subprocess
    import sys

    code = ("import sys, serving.core.inference, serving.core.boundary, serving.core.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'aiohttp') "
            "or m.startswith('google.protobuf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
