"""bench.ort_cold: one backend call's CPU time, back to back and after other work evicted the caches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.ort_cold import cost_us

ROOT = Path(__file__).resolve().parents[2]


def test_cost_counts_the_call_and_not_the_work_between():
    """The memory rewritten between calls is not charged to the call: a call that does nothing stays near zero
    however much is rewritten, and a call that burns CPU is charged for it."""
    images = np.zeros((1, 1, 28, 28), np.uint8)
    idle = cost_us(lambda x: None, images, calls=50, between_bytes=8 << 20)

    def busy(x):
        total = 0
        for i in range(20000):
            total += i
        return total

    assert idle < 50 < cost_us(busy, images, calls=50)


@pytest.mark.parametrize("args", [["m.onnx", "--batch", "0"], ["m.onnx", "--calls", "0"], []])
def test_usage_errors_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "bench.ort_cold", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_runs_on_the_tiny_model(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "tiny-repo", str(repo)], check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-m", "bench.ort_cold", str(repo / "lsoftmax_mnist_onnx" / "1" / "model.onnx"),
                             "--calls", "20", "--between-mb", "0,1", "--sleep-us", "100"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["between"] for r in rows] == ["0 MiB", "1 MiB", "sleep 100 us"]
    assert all(r["us_per_call"] > 0 and r["batch"] == 1 for r in rows)
