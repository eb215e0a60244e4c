"""`python -m export.margin_study REPORT.json ...`: what the margin buys, one row per margin m over its seeds.

    python -m export.evaluate runs/m1_s0/repo --json > runs/m1_s0/open_set.json    # one report per trained run
    python -m export.margin_study runs/*/open_set.json [--figure margin.png] [--json]

Reads `export.evaluate --json` reports (one per exported run), groups them by the manifest's margin and prints
mean ± std over the runs of each margin (sample std, n - 1; "n = 1" rows have no spread): accuracy, ECE after
calibration (and before), the fitted temperature, the test digits accepted at the shipped threshold, and per
unknown set the AUROC of the shipped known_score, of max cosine and of MSP, and the shipped threshold's
rejection rate. The figure: AUROC against m per unknown set, one line per score, error bars = std over seeds.
Nothing is re-measured here: the reports are the measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from export.evaluate import save_figure

__all__ = ["STUDY_SCORES", "load_reports", "summarize", "format_markdown", "plot_margins", "main"]

STUDY_SCORES = ("known_score", "max_cosine", "msp")  # known_score: each run's shipped detector


def load_reports(paths: list[str | Path]) -> list[dict]:
    """The reports, each checked to be an export.evaluate report (ValueError naming the file otherwise)."""
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON report ({exc})") from None
        if not isinstance(report, dict) or not {"margin", "digits", "unknown_sets"} <= set(report):
            raise ValueError(f"{path}: not an `export.evaluate --json` report (needs margin, digits, unknown_sets)")
        report["_path"] = str(path)
        reports.append(report)
    return reports


def _stats(values: list[float]) -> dict:
    array = np.asarray([v for v in values if v is not None], np.float64)
    if array.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else None,
            "n": int(array.size)}


def summarize(reports: list[dict]) -> dict:
    """{margin: {"runs", "detectors", "accuracy", "ece_before", "ece_after", "temperature", "accepted",
    "sets": {set: {score: auroc stats, "rejected": stats}}}} over the reports of each margin."""
    out: dict[int, dict] = {}
    for margin in sorted({int(r["margin"]) for r in reports}):
        group = [r for r in reports if int(r["margin"]) == margin]
        sets = sorted({name for r in group for name in r["unknown_sets"]})
        row = {"runs": len(group), "detectors": sorted({str(r.get("detector")) for r in group}),
               "temperature": _stats([r.get("temperature") for r in group])}
        for key in ("accuracy", "ece_before", "ece_after", "accepted"):
            row[key] = _stats([r["digits"].get(key) for r in group])
        row["sets"] = {}
        for name in sets:
            present = [r["unknown_sets"][name]["scores"] for r in group if name in r["unknown_sets"]]
            entry = {score: _stats([p[score]["auroc"] for p in present if score in p]) for score in STUDY_SCORES}
            entry["rejected"] = _stats([p.get("known_score", {}).get("rejected") for p in present])
            row["sets"][name] = entry
        out[margin] = row
    return out


def _fmt(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    if stats["mean"] is None:
        return "—"
    text = f"{scale * stats['mean']:.{digits}f}"
    return text + (f" ± {scale * stats['std']:.{digits}f}" if stats["std"] is not None else "")


def format_markdown(summary: dict) -> str:
    """Two markdown tables: the digits (accuracy, calibration, acceptance) and the unknown sets (AUROC of the
    shipped score / max cosine / MSP, and the shipped threshold's rejection rate), one row per margin."""
    sets = sorted({name for row in summary.values() for name in row["sets"]})
    lines = ["| m | runs | accuracy % | ECE % before → after | T | digits accepted % |", "|---|---|---|---|---|---|"]
    for m, row in summary.items():
        lines.append(f"| {m} | {row['runs']} | {_fmt(row['accuracy'], 100)} | {_fmt(row['ece_before'], 100)} → "
                     f"{_fmt(row['ece_after'], 100)} | {_fmt(row['temperature'], 1, 3)} | {_fmt(row['accepted'], 100)} |")
    lines += ["", "| m | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for m, row in summary.items():
        cells = []
        for name in sets:
            e = row["sets"].get(name)
            cells.append("—" if e is None else f"{_fmt(e['known_score'], 1, 4)} ({_fmt(e['rejected'], 100, 1)}%); "
                                               f"cos {_fmt(e['max_cosine'], 1, 3)}; MSP {_fmt(e['msp'], 1, 3)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_margins(summary: dict, path: str | Path) -> Path:
    """AUROC against m, one panel per unknown set, one line per score (error bars: std over the runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({name for row in summary.values() for name in row["sets"]})
    margins = list(summary)
    fig, axes = plt.subplots(1, len(sets), figsize=(3.3 * len(sets), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], sets):
        for score in STUDY_SCORES:
            stats = [summary[m]["sets"].get(name, {}).get(score, {"mean": None}) for m in margins]
            xs = [m for m, s in zip(margins, stats) if s["mean"] is not None]
            ys = [s["mean"] for s in stats if s["mean"] is not None]
            errors = [s["std"] or 0.0 for s in stats if s["mean"] is not None]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=score)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("margin m")
        ax.set_xticks(margins)
    axes[0][0].set_ylabel("AUROC (digits vs set)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.margin_study", description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="`python -m export.evaluate REPO --json` outputs, one per run")
    p.add_argument("--figure", default=None, metavar="PNG", help="also plot AUROC against m to this PNG")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of markdown")
    args = p.parse_args(argv)
    try:
        summary = summarize(load_reports(args.reports))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1) if args.json else format_markdown(summary))
    if args.figure:
        plot_margins(summary, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
