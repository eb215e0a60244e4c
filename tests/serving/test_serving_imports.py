"""A server imports only what it serves: ONNX serving never loads PyTorch (it used to, only to ask whether a GPU
exists: ~560 MiB resident), and a repository model whose backend this installation lacks is skipped with one log
line, or refused by name when the flags ask for it. Real servers in subprocesses; "no torch installed" is simulated
with a sitecustomize that blocks the import (sys.modules["torch"] = None).
Run: .venv/bin/python -m pytest tests/serving/test_serving_imports.py -q"""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc


def _mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


def _classify(address: str, digits) -> list[int]:
    images, _ = digits
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.DigitServiceStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(pixels=x.tobytes()) for x in images[:4]]), timeout=30)
    return [r.label for r in response.results]


def _without_torch(tmp_path) -> dict[str, str]:
    """An environment in which `import torch` fails, as in the ONNX-only serving image."""
    site = tmp_path / "no_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # as if not installed\n")
    return {"PYTHONPATH": str(site)}


def test_an_onnx_server_with_default_device_never_loads_torch(model_repository, helpers, digits):
    """--device auto (the default) asks the NVIDIA driver, not torch, whether a GPU exists."""
    with helpers.ServerProcess(model_repository, "--backend", "onnx").start() as server:
        assert len(_classify(server.address, digits)) == 4
        torch_files = [path for path in _mapped_files(server.proc.pid) if "/torch/" in path or "libtorch" in path]
        assert torch_files == [], torch_files[:5]


def test_without_torch_the_torchscript_model_is_skipped_and_onnx_serves(model_repository, helpers, digits, tmp_path):
    with helpers.ServerProcess(model_repository, env=_without_torch(tmp_path)).start() as server:
        skipped = server.wait_for("model_skipped")
        assert skipped["model"] == "lsoftmax_mnist_torchscript" and "torch" in skipped["reason"]
        assert server.wait_for("ready")["models"] == ["lsoftmax_mnist_onnx"]
        labels = _classify(server.address, digits)
        assert labels == list(np.argmax(helpers.reference_outputs(model_repository, "onnx", digits[0][:4])[0], 1))
    assert sum(1 for r in server.records if r.get("event") == "model_skipped") == 1


def test_without_torch_asking_for_torchscript_is_refused_by_name(model_repository, helpers, tmp_path):
    env = {**os.environ, **_without_torch(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "serving", "--model-repository", str(model_repository),
                             "--backend", "torchscript", "--port", "0", "--metrics-port", "-1", "--http-port", "-1"],
                            cwd=helpers.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lsoftmax_mnist_torchscript" in errors[0] and "torch" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
