"""The reproduction command end to end on tiny synthetic data: per-margin rows, curves, results.md."""

import json

from training import reproduce


def test_reproduce_writes_table_and_curves(tmp_path, tiny_mnist_root):
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


def test_reproduce_reports_failed_run(tmp_path, capsys):
    code = reproduce.main(["--model", "fast", "--margins", "1", "--out", str(tmp_path / "r"),
                           "--docs", str(tmp_path / "d"), "--data-dir", str(tmp_path / "missing")])
    assert code != 0
