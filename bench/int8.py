"""In-process onnxruntime throughput of a repository's FP32 and INT8 ONNX graphs, side by side.

    python -m bench.int8 --model-repository REPO [--batches 1,64] [--threads 1,0] [--rounds 9] [--seconds 0.5] [--json]

REPO is written by `python -m export CKPT --out REPO --int8`. For each batch size and intra-op thread count
(0: onnxruntime's default), one session per graph runs the same real-looking input (the repository's graphs
see uint8 digits; random pixels cost the same). Rounds are interleaved round-robin, FP32 then INT8 then FP32...,
so that load from other processes on a shared machine hits both alike; each round times as many calls as fill
--seconds, and the table reports the median images/s over the rounds and INT8 / FP32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from serving.repository.format import BY_KIND, IMAGE_DIMS, INPUT, ONNX_INT8_MODEL

GRAPHS = {"fp32": Path(BY_KIND["onnx"].file()), "int8": Path(ONNX_INT8_MODEL) / "1" / "model.onnx"}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _calls_per_round(run, seconds: float) -> int:
    """Warm up for about a quarter of a round, and size a round to about `seconds` from the calls' pace."""
    started, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - started < seconds / 4:
        run()
        calls += 1
    per_call = (time.perf_counter() - started) / calls
    return max(2, round(seconds / per_call))


def measure(repository: Path, batch: int, threads: int, rounds: int, seconds: float) -> dict:
    """Median images/s of each graph over interleaved rounds."""
    images = np.random.default_rng(0).integers(0, 256, (batch, *IMAGE_DIMS), dtype=np.uint8)
    runs = {}
    for name, relative in GRAPHS.items():
        graph = session(repository / relative, threads)
        runs[name] = lambda graph=graph: graph.run(None, {INPUT: images})
    calls = {name: _calls_per_round(run, seconds) for name, run in runs.items()}  # also warms up
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(calls[name]):
                run()
            rates[name].append(batch * calls[name] / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"batch": batch, "threads": threads, "rounds": rounds, **{f"{k}_images_per_s": v for k, v in medians.items()},
            "int8_over_fp32": medians["int8"] / medians["fp32"]}


def format_table(rows: list[dict]) -> str:
    lines = ["| batch | intra-op threads | FP32 images/s | INT8 images/s | INT8 / FP32 |", "|---|---|---|---|---|"]
    for row in rows:
        threads = row["threads"] or "default"
        lines.append(f"| {row['batch']} | {threads} | {row['fp32_images_per_s']:,.0f} | {row['int8_images_per_s']:,.0f} "
                     f"| {row['int8_over_fp32']:.2f}x |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", type=Path, required=True, help="a repository exported with --int8")
    p.add_argument("--batches", type=_ints, default=[1, 64], help="batch sizes, comma-separated")
    p.add_argument("--threads", type=_ints, default=[1, 0], help="intra-op threads, comma-separated (0: default)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per graph; the median is reported")
    p.add_argument("--seconds", type=float, default=0.5, help="about how long one round of one graph runs")
    p.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    args = p.parse_args(argv)
    missing = [str(args.model_repository / rel) for rel in GRAPHS.values() if not (args.model_repository / rel).is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not found (export with `python -m export CKPT --out REPO --int8`)",
              file=sys.stderr)
        return 2
    rows = [measure(args.model_repository, batch, threads, args.rounds, args.seconds)
            for threads in args.threads for batch in args.batches]
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
