"""The reproduction command end to end on tiny synthetic data: per-margin rows, curves, results.md."""

import pytest
import json

from training import reproduce


@pytest.mark.slow  # long end to end; `make test-slow`
def test_reproduce_writes_table_and_curves(tmp_path, tiny_mnist_root, monkeypatch):
    import os

    real, thread_counts = reproduce._run_one, []

    def spy(*args, env=None, **kwargs):
        thread_counts.append(env["OMP_NUM_THREADS"])
        return real(*args, env=env, **kwargs)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(reproduce, "_run_one", spy)
    docs = tmp_path / "docs"
    code = reproduce.main(["--model", "fast", "--margins", "1,2", "--seeds", "0,1", "--jobs", "2",
                           "--out", str(tmp_path / "runs"), "--docs", str(docs), "--device", "cpu",
                           "--data-dir", str(tiny_mnist_root), "--epochs", "1", "--batch-size", "64"])
    assert code == 0
    record = json.loads((docs / "results" / "fast.json").read_text())
    assert [r["margin"] for r in record["rows"]] == [1, 2]
    assert all(r["seeds"] == 2 and len(r["accuracies"]) == 2 for r in record["rows"])
    for row in record["rows"]:
        finals = []
        for seed in (0, 1):
            lines = (tmp_path / "runs" / "fast" / f"m{row['margin']}_seed{seed}" / "metrics.jsonl").read_text()
            finals.append(json.loads(lines.splitlines()[-1])["test_acc"])
        assert row["accuracies"] == finals  # final epoch of each seed, nothing picked
    text = (docs / "results.md").read_text()
    assert "| 1 |" in text and "| 2 |" in text and "99.68" in text and "Not yet measured" in text
    assert (docs / "curves_fast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert thread_counts == [str(max(1, os.cpu_count() // 2))] * 4  # two runs at a time share the cores


def test_reproduce_reports_failed_run(tmp_path, capsys):
    code = reproduce.main(["--model", "fast", "--margins", "1", "--out", str(tmp_path / "r"),
                           "--docs", str(tmp_path / "d"), "--data-dir", str(tmp_path / "missing")])
    assert code != 0


@pytest.mark.slow  # a subprocess end to end; `make test-slow`
def test_a_run_past_the_deadline_is_stopped_and_keeps_its_logged_epochs(tmp_path, tiny_mnist_root, monkeypatch):
    """The deadline passes while the run trains, for certain, whatever this machine's speed: the wait for the
    deadline starts once the run has logged an epoch (then with what is left of it, maybe nothing), and the run is
    far too long to finish before it."""
    import subprocess
    import time

    out = tmp_path / "long"
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 5

    class FirstEpochThenDeadline(subprocess.Popen):
        waited = False

        def communicate(self, input=None, timeout=None):
            if timeout is not None and not FirstEpochThenDeadline.waited:
                FirstEpochThenDeadline.waited = True
                give_up = time.monotonic() + 300  # only so that a broken run cannot hang the test
                while not (metrics.exists() and metrics.read_text().strip()) and self.poll() is None:
                    assert time.monotonic() < give_up, "the run logged no epoch in 300 s"
                    time.sleep(0.05)
                timeout = max(deadline - time.monotonic(), 0.0)  # what _run_one asked for, less the wait
            return super().communicate(input, timeout)

    monkeypatch.setattr(reproduce.subprocess, "Popen", FirstEpochThenDeadline)
    result = reproduce._run_one("fast", 2, 0, out, ["--device", "cpu", "--data-dir", str(tiny_mnist_root),
                                                    "--epochs", "100000", "--batch-size", "64"],
                                log=print, deadline=deadline)
    assert FirstEpochThenDeadline.waited
    assert result["finished"] is False and "final_test_acc" not in result and "error" not in result
    assert len(result["epochs"]) >= 1  # the epoch logged before the deadline is kept
    assert [e["epoch"] for e in result["epochs"]] == list(range(1, len(result["epochs"]) + 1))
    assert len(result["epochs"]) < 100000
    skipped = reproduce._run_one("fast", 2, 1, tmp_path / "never", [], log=print, deadline=time.monotonic() - 1)
    assert skipped["finished"] is False and skipped["epochs"] == [] and not (tmp_path / "never").exists()


@pytest.mark.slow  # long end to end; `make test-slow`
def test_runs_cut_by_the_time_budget_are_listed_not_averaged(tmp_path, tiny_mnist_root, monkeypatch, capsys):
    """Runs go seed by seed; here the budget runs out after seed 0, so seed 1 is reported as unfinished."""
    real = reproduce._run_one

    def budget_spent_after_seed_0(model, margin, seed, out, extra, log, deadline=None, env=None):
        return real(model, margin, seed, out, extra, log, 0.0 if seed == 1 else deadline, env)

    monkeypatch.setattr(reproduce, "_run_one", budget_spent_after_seed_0)
    docs = tmp_path / "docs"
    code = reproduce.main(["--model", "fast", "--margins", "1,2", "--seeds", "0,1", "--time-budget", "600",
                           "--out", str(tmp_path / "runs"), "--docs", str(docs), "--device", "cpu", "--tag", "b64",
                           "--data-dir", str(tiny_mnist_root), "--epochs", "1", "--batch-size", "64"])
    assert code == 0
    assert (tmp_path / "runs" / "fast-b64" / "m1_seed0" / "last.pt").exists()
    assert (docs / "curves_fast-b64.png").exists()
    record = json.loads((docs / "results" / "fast-b64.json").read_text())
    assert [(r["margin"], r["seeds"]) for r in record["rows"]] == [(1, 1), (2, 1)]
    assert [(u["margin"], u["seed"], u["epochs_done"]) for u in record["unfinished"]] == [(1, 1, 0), (2, 1, 0)]
    text = (docs / "results.md").read_text()
    assert "did not finish (`--time-budget 600`), so not in the table" in text
    assert "m=2 seed 1 (time budget, 0 of 1 epochs)" in text
    assert "2 of 4 run(s) did not finish" in capsys.readouterr().out


def test_no_run_finishing_in_the_budget_is_an_error(tmp_path, tiny_mnist_root, monkeypatch, capsys):
    real = reproduce._run_one
    monkeypatch.setattr(reproduce, "_run_one", lambda *a, **k: real(*a, **{**k, "deadline": 0.0}))
    code = reproduce.main(["--model", "fast", "--margins", "1", "--time-budget", "1", "--out", str(tmp_path / "r"),
                           "--docs", str(tmp_path / "d"), "--data-dir", str(tiny_mnist_root), "--device", "cpu"])
    assert code == 1
    assert "no run finished within --time-budget 1s" in capsys.readouterr().err


def _record(model, tag="", acc=99.5):
    row = {"margin": 4, "mean": acc, "std": 0.0, "seeds": 1, "accuracies": [acc], "wall_seconds": 60.0}
    return {"model": model, "tag": tag, "rows": [row], "device": "CPU", "command": "c", "recipe": "r",
            "date": "2026-11-28", "torch": "2", "curves": f"curves_{model}.png", "note": ""}


def test_results_page_orders_nets_and_keeps_tagged_paper_runs_apart_from_the_papers_recipe(tmp_path):
    (tmp_path / "results").mkdir()
    for model, tag in (("vis", ""), ("fast", ""), ("paper", "cpu-2-epochs")):
        name = model + (f"-{tag}" if tag else "")
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps(_record(model, tag)))
    text = reproduce.write_results_md(tmp_path).read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## `paper` net (cpu-2-epochs)", "## `fast` net", "## `vis` net", "## Not yet measured"]
    (tmp_path / "results" / "paper.json").write_text(json.dumps(_record("paper", acc=99.7)))
    text = reproduce.write_results_md(tmp_path).read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## `paper` net", "## `paper` net (cpu-2-epochs)", "## `fast` net", "## `vis` net"]
    assert "| 4 | 99.70 ± 0.00 | 1 | 99.69 |" in text


@pytest.mark.slow  # long end to end; `make test-slow`
def test_a_failed_run_is_reported_and_the_others_keep_their_rows(tmp_path, tiny_mnist_root, monkeypatch, capsys):
    real = reproduce._run_one

    def m2_fails(model, margin, seed, out, extra, log, deadline=None, env=None):
        return real(model, margin, seed, out, [*extra, *(["--lr", "1e30"] if margin == 2 else [])], log, deadline, env)

    monkeypatch.setattr(reproduce, "_run_one", m2_fails)
    docs = tmp_path / "docs"
    code = reproduce.main(["--model", "fast", "--margins", "1,2", "--out", str(tmp_path / "runs"), "--docs", str(docs),
                           "--device", "cpu", "--data-dir", str(tiny_mnist_root), "--epochs", "1", "--batch-size", "64",
                           "--lr-schedule", "constant"])
    assert code == 1
    assert "m=2 seed=0 failed: error: training loss became non-finite" in capsys.readouterr().err
    record = json.loads((docs / "results" / "fast.json").read_text())
    assert [r["margin"] for r in record["rows"]] == [1]
    (unfinished,) = record["unfinished"]
    assert unfinished["margin"] == 2 and unfinished["reason"].startswith("failed: error: training loss")
    assert "m=2 seed 0 (failed: error: training loss became non-finite" in (docs / "results.md").read_text()


def test_flags_for_the_training_runs_are_checked_before_any_run(tmp_path, capsys):
    import pytest

    for bad, fragment in ((["--epocs", "3"], "unrecognized arguments: --epocs"),
                          (["--lr-schedule", "cosine"], "invalid choice: 'cosine'"),
                          (["--margin", "3"], "--margin: set by the reproduction"),
                          (["--resume"], "--resume: set by the reproduction")):
        with pytest.raises(SystemExit) as exc:  # (and were the check to pass, the missing data dir stops it)
            reproduce.main(["--model", "fast", "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "d"),
                            "--data-dir", str(tmp_path / "no-data"), *bad])
        assert exc.value.code == 2
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    args, extra = reproduce.parse_arguments(["--model", "vis", "--epochs", "4", "--train-subset", "300"])
    assert args.model == "vis" and extra == ["--epochs", "4", "--train-subset", "300"]
