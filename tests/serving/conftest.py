"""Shared serving fixtures: a tiny exported model repository, real servers in subprocesses, references.

- `model_repository` (session): `export.repository.export_repository` on the tiny `fast` checkpoint, verified
  on 64 synthetic digits (no MNIST needed).
- `ServerProcess` (bench.server_process, shared with the demo, the benchmarks and the README check):
  `python -m serving ... --port 0 --log-format json --log-level debug` in a subprocess; its stderr is parsed
  line by line so tests wait on log events (`listening`, `ready`, `stopped`) and read the port the server
  picked. Never a hard-coded port.
- `onnx_server` (session): one ONNX server shared by the gRPC and client tests, with small limits so the
  limit tests stay cheap.
- `reference_outputs`: the exported graph run in-process (onnxruntime / torch.jit.load), the independent
  answer the server's results are compared with.
- `scrape(server)`: the server's Prometheus metrics as {(name, labels...): value}; `loadgen(*args)`: runs
  bench/loadgen.py (closed-loop load in its own processes) and returns its JSON summary.
- `Gates` (`gates` fixture): calls held in flight by the test, never by guessing how long work takes here.
  `gates.server(repo, ...)` runs tests/serving/gated_server.py (the server with gates at the backend call and at
  image decoding); `gates.hold("infer")` / `gates.release()` open and close them, `gates.wait_held(server, "infer",
  n)` waits until n calls wait at a gate. `wait_until(condition)` polls a condition the test has frozen that way
  (e.g. `pending(server) == 15`), with a give-up timeout only.
tritonclient's generated `inference.*` messages clash with ours in one process: no test imports
serving._proto.inference (or serving.server / serving.grpc.kserve) in the pytest process; servers run in subprocesses.
Test modules cannot import this file by name (tests/conftest.py owns that name), so the helpers reach them
through the `helpers` fixture: `helpers.ServerProcess`, `helpers.png_bytes`, `helpers.reference_outputs`, ...
Run: .venv/bin/python -m pytest tests/serving -q
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from bench.server_process import ServerProcess
from support import synthetic_digits

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVER_LIMITS = ("--max-images-per-request", "64", "--max-message-bytes", str(2 * 1024 * 1024))


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, tiny_checkpoint) -> Path:
    import torch

    from export.repository import export_repository

    images, labels = synthetic_digits(64, seed=3)
    out = tmp_path_factory.mktemp("serving") / "repo"
    export_repository(tiny_checkpoint, out, images=torch.from_numpy(images).unsqueeze(1),
                      labels=torch.from_numpy(labels).long(), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [32, 28, 28] synthetic digits (MNIST polarity) and their labels."""
    return synthetic_digits(32, seed=11)


def png_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def reference_outputs(repository: Path, kind: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) of the exported graph run in this process, CPU; images uint8 [N,28,28]."""
    batch = np.ascontiguousarray(images.reshape(-1, 1, 28, 28))
    if kind == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(repository / "lsoftmax_mnist_onnx/1/model.onnx"),
                                       providers=["CPUExecutionProvider"])
        logits, embedding = session.run(["logits", "embedding"], {"image": batch})
        return logits, embedding
    import torch

    module = torch.jit.load(str(repository / "lsoftmax_mnist_torchscript/1/model.pt"), map_location="cpu").eval()
    with torch.inference_mode():
        logits, embedding = module(torch.from_numpy(batch))[:2]
    return logits.numpy(), embedding.numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scrape(server: ServerProcess, scheme: str = "http", context=None, token: str | None = None) -> dict[tuple, float]:
    """GET /metrics (with `Authorization: Bearer token` when given) → {(sample name, (label, value), ...): value},
    labels sorted by name."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"{scheme}://127.0.0.1:{server.metrics_port}/metrics"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=context) as reply:
        text = reply.read().decode()
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """One sample of a scrape(): the sum over samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, *rest), v in samples.items() if n == name and wanted <= set(rest))


def loadgen(*args: str, timeout: float = 300) -> dict:
    """bench/loadgen.py ARGS... in a subprocess; its JSON summary."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / "loadgen.py"), *args],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_until(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.01,
               what: str = "") -> object:
    """Poll `condition` until it returns something true (returned); AssertionError after `timeout` s. For states a
    gate has frozen (so they are reached, not raced): the timeout only stops a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what or condition}")
        time.sleep(interval)


def pending(server: ServerProcess, model: str = "lsoftmax_mnist_onnx") -> float:
    """Requests queued for the model's backend right now (nv_inference_pending_request_count)."""
    return metric(scrape(server), "nv_inference_pending_request_count", model=model)


GATED_SERVER = PROJECT_ROOT / "tests" / "serving" / "gated_server.py"
GATE_DIR_ENV = "LSOFTMAX_TEST_GATE_DIR"


class Gates:
    """The test's side of tests/serving/gated_server.py: while `folder`/hold-NAME exists, calls reaching gate NAME
    (infer, decode, decode-large) wait in the server, which logs `gate_waiting` for each."""

    NAMES = ("infer", "decode", "decode-large")

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def server(self, repository: Path, *args: str, env: dict[str, str] | None = None, **kwargs) -> ServerProcess:
        """A ServerProcess running the gated server (not yet waited for: call .start())."""
        return ServerProcess(repository, *args, entry=(str(GATED_SERVER),),
                             env={**(env or {}), GATE_DIR_ENV: str(self.folder)}, **kwargs)

    def hold(self, *names: str) -> None:
        for name in names:
            assert name in self.NAMES, name
            (self.folder / f"hold-{name}").touch()

    def release(self, *names: str) -> None:
        """Let the calls at these gates (all gates when none is named) go, and let later ones pass."""
        for name in names or self.NAMES:
            (self.folder / f"hold-{name}").unlink(missing_ok=True)

    def holding_now(self, name: str) -> bool:
        return (self.folder / f"hold-{name}").exists()

    @contextlib.contextmanager
    def holding(self, *names: str):
        """Hold these gates for the block; released on the way out, whatever happens."""
        self.hold(*names)
        try:
            yield self
        finally:
            self.release(*names)

    @staticmethod
    def wait_held(server: ServerProcess, name: str, n: int = 1, since: int = 0, timeout: float = 60.0) -> dict:
        """Until at least n calls wait at gate `name` (records from index `since` on); returns that log record."""
        return server.wait_for("gate_waiting", timeout, since=since,
                               match=lambda r: r.get("gate") == name and r.get("held", 0) >= n)


@pytest.fixture
def gates(tmp_path) -> Gates:
    gates = Gates(tmp_path / "gates")
    yield gates
    gates.release()  # whatever the test did: nothing stays held for the servers' shutdown


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    return SimpleNamespace(ServerProcess=ServerProcess, png_bytes=png_bytes, reference_outputs=reference_outputs,
                           softmax=softmax, SERVER_LIMITS=SERVER_LIMITS, PROJECT_ROOT=PROJECT_ROOT, scrape=scrape,
                           metric=metric, loadgen=loadgen, Gates=Gates, wait_until=wait_until, pending=pending)


@pytest.fixture(scope="session")
def onnx_server(model_repository):
    server = ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu", *SERVER_LIMITS).start()
    yield server
    try:
        server.stop()
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="session")
def channel(onnx_server):
    import grpc

    with grpc.insecure_channel(onnx_server.address, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc

    return digit_service_pb2_grpc.DigitServiceStub(channel)
