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
tritonclient's generated `inference.*` messages clash with ours in one process: no test imports
serving._proto.inference (or serving.server / serving.kserve) in the pytest process; servers run in subprocesses.
Test modules cannot import this file by name (tests/conftest.py owns that name), so the helpers reach them
through the `helpers` fixture: `helpers.ServerProcess`, `helpers.png_bytes`, `helpers.reference_outputs`, ...
Run: .venv/bin/python -m pytest tests/serving -q
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    return SimpleNamespace(ServerProcess=ServerProcess, png_bytes=png_bytes, reference_outputs=reference_outputs,
                           softmax=softmax, SERVER_LIMITS=SERVER_LIMITS, PROJECT_ROOT=PROJECT_ROOT, scrape=scrape,
                           metric=metric, loadgen=loadgen)


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
