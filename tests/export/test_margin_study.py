"""export.margin_study: reports grouped by margin, mean and sample std over the runs, a table and a figure."""

import json

import pytest

from export.margin_study import format_markdown, load_reports, main, summarize


def _report(margin, accuracy, auroc, rejected, detector="multilayer_mahalanobis"):
    scores = {"known_score": {"auroc": auroc, "fpr_at_95_tpr": 0.0, "rejected": rejected},
              "max_cosine": {"auroc": auroc - 0.05, "fpr_at_95_tpr": 0.1},
              "msp": {"auroc": auroc - 0.1, "fpr_at_95_tpr": 0.2}}
    return {"margin": margin, "detector": detector, "temperature": 0.5 + margin / 10,
            "digits": {"accuracy": accuracy, "ece_before": 0.02, "ece_after": 0.002, "accepted": 0.99},
            "unknown_sets": {"letters": {"count": 10, "scores": scores}}}


def test_summary_is_mean_and_sample_std_per_margin():
    reports = [_report(1, 0.99, 0.90, 0.5), _report(1, 0.98, 0.94, 0.7), _report(4, 0.995, 0.97, 0.8)]
    summary = summarize(reports)
    assert list(summary) == [1, 4] and summary[1]["runs"] == 2 and summary[4]["runs"] == 1
    assert summary[1]["accuracy"]["mean"] == pytest.approx(0.985)
    assert summary[1]["accuracy"]["std"] == pytest.approx(0.00707107, rel=1e-5)  # sample std (n - 1)
    letters = summary[1]["sets"]["letters"]
    assert letters["known_score"]["mean"] == pytest.approx(0.92) and letters["rejected"]["mean"] == pytest.approx(0.6)
    assert letters["msp"]["mean"] == pytest.approx(0.82)
    assert summary[4]["accuracy"]["std"] is None  # one run: no spread, and none is invented
    text = format_markdown(summary)
    assert "| 1 | 2 | 98.50 ± 0.71 |" in text and "| 4 | 1 | 99.50 |" in text
    assert "0.9200 ± 0.0283 (60.0 ± 14.1%)" in text


def test_cli_reads_files_prints_a_table_and_plots(tmp_path, capsys):
    paths = []
    for i, (m, acc) in enumerate([(2, 0.99), (2, 0.991), (3, 0.992)]):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(_report(m, acc, 0.95, 0.6)))
        paths.append(str(path))
    figure = tmp_path / "margins.png"
    assert main(paths + ["--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 2 |" in out and "| 3 | 1 |" in out
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:4] == b"\x89PNG"
    assert main(paths + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["2"]["runs"] == 2


def test_a_file_that_is_not_a_report_is_named(tmp_path, capsys):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"epoch": 2}))
    assert main([str(bad)]) == 1
    assert f"{bad}: not an `export.evaluate --json` report" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a readable JSON report"):
        load_reports([broken])
