"""Reproduce the paper's MNIST table: train a net for each margin and seed, report final-epoch accuracy.

    python -m training.reproduce --model paper --margins 1,2,3,4 --seeds 0,1,2 --jobs 4   # on a GPU
    python -m training.reproduce --model fast --seeds 0,1                                   # on a 2-core CPU
    python -m training.reproduce --model vis --seeds 0 --figure                             # Fig. 2 grid

Each run is `python -m training ...` in a subprocess (so --jobs N runs N margins at once on an
underused GPU); its final-epoch test accuracy is read back from metrics.jsonl. Results are kept
per net in docs/results/<net>.json and docs/results.md is rebuilt from all of them, next to the
paper's numbers, with training curves as PNG. The reported figure is the final epoch's accuracy,
mean ± std over seeds, never an epoch picked on the test set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PAPER_ACCURACY = {1: 99.60, 2: 99.68, 3: 99.69, 4: 99.69}  # Liu et al. 2016, Table 2 (MNIST)


def _device_name(device: str) -> str:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def _read_epochs(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# The paper trained on the digits alone: no outlier exposure unless asked for (a later flag in `extra` wins).
PAPER_RECIPE_FLAGS = ("--negatives", "off", "--capture-augment", "off")


def _run_one(model: str, margin: int, seed: int, out: Path, extra: list[str], log,
             deadline: float | None = None, env: dict | None = None) -> dict:
    """One training run in a subprocess. Past `deadline` (time.monotonic()) it is stopped, or not
    started, and comes back with finished=False and the epochs it logged; a failed run comes back
    with finished=False and its last line of stderr as "error"."""
    cmd = [sys.executable, "-m", "training", "--model", model, "--margin", str(margin), "--seed", str(seed),
           "--out", str(out), "--progress", "off", *PAPER_RECIPE_FLAGS, *extra]
    result = {"margin": margin, "seed": seed, "out": str(out)}
    if deadline is not None and time.monotonic() >= deadline:
        log(f"skip  m={margin} seed={seed}: time budget spent before it could start")
        return {**result, "finished": False, "epochs": [], "wall_seconds": 0.0}
    started = time.perf_counter()
    log(f"start m={margin} seed={seed}: {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = proc.communicate(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        proc.terminate()  # checkpoints are written atomically, so a stopped run leaves loadable files
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        epochs = _read_epochs(out)
        log(f"stop  m={margin} seed={seed}: time budget spent after {len(epochs)} epoch(s)")
        return {**result, "finished": False, "epochs": epochs, "wall_seconds": time.perf_counter() - started}
    wall = time.perf_counter() - started
    epochs = _read_epochs(out)
    if proc.returncode != 0:  # kept, not raised: one failed run must not cost the others their rows
        reason = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        log(f"fail  m={margin} seed={seed}: {reason}")
        return {**result, "finished": False, "error": reason, "epochs": epochs, "wall_seconds": wall}
    log(f"done  m={margin} seed={seed}: final test acc {epochs[-1]['test_acc']:.2f}% in {wall:.0f}s")
    return {**result, "finished": True, "final_test_acc": epochs[-1]["test_acc"], "wall_seconds": wall,
            "epochs": epochs}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per margin over its finished runs (a run stopped by the time budget has no final epoch)."""
    rows = []
    for m in sorted({r["margin"] for r in runs if r["finished"]}):
        done = [r for r in runs if r["margin"] == m and r["finished"]]
        accs = [r["final_test_acc"] for r in done]
        rows.append({"margin": m, "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": len(accs), "accuracies": accs,
                     "wall_seconds": statistics.fmean(r["wall_seconds"] for r in done)})
    return rows


def plot_curves(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    colours = matplotlib.colormaps["tab10"]
    for r in runs:
        epochs = [e["epoch"] for e in r["epochs"]]
        label = f"m={r['margin']} seed {r['seed']}" + ("" if r.get("finished", True) else " (stopped)")
        style = {"color": colours(r["margin"] - 1), "alpha": 0.8, "label": label,
                 "linestyle": "-" if r.get("finished", True) else ":"}
        ax_loss.plot(epochs, [e["train_loss"] for e in r["epochs"]], **style)
        ax_err.plot(epochs, [100 - e["test_acc"] for e in r["epochs"]], **style)
    ax_loss.set(xlabel="epoch", ylabel="train loss (with margin)", yscale="log", title=f"{title}: training loss")
    positive = all(e["test_acc"] < 100 for r in runs for e in r["epochs"])
    ax_err.set(xlabel="epoch", ylabel="test error %", yscale="log" if positive else "linear",
               title=f"{title}: test error")
    ax_err.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results_md(docs: Path) -> Path:
    """Rebuild docs/results.md from every docs/results/<net>.json present."""
    records = [json.loads(p.read_text()) for p in (docs / "results").glob("*.json")]
    order = ["paper", "fast", "vis"]  # the paper's own net first, its recipe before any tagged variant
    records.sort(key=lambda r: (order.index(r["model"]) if r["model"] in order else len(order),
                                bool(r.get("tag")), r.get("tag", "")))
    lines = ["# MNIST results: L-Softmax per margin", "",
             "Final-epoch test accuracy (never the best epoch picked on the test set), mean ± std over seeds.",
             "Produced by `python -m training.reproduce`; the exact command of each net is under its table.", ""]
    for rec in records:
        lines += [f"## `{rec['model']}` net" + (f" ({rec['tag']})" if rec.get("tag") else ""), "",
                  "| m | final-epoch test accuracy % (mean ± std) | seeds | paper % | net | device | wall time per run |",
                  "|---|---|---|---|---|---|---|"]
        for row in rec["rows"]:
            lines.append(f"| {row['margin']} | {row['mean']:.2f} ± {row['std']:.2f} | {row['seeds']} | "
                         f"{PAPER_ACCURACY.get(row['margin'], float('nan')):.2f} | {rec['model']} | {rec['device']} | "
                         f"{row['wall_seconds'] / 60:.1f} min |")
        lines += ["", f"Command: `{rec['command']}`  ", f"Recipe: {rec['recipe']}  ",
                  f"Measured {rec['date']} with torch {rec['torch']}. Per-seed accuracies: "
                  + "; ".join(f"m={r['margin']}: {', '.join(f'{a:.2f}' for a in r['accuracies'])}" for r in rec["rows"]),
                  "", f"![training curves]({rec['curves']})", ""]
        if rec.get("unfinished"):
            budget = f" (`--time-budget {rec['time_budget']:.0f}`)" if rec.get("time_budget") else ""
            lines += [f"Runs that did not finish{budget}, so not in the table: " + "; ".join(
                f"m={u['margin']} seed {u['seed']} ({u.get('reason', 'time budget')}, {u['epochs_done']} of "
                f"{u['epochs_planned']} epochs)" for u in rec["unfinished"]) + ".", ""]
        if rec.get("note"):
            lines += [rec["note"], ""]
    if not any(rec["model"] == "paper" and not rec.get("tag") for rec in records):
        lines += ["## Not yet measured", "",
                  "The `paper` net (Table 1 recipe, 18k iterations ≈ 77 epochs) trains at about 270 images/s on the",
                  "2-core CPU (`python -m bench.train --nets paper`, BENCHMARKS.md): 3.7 minutes per epoch, 4.8 hours",
                  "per margin and seed, so its rows need a GPU run: `python -m training.reproduce --model paper --seeds 0,1,2 "
                  "--jobs 4 --time-budget 330` on a machine with one (`bench/gpu.sh` runs it; no GPU has been lent to",
                  "this project yet). Until then the tables above are what the CPU can honestly produce: other, smaller",
                  "or shorter-trained networks than the paper's, whose numbers are not comparable to the paper's column.",
                  ""]
    if (docs / "fig2_features.png").exists():
        lines += ["## Fig. 2: 2-D test features of the `vis` net", "", "![features](fig2_features.png)", ""]
    path = docs / "results.md"
    path.write_text("\n".join(lines))
    return path


def figure_grid(runs: list[dict], model: str, path: Path, data_dir=None) -> None:
    """Fig. 2-style grid of test features, one panel per margin (first seed)."""
    from training.checkpoint import load_checkpoint, rebuild_model
    from training.data import load_split, prepare_mnist
    from training.visualize import compute_features, plot_grid

    images, labels = load_split(prepare_mnist(data_dir), train=False)
    panels = []
    for r in sorted(runs, key=lambda r: (r["margin"], r["seed"])):
        if any(p[2].startswith(f"m={r['margin']} ") for p in panels):
            continue
        net = rebuild_model(load_checkpoint(Path(r["out"]) / "last.pt"))
        feats = compute_features(net, images)
        panels.append((feats, labels.numpy(), f"m={r['margin']} ({model}): test acc {r['final_test_acc']:.2f}%"))
    plot_grid(panels, path, columns=len(panels))


def parse_arguments(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """This command's flags, and the rest (checked) for each training run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # --margin must not pass for --margins
    p.add_argument("--model", default="fast", choices=["paper", "fast", "vis"], help="which net")
    p.add_argument("--margins", default="1,2,3,4", help="comma-separated margins")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (several fit on one GPU)")
    p.add_argument("--out", default="runs/reproduce", help="where run folders go")
    p.add_argument("--docs", default="docs", help="where results.md, results/*.json and PNGs go")
    p.add_argument("--figure", action="store_true", help="also write docs/fig2_features.png (one panel per margin)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device for every run")
    p.add_argument("--data-dir", default=None, help="torchvision-layout MNIST root")
    p.add_argument("--note", default="", help="a line printed under the net's table")
    p.add_argument("--tag", default="",
                   help="names a run of the net with another recipe (flags after the known ones go to "
                        "python -m training): its own table, results/<net>-<tag>.json and run folder; an "
                        "untagged `paper` table is the paper's recipe")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for all runs (0 = no limit): runs still going then are stopped, runs not yet "
                        "started are skipped, and the table holds the finished ones. Runs start seed by seed, "
                        "so a budget that cuts the run short keeps whole first seeds for every margin")
    args, extra = p.parse_known_args(argv)
    _check_training_flags(p, args.model, extra)
    return args, extra


def _check_training_flags(parser: argparse.ArgumentParser, model: str, extra: list[str]) -> None:
    """Flags not ours go to every `python -m training` run: check them now, once, with its own parser
    (a typo would otherwise fail every run), and keep the ones each run sets itself off the command line."""
    from training.train import get_args_parser as training_parser

    ours = {"--margin", "--seed", "--resume", "--progress"}  # (--model, --out, --device, --data-dir are ours too)
    taken = sorted(ours.intersection(word.split("=")[0] for word in extra))
    if taken:
        parser.error(f"{', '.join(taken)}: set by the reproduction for each run (use --margins, --seeds)")
    trainer = training_parser()
    trainer.prog = f"{parser.prog} (flags passed on to python -m training)"
    trainer.parse_args(["--model", model, *extra])


def _run_all(args, extra: list[str], out: Path, deadline: float | None) -> list[dict]:
    """Every (seed, margin) run, --jobs at a time, seed-major; each run's result dict."""
    margins = [int(m) for m in args.margins.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    # Runs side by side share the cores: each gets its share of intra-op threads (as torchrun does), not
    # all of them, which would oversubscribe the CPU (on a GPU the CPU only feeds the kernels anyway).
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def job(seed_margin):
        s, m = seed_margin
        return _run_one(args.model, m, s, out / f"m{m}_seed{s}", extra, lambda msg: print(msg, flush=True),
                        deadline=deadline, env=env)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return list(pool.map(job, [(s, m) for s in seeds for m in margins]))


def _record(args, argv, runs: list[dict], finished: list[dict], rows: list[dict], curves: Path,
            started: float) -> dict:
    """The results file's content: the table, the recipe read back from a finished run, what did not finish."""
    from training.checkpoint import load_checkpoint

    train_args = load_checkpoint(Path(finished[0]["out"]) / "last.pt")["config"]["train_args"]
    return {
        "model": args.model, "tag": args.tag, "rows": rows, "device": _device_name(args.device),
        "command": "python -m training.reproduce " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "recipe": (f"{train_args['epochs']} epochs, batch {train_args['batch_size']}, lr {train_args['lr']} "
                   f"({train_args['lr_schedule']}), SGD momentum {train_args['momentum']}, "
                   f"weight decay {train_args['weight_decay']}, beta schedule {train_args['beta_schedule']}"),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "curves": curves.name,
        "total_wall_seconds": time.perf_counter() - started, "last_epoch": finished[0]["epochs"][-1]["epoch"],
        "note": args.note, "time_budget": args.time_budget,
        "unfinished": [{"margin": r["margin"], "seed": r["seed"], "epochs_done": len(r["epochs"]),
                        "epochs_planned": train_args["epochs"],
                        "reason": f"failed: {r['error']}" if "error" in r else "time budget"}
                       for r in runs if not r["finished"]],
    }


def main(argv=None) -> int:
    args, extra = parse_arguments(argv)
    extra = ["--device", args.device, *(["--data-dir", args.data_dir] if args.data_dir else []), *extra]
    name = args.model + (f"-{args.tag}" if args.tag else "")  # one results file and run folder per net and tag
    docs, out = Path(args.docs), Path(args.out) / name
    (docs / "results").mkdir(parents=True, exist_ok=True)

    from training.data import DataError, prepare_mnist

    try:
        prepare_mnist(args.data_dir)  # fetch once before parallel runs race for the cache
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    started = time.perf_counter()
    runs = _run_all(args, extra, out, time.monotonic() + args.time_budget if args.time_budget > 0 else None)
    finished = [r for r in runs if r["finished"]]
    failed = [r for r in runs if "error" in r]
    for r in failed:
        print(f"error: m={r['margin']} seed={r['seed']} failed: {r['error']}", file=sys.stderr)
    if not finished:
        if not failed:
            print(f"error: no run finished within --time-budget {args.time_budget:.0f}s; their logs are under {out}",
                  file=sys.stderr)
        return 1
    rows = summarise(runs)
    curves = docs / f"curves_{name}.png"
    plot_curves([r for r in runs if r["epochs"]], curves, name)
    record = _record(args, argv, runs, finished, rows, curves, started)
    (docs / "results" / f"{name}.json").write_text(json.dumps(record, indent=1))
    if args.figure:
        figure_grid(finished, args.model, docs / "fig2_features.png", args.data_dir)
    path = write_results_md(docs)
    for row in rows:
        print(f"m={row['margin']}: {row['mean']:.2f} ± {row['std']:.2f}% over {row['seeds']} seed(s) "
              f"(paper {PAPER_ACCURACY.get(row['margin'], float('nan')):.2f}%)")
    if record["unfinished"]:
        print(f"{len(record['unfinished'])} of {len(runs)} run(s) did not finish (time budget or failure) and are "
              "left out of the table")
    print(f"wrote {path}, {curves}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
