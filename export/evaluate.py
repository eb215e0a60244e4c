"""`python -m export.evaluate REPO`: how well the exported graph tells digits from non-digits, and its calibration.

    python -m export.evaluate model_repository [--count 2000] [--json] [--no-fashion] [--no-fonts] [--per-character]
                                               [--histogram PNG]

Runs REPO's ONNX graph in-process (onnxruntime, CPU) on the MNIST test digits (the known set) and on each unknown
set of export.unknowns (uniform noise, Gaussian noise, blank/near-blank, letters rendered in DejaVu; held out from
the training negatives: the same letters in handwriting fonts, Greek and Devanagari letters, each drawn in fonts of
Debian packages; Fashion-MNIST's test images when Debian's package can be had; one line says so when a set cannot
be had). Per unknown set and per score (MSP at the manifest's temperature, max logit, max cosine, and the shipped
`known_score`): AUROC (known vs unknown), FPR at 95% TPR, and, for the shipped score, the rejection rate at the
manifest's threshold. On the test digits: accuracy, acceptance at the threshold, ECE (15 bins) at temperature 1 and
at the manifest's temperature. Nothing here is fitted: the temperature, detector and threshold are read from
manifest.json.

A character set (every image's character known) is reported per character too (`per_character`: acceptance at the
threshold, --per-character prints it), and one holding characters shaped like a digit (export.unknowns.LOOKALIKES)
is reported as two sets: NAME without them, NAME_lookalikes with them alone ("lookalikes": "excluded" / "only").

    report = evaluate_repository(REPO, known_images, known_labels, {"letters": uint8 [N, 1, 28, 28], ...},
                                 characters={"letters": str [N]})
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from export import open_set
from export.detectors import Features, Head, get

__all__ = ["SCORES", "LOOKALIKES_SUFFIX", "evaluate_repository", "classifier_weight", "format_report",
           "format_per_character", "plot_histograms", "save_figure", "main"]

SCORES = ("msp", "max_logit", "max_cosine", "known_score")  # known_score: the shipped detector, from the graph
BATCH = 1000
LOOKALIKES_SUFFIX = "_lookalikes"  # NAME_lookalikes: a character set's digit-shaped characters, reported apart


def classifier_weight(model_path: Path) -> np.ndarray:
    """W [C, D] of the graph's last layer (logits = embedding @ W^T): the initializer the MatMul producing
    `logits` multiplies the embedding by."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if "logits" in node.output and node.op_type in ("MatMul", "Gemm"):
            name = next((n for n in node.input if n in inits), None)
            if name is not None:
                w = numpy_helper.to_array(inits[name])
                transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                return w if transposed else w.T
    raise ValueError(f"{model_path}: no MatMul/Gemm with a constant weight produces `logits`")


def _run(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    names = [o.name for o in session.get_outputs()]
    wanted = [n for n in ("logits", "embedding", "known_score") if n in names]
    parts = [session.run(wanted, {"image": np.ascontiguousarray(images[i:i + BATCH])})
             for i in range(0, len(images), BATCH)]
    outs = [np.concatenate([p[k] for p in parts]) for k in range(len(wanted))]
    return outs[0], outs[1], (outs[2] if len(outs) > 2 else None)


def _scores(session, weight: np.ndarray, temperature: float, images: np.ndarray) -> tuple[dict, np.ndarray]:
    logits, embedding, known = _run(session, images)
    features, head = Features(logits, embedding), Head(weight, temperature)
    scores = {name: get(name).score(features, {}, head) for name in ("msp", "max_logit", "max_cosine")}
    if known is not None:
        scores["known_score"] = known.astype(np.float64)
    return scores, logits


def evaluate_repository(repo: str | Path, known_images: np.ndarray, known_labels: np.ndarray,
                        unknowns: dict[str, np.ndarray], notes: list[str] | None = None,
                        histogram: str | Path | None = None, characters: dict[str, np.ndarray] | None = None) -> dict:
    """The report (a JSON-ready dict) for REPO on these known (labelled digits) and unknown image sets;
    characters: {set: str [N]}, the character each image of that set is (per-character figures, look-alikes split
    off); histogram: also write a PNG of the score histograms (known vs each unknown set) there."""
    from export.graphs import load_onnx_session
    from export.unknowns import LOOKALIKES
    from serving.repository.manifest import load_manifest

    repo = Path(repo)
    manifest = load_manifest(repo / "manifest.json")
    onnx_name = next((name for name, spec in manifest.models.items() if spec.format.kind == "onnx"), None)
    if onnx_name is None:
        raise ValueError(f"{repo}: the repository has no ONNX model to evaluate")
    model_path = repo / manifest.models[onnx_name].file
    calibration = manifest.records.get("calibration") or {}
    record = manifest.records.get("open_set") or {}
    temperature = float(calibration.get("temperature") or 1.0)
    threshold = record.get("threshold")
    session = load_onnx_session(model_path)
    weight = classifier_weight(model_path)

    known_labels = np.asarray(known_labels, np.int64)
    known, logits = _scores(session, weight, temperature, np.asarray(known_images, np.uint8))
    has_known_score = "known_score" in known
    if not has_known_score:
        threshold = None
    predicted = logits.argmax(axis=1)
    digits = {
        "count": int(len(known_labels)),
        "accuracy": float((predicted == known_labels).mean()),
        "ece_before": open_set.ece(open_set.softmax(logits), known_labels),
        "ece_after": open_set.ece(open_set.softmax(logits, temperature), known_labels),
        "mean_confidence_before": float(open_set.softmax(logits).max(axis=1).mean()),
        "mean_confidence_after": float(open_set.softmax(logits, temperature).max(axis=1).mean()),
    }
    if threshold is not None:
        accepted = known["known_score"] >= threshold
        digits["accepted"] = float(accepted.mean())
        digits["accuracy_of_accepted"] = float((predicted[accepted] == known_labels[accepted]).mean()) \
            if accepted.any() else None
    sets, raw, per_character = {}, {}, {}
    for name, images in unknowns.items():
        scores, _ = _scores(session, weight, temperature, np.asarray(images, np.uint8))
        chars = None
        if characters is not None and name in characters:
            chars = np.asarray(characters[name])
            if chars.shape != (len(images),):
                raise ValueError(f"{name}: {chars.size} characters for {len(images)} images")
            per_character[name] = _per_character(chars, scores.get("known_score"), threshold)
        for part, mask, extra in _rows(name, len(images), chars):
            part_scores = {k: v[mask] for k, v in scores.items()}
            sets[part] = {"count": int(mask.sum()), "scores": _set_scores(known, part_scores, threshold), **extra}
            if mask.any():
                raw[part] = part_scores
    if histogram is not None:
        plot_histograms(known, raw, histogram, threshold, record.get("detector") if has_known_score else None)
    return {
        "repository": str(repo), "model": onnx_name, "net": manifest.net, "margin": manifest.margin,
        "temperature": temperature, "detector": record.get("detector") if has_known_score else None,
        "threshold": threshold, "accept_rate": record.get("accept_rate"),
        "digits": digits, "unknown_sets": sets, "per_character": per_character, "lookalikes": dict(LOOKALIKES),
        "notes": list(notes or []),
    }


def _set_scores(known: dict, scores: dict, threshold: float | None) -> dict:
    """{score: {"auroc", "fpr_at_95_tpr"[, "rejected"]}} of one unknown set ({} when it has no image)."""
    per_score = {}
    for score_name in SCORES:
        if score_name not in scores or len(scores[score_name]) == 0:
            continue
        entry = {"auroc": open_set.auroc(known[score_name], scores[score_name]),
                 "fpr_at_95_tpr": open_set.fpr_at_tpr(known[score_name], scores[score_name], 0.95)}
        if score_name == "known_score" and threshold is not None:
            entry["rejected"] = float((scores[score_name] < threshold).mean())
        per_score[score_name] = entry
    return per_score


def _rows(name: str, count: int, chars: np.ndarray | None) -> list[tuple[str, np.ndarray, dict]]:
    """The rows an unknown set is reported as, (row, mask of its images, what the row holds): the set itself, or,
    when its characters include look-alikes, NAME without them and NAME_lookalikes with them alone."""
    from export.unknowns import is_lookalike

    if chars is None:
        return [(name, np.ones(count, bool), {})]
    lookalike = is_lookalike(chars)
    if not lookalike.any():
        return [(name, ~lookalike, {"characters": len(set(chars.tolist()))})]
    return [(part, mask, {"lookalikes": kind, "characters": len(set(chars[mask].tolist()))})
            for part, mask, kind in ((name, ~lookalike, "excluded"),
                                     (name + LOOKALIKES_SUFFIX, lookalike, "only"))]


def _per_character(chars: np.ndarray, known_score: np.ndarray | None, threshold: float | None) -> dict:
    """{character: {"count", "accepted" (at the threshold; None without one), "resembles" (the digit a
    look-alike is shaped like, else None)}}, the characters in the order they first occur."""
    from export.unknowns import LOOKALIKES

    out = {}
    for char in dict.fromkeys(chars.tolist()):
        mask = chars == char
        accepted = None if threshold is None else float((known_score[mask] >= threshold).mean())
        out[char] = {"count": int(mask.sum()), "accepted": accepted, "resembles": LOOKALIKES.get(char)}
    return out


def plot_histograms(known: dict, unknown: dict[str, dict], path: str | Path, threshold: float | None,
                    detector: str | None) -> Path:
    """One panel per score (the shipped known_score, max cosine, MSP): density histograms of the MNIST test digits
    and of each unknown set, the shipped threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [s for s in ("known_score", "max_cosine", "msp") if s in known]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, panels):
        values = [known[name]] + [u[name] for u in unknown.values()]
        lo, hi = min(float(np.min(v)) for v in values), max(float(np.max(v)) for v in values)
        if name == "known_score" and detector != "max_cosine":  # long left tail: clip to where digits live
            lo = max(lo, float(np.percentile(known[name], 0.1)) - 4 * float(np.std(known[name])))
        bins = np.linspace(lo, hi, 60)
        ax.hist(np.clip(known[name], lo, hi), bins=bins, density=True, alpha=0.55, label="MNIST test digits",
                color="black")
        hues: dict[str, int] = {}  # a set in a dark shade of its own, its look-alikes in the light one
        for set_name, scores in unknown.items():
            base = set_name.removesuffix(LOOKALIKES_SUFFIX)
            shade = 2 * hues.setdefault(base, len(hues)) + (base != set_name)
            ax.hist(np.clip(scores[name], lo, hi), bins=bins, density=True, histtype="step", linewidth=1.4,
                    label=set_name, color=plt.cm.tab20(shade % 20))
        if name == "known_score" and threshold is not None:
            ax.axvline(threshold, color="red", linestyle="--", linewidth=1, label="shipped threshold")
        ax.set_title(f"known_score ({detector})" if name == "known_score" else name)
        ax.set_yscale("log")
        ax.set_xlabel("score (higher = more digit-like)")
    axes[0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; the evaluation's PNGs all go this way."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def format_report(report: dict, per_character: bool = False) -> str:
    """The report as text: a header, the digit figures, one table row per (unknown set, score); per_character:
    then the per-character tables (format_per_character)."""
    d = report["digits"]
    width = max([16] + [len(name) for name in report["unknown_sets"]])
    lines = [f"{report['repository']} ({report['model']}, net {report['net']}, m={report['margin']}): "
             f"temperature {report['temperature']:.4g}, known_score = {report['detector'] or 'absent'}"
             + (f" >= {report['threshold']:.6g}" if report["threshold"] is not None else " (no threshold)"),
             f"MNIST test digits ({d['count']}): accuracy {_pct(d['accuracy'])}, accepted {_pct(d.get('accepted'))}"
             f" (accuracy of accepted {_pct(d.get('accuracy_of_accepted'))}), "
             f"ECE(15 bins) {_pct(d['ece_before'])} at T=1 -> {_pct(d['ece_after'])} at T={report['temperature']:.4g}, "
             f"mean confidence {_pct(d['mean_confidence_before'])} -> {_pct(d['mean_confidence_after'])}",
             "",
             f"{'unknown set':<{width}} {'n':>6}  {'score':<12} {'AUROC':>7} {'FPR@95TPR':>10} {'rejected':>9}"]
    for name, entry in report["unknown_sets"].items():
        for score_name, s in entry["scores"].items():
            lines.append(f"{name:<{width}} {entry['count']:>6}  {score_name:<12} {s['auroc']:>7.4f} "
                         f"{100 * s['fpr_at_95_tpr']:>9.2f}% {_pct(s.get('rejected')) if 'rejected' in s else '—':>9}")
    if any(entry.get("lookalikes") for entry in report["unknown_sets"].values()):
        lines.append(f"NAME{LOOKALIKES_SUFFIX}: the characters of NAME shaped like a digit, which NAME's rows "
                     f"leave out ({' '.join(report.get('lookalikes', {}))})")
    if per_character:
        lines += ["", format_per_character(report)]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def format_per_character(report: dict) -> str:
    """Per character, the share of its images accepted at the shipped threshold: one table per list of characters,
    one column per set drawing those characters (letters and handwritten_letters side by side), a look-alike
    marked with the digit it resembles."""
    tables = {}  # characters (in order) -> {set: {character: figures}}
    for name, table in report.get("per_character", {}).items():
        tables.setdefault(tuple(table), {})[name] = table
    if not tables:
        return "per character: no character set measured"
    if report["threshold"] is None:
        return "per character: the repository ships no threshold, so nothing is accepted or rejected"
    out = []
    for chars, columns in tables.items():
        counts = {name: sorted({c["count"] for c in table.values()}) for name, table in columns.items()}
        heads = [f"{name} (n={n[0]}{'-' + str(n[-1]) if len(n) > 1 else ''})" for name, n in counts.items()]
        out.append("accepted at the threshold, per character  " + "  ".join(heads))
        out.append(f"{'char':<8}" + "".join(f"{name:>{max(len(name), 8) + 2}}" for name in columns))
        for char in chars:
            resembles = next(iter(columns.values()))[char]["resembles"]
            label = char + (f" ~{resembles}" if resembles else "")
            out.append(f"{label:<8}" + "".join(f"{100 * table[char]['accepted']:>{max(len(name), 8) + 1}.1f}%"
                                               for name, table in columns.items()))
        out.append("")
    return "\n".join(out).rstrip()


def _known_set(args) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_split, prepare_mnist

    images, labels = load_split(prepare_mnist(args.data_dir, cache_dir=args.cache_dir), train=False)
    return images.numpy(), labels.numpy()


def get_args_parser() -> argparse.ArgumentParser:
    from export.unknowns import FONT_SETS

    p = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("repository", help="a model repository written by python -m export")
    p.add_argument("--count", type=int, default=2000,
                   help="images per generated unknown set (noise, blank, each character set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic unknown sets")
    p.add_argument("--no-fashion", action="store_true", help="leave Fashion-MNIST out (no fetch attempted)")
    p.add_argument("--no-fonts", action="store_true", help="leave out the sets drawn in Debian's fonts ("
                   + ", ".join(FONT_SETS) + "; no fetch attempted)")
    p.add_argument("--per-character", action="store_true",
                   help="also print each character's acceptance at the threshold, per character set")
    p.add_argument("--data-dir", default=None, help="torchvision-layout MNIST root (the known digits)")
    p.add_argument("--cache-dir", default=None, help="MNIST cache root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--histogram", default=None, metavar="PNG", help="also write score histograms to this PNG")
    return p


def main(argv=None) -> int:
    from export.unknowns import CHARACTER_SETS, FONT_SETS, character_sets, fashion_mnist, unknown_sets
    from serving.core.errors import StartupError
    from serving.repository.manifest import load_manifest
    from training.data import DataError

    args = get_args_parser().parse_args(argv)
    if args.count < 1:
        print(f"error: --count must be >= 1, got {args.count}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    notes: list[str] = []
    try:
        load_manifest(Path(args.repository) / "manifest.json")  # a wrong path says so before anything is drawn
        known_images, known_labels = _known_set(args)
        unknowns = unknown_sets(args.count, args.seed, names=("uniform_noise", "gaussian_noise", "blank"))
        drawn = character_sets(args.count, args.seed, log=notes.append,
                               names=[n for n in CHARACTER_SETS if not (args.no_fonts and n in FONT_SETS)])
        if args.no_fonts:
            notes.append(f"{', '.join(FONT_SETS)} left out (--no-fonts)")
        unknowns.update({name: d.images for name, d in drawn.items()})
        if args.no_fashion:
            notes.append("Fashion-MNIST left out (--no-fashion)")
        else:
            fashion = fashion_mnist(log=notes.append)
            if fashion is None:
                notes.append("Fashion-MNIST not measured: Debian's dataset-fashion-mnist package could not be had")
            else:
                unknowns["fashion_mnist"] = fashion
        report = evaluate_repository(args.repository, known_images, known_labels, unknowns, notes,
                                     histogram=args.histogram,
                                     characters={name: d.characters for name, d in drawn.items()})
    except (StartupError, DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["fonts"] = {name: {source: [p.name for p in paths] for source, paths in d.fonts.items()}
                       for name, d in drawn.items()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.per_character))
    return 0


if __name__ == "__main__":
    sys.exit(main())
