"""Quick runs of the benchmark scripts at tiny sizes, so they keep working (they assert no speed)."""

import pytest
from bench import layer as bench_layer
from bench import train as bench_train


def test_layer_bench_runs(capsys):
    assert bench_layer.main(["--batch", "16", "--dim", "8", "--margins", "1,3", "--repeats", "1", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 3 |" in out and "ours / plain" in out and "ours / PML" in out


def test_layer_bench_rows_have_ratios():
    rows = bench_layer.run(8, 4, 3, [2], __import__("torch").device("cpu"), repeats=1, iters=1, include_pml=False)
    assert rows[0]["margin"] == 2 and rows[0]["vs_plain"] > 0 and "vs_pml" not in rows[0]


def test_negatives_bench_reports_the_step_and_run_ratios(capsys):
    from bench import train_negatives

    assert train_negatives.main(["--batch-size", "8", "--iters", "1", "--repeats", "1", "--pool", "6",
                                 "--iterations", "3", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch 8 + 2 negatives" in out and "pool: fonts read in" in out and " 6 negatives at " in out \
        and "x)" in out


@pytest.mark.slow  # long end to end; `make test-slow`
def test_train_bench_runs(capsys):
    assert bench_train.main(["--nets", "fast,vis", "--batch-size", "4", "--iters", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fast | eager |" in out and "| vis | channels_last |" in out


def test_gpu_script_is_valid_bash_and_names_real_modules():
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    root = script.parents[1]
    text = script.read_text()
    optional = set(re.findall(r"if \[ -f (\S+) \]", text))  # steps the script skips when their file is absent
    for module in set(re.findall(r"-m ((?:training|bench|export|serving)[\w.]*)", text)):
        path = root.joinpath(*module.split("."))
        if path.with_suffix(".py").relative_to(root).as_posix() in optional:
            continue
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module


@pytest.mark.slow  # long end to end; `make test-slow`
def test_serve_bench_runs(tmp_path):
    """One short point against the tiny linear repository: table, goals and a perf_analyzer-style CSV."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(root / "bench" / "loadgen.py"), "tiny-repo", str(tmp_path / "repo")],
                   check=True, capture_output=True)
    out = tmp_path / "serve.csv"
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--model-repository", str(tmp_path / "repo"),
                             "--backends", "onnx", "--apis", "kserve", "--batching", "on", "--concurrency", "1",
                             "--window-seconds", "0.5", "--max-windows", "1", "--client-processes", "1",
                             "--output", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| onnx | on | kserve | 1 |" in result.stdout and "goal ≤ 0.5 ms" in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["Concurrency"] == "1" and float(rows[0]["Inferences/Second"]) > 0
    assert rows[0]["errors"] == "{}"


def test_tiny_repo_is_written_through_the_repository_format(tmp_path):
    """bench/loadgen.py tiny-repo writes its manifest and config.pbtxt with serving's format owner: the server's
    reader takes them, and the config is the builder's message (the interface, no scheduling)."""
    import subprocess
    import sys
    from pathlib import Path

    from serving.repository.reader import read_manifest, verify_sha256
    from serving.repository.config import model_config, read_config
    from serving.repository.format import BY_KIND

    root = Path(__file__).resolve().parents[2]
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, str(root / "bench" / "loadgen.py"), "tiny-repo", str(repo), "--max-batch-size",
                    "32"], check=True, capture_output=True)
    manifest = read_manifest(repo)
    (entry,) = manifest.models.values()
    verify_sha256(entry)
    assert (entry.name, entry.kind, manifest.net, manifest.embedding_dim) == ("lsoftmax_mnist_onnx", "onnx",
                                                                              "tiny-linear", 16)
    assert read_config(repo / entry.name / "config.pbtxt") == model_config(BY_KIND["onnx"], 32, 10, 16,
                                                                           scheduling=False, known_score=False)


def run_gpu_script(tmp_path, data_root, **settings):
    """bench/gpu.sh on this CPU at toy size (DEVICE=cpu SMOKE=1), everything under tmp_path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DEVICE": "cpu", "SMOKE": "1", "DATA_DIR": str(data_root), "PYTHON": sys.executable,
           "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "RUNS": str(tmp_path / "runs"),
           "WHEELS": str(tmp_path / "no-wheels"), **settings}
    result = subprocess.run(["bash", str(root / "bench" / "gpu.sh")], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.slow  # long end to end; `make test-slow`
def test_gpu_script_runs_every_step_at_toy_size_on_the_cpu(tmp_path, tiny_mnist_root):
    """The GPU session gets one try: run the same script here so a broken step shows now."""
    import tarfile

    summary = run_gpu_script(tmp_path, tiny_mnist_root, STEPS="reproduce,cuda_tests,bench,serve", MARGINS="4", SEEDS="0",
                             EPOCHS="1", BUDGET="400", REPRO_BUDGET="200")
    steps = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert steps == ["reproduce", "cuda_tests", "bench_layer", "bench_train", "export", "bench_serve"], summary
    assert summary.count("rc=0 in") == len(steps), summary
    with tarfile.open(tmp_path / "out" / "gpu_results.tgz") as tar:
        names = set(tar.getnames())
    assert {"./docs/results.md", "./docs/results/paper.json", "./metrics/m4_seed0.jsonl", "./serve.csv",
            "./machine.txt"} <= names, names


@pytest.mark.slow  # long end to end; `make test-slow`
def test_gpu_script_skips_steps_once_its_budget_is_spent_and_still_packs(tmp_path, tiny_mnist_root):
    summary = run_gpu_script(tmp_path, tiny_mnist_root, STEPS="reproduce,bench", BUDGET="12")
    assert "=== reproduce: skipped, budget spent" in summary and "=== bench_train: skipped" in summary
    assert (tmp_path / "out" / "gpu_results.tgz").stat().st_size > 0


@pytest.mark.slow  # long end to end; `make test-slow`
def test_gpu_script_sweeps_workers_on_the_tiny_and_the_real_model(tmp_path, tiny_mnist_root):
    """The --workers sweep at toy size: each count served side by side, on both models."""
    import json
    import tarfile

    summary = run_gpu_script(tmp_path, tiny_mnist_root, STEPS="workers", WORKERS_SWEEP="1,2", BUDGET="500")
    steps = [line.split()[1] for line in summary.splitlines() if line.startswith("=== ")]
    assert steps == ["tiny_repo", "train_for_workers", "export_for_workers", "workers_tiny", "workers_repo"], summary
    assert summary.count("rc=0 in") == len(steps), summary
    with tarfile.open(tmp_path / "out" / "gpu_results.tgz") as tar:
        assert {"./workers_tiny.json", "./workers_repo.json"} <= set(tar.getnames())
    runs = json.loads((tmp_path / "work" / "workers_tiny.json").read_text())
    assert json.dumps(runs).count('"w2"') >= 1 and json.dumps(runs).count('"w1"') >= 1
