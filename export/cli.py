"""`python -m export CHECKPOINT --out REPO`: fold, write, verify and lay out a model repository.

Prints the parity figures (eager vs TorchScript vs ONNX Runtime) and exits non-zero with one line
naming the problem on bad input (missing/corrupt/foreign checkpoint, non-empty output without --force).
"""

from __future__ import annotations

import argparse
import sys

from export.detectors import AUTO_DETECTOR, DEFAULT_DETECTOR, DETECTOR_WITH_NEGATIVES, IN_GRAPH
from export.open_set import DEFAULT_ACCEPT_RATE
from export.repository import ExportError, export_repository
from export.verify import ParityError
from training.checkpoint import CheckpointError
from training.data import DataError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a .pt written by python -m training (best.pt or last.pt)")
    p.add_argument("--out", default="model_repository", help="model repository folder to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-batch-size", type=int, default=256, help="max_batch_size in config.pbtxt")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--data-dir", default=None, help="torchvision-layout MNIST root to verify on")
    p.add_argument("--cache-dir", default=None, help="MNIST cache root")
    p.add_argument("--detector", default=AUTO_DETECTOR, choices=(AUTO_DETECTOR, *IN_GRAPH),
                   help="the open-set score the graphs compute as known_score (higher = more digit-like; "
                        f"export.detectors describes each); auto: {DETECTOR_WITH_NEGATIVES} for a net trained with "
                        f"--negatives on, else {DEFAULT_DETECTOR}")
    p.add_argument("--accept-rate", type=float, default=DEFAULT_ACCEPT_RATE,
                   help="known_score threshold: the one accepting this fraction of the held-out digits")
    p.add_argument("--fit-on-training-images", action="store_true",
                   help="for a checkpoint without a held-out split: fit the temperature and threshold on the last "
                        "5000 training images, which the net trained on (recorded in the manifest)")
    p.add_argument("--int8", action="store_true",
                   help="also write lsoftmax_mnist_onnx_int8: the ONNX graph statically quantised (QDQ, per-channel), "
                        "calibrated on the held-out images, with its own temperature and threshold fitted on them, "
                        "and verified against FP32 (the server serves it by default on the CPU: --precision)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.opset < 17:
        print(f"error: --opset must be >= 17, got {args.opset}", file=sys.stderr)
        return 2
    if args.max_batch_size < 1:
        print(f"error: --max-batch-size must be >= 1, got {args.max_batch_size}", file=sys.stderr)
        return 2
    try:
        export_repository(args.checkpoint, args.out, force=args.force, max_batch_size=args.max_batch_size,
                          opset=args.opset, data_dir=args.data_dir, cache_dir=args.cache_dir, detector=args.detector,
                          accept_rate=args.accept_rate, fit_on_training_images=args.fit_on_training_images,
                          int8=args.int8)
    except (ExportError, CheckpointError, ParityError, DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
