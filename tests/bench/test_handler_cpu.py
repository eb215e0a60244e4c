"""bench.handler_cpu: the server's KServe handler awaited in-process (no gRPC), CPU per call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_measures_the_handler_on_the_tiny_model(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "tiny-repo", str(repo)], check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-m", "bench.handler_cpu", "--model-repository", str(repo),
                             "--calls", "50", "--batch", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["model"] == "lsoftmax_mnist_onnx" and row["batch"] == 3 and row["calls"] == 50
    assert row["cpu_us_per_call"] > 0


@pytest.mark.parametrize("args", [["--model-repository", "x", "--calls", "0"], ["--calls", "5"]])
def test_usage_errors_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "bench.handler_cpu", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
