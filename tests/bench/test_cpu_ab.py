"""bench.cpu_ab: server CPU per KServe call for any gRPC servers, side by side (the overhead-ladder harness)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpu_ab import parse_target, session_cpu_seconds

ROOT = Path(__file__).resolve().parents[2]


def test_target_parsing_splits_label_model_env_and_command():
    t = parse_target("cut|lsoftmax_mnist_onnx|STAGE=2 A=b=c python -m serving --port {port} --x 'a b'")
    assert (t.label, t.model, t.env) == ("cut", "lsoftmax_mnist_onnx", {"STAGE": "2", "A": "b=c"})
    assert t.command == ["python", "-m", "serving", "--port", "{port}", "--x", "a b"]


@pytest.mark.parametrize("text, message", [
    ("only-a-label", "expected LABEL|MODEL|"), ("|m|python x {port}", "expected LABEL|MODEL|"),
    ("a|m|python server.py 8001", "{port}"), ("a|m|ENV=1", "{port}"), ("a|m|python 'unclosed {port}", "closing quotation"),
])
def test_bad_targets_are_refused(text, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("{", r"\{").replace("}", r"\}")):
        parse_target(text)


def test_session_cpu_counts_a_busy_child():
    """The CPU of every live process in the target's session: a shell whose child has burnt 0.3 s is charged for
    it (the child says so and stays alive, so nothing here waits on the clock)."""
    spin = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "print('spun', flush=True)\nsys.stdin.read()")
    proc = subprocess.Popen(["sh", "-c", f"{sys.executable} -c \"$SPIN\""], env={"SPIN": spin}, start_new_session=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "spun"
        assert session_cpu_seconds(proc.pid) >= 0.3
        assert session_cpu_seconds(999_999_999) == 0  # no such session
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the shell and its child
        proc.wait()


@pytest.mark.parametrize("args", [["--target", "a|m|x {port}"], ["--target", "a|m|x {port}", "--target", "a|m|y {port}"],
                                  ["--target", "a|m|x {port}", "--target", "b|m|y {port}", "--rounds", "0"]])
def test_usage_errors_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "bench.cpu_ab", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.slow  # two servers on 2 shared cores: ~5 s
def test_two_servers_side_by_side(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "tiny-repo", str(repo)], check=True,
                   capture_output=True)
    server = (f"{sys.executable} -m serving --model-repository {repo} --backend onnx --device cpu --port {{port}} "
              "--http-port -1 --metrics-port -1 --log-level warning")
    out = tmp_path / "runs.json"
    result = subprocess.run([sys.executable, "-m", "bench.cpu_ab", "--target", f"a|lsoftmax_mnist_onnx|{server}",
                             "--target", f"b|lsoftmax_mnist_onnx|X_UNUSED=1 {server} --inline-below-us 0",
                             "--rounds", "1", "--concurrency", "1,4", "--requests", "200", "--log-dir", str(tmp_path),
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert sorted((r["label"], r["concurrency"]) for r in runs) == [("a", 1), ("a", 4), ("b", 1), ("b", 4)]
    assert all(r["requests"] == 200 and r["server_cpu_us_per_request"] > 0 for r in runs)
    table = result.stdout.split("target ", 1)[1].splitlines()
    assert [line.split()[:2] for line in table[1:3]] == [["a", "1"], ["b", "1"]]
    assert table[1].split()[3] == "1.00"  # the first target is the ratios' base


def test_the_overhead_ladder_patch_still_applies():
    """bench/overhead_ladder.patch (BENCHMARKS.md's ladder) must follow serving/grpc/kserve.py as it changes."""
    result = subprocess.run(["git", "apply", "--check", "bench/overhead_ladder.patch"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
