"""Checkpoint -> verified model repository in Triton's layout (docs/architecture.md §4), step by step:

    the checkpoint and its net -> the fit and verification images (export.datasets)
    -> temperature, detector and threshold (export.fitting) -> graphs, config.pbtxt, manifest, int8 (export.writer)
    -> built in a temporary folder and installed atomically, world-readable (export.publish)

`export_repository` is the one entry point (`python -m export` calls it); a failed export leaves nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from export.datasets import fit_set, verification_set
from export.detectors import AUTO_DETECTOR, IN_GRAPH, detector_for, get
from export.errors import ExportError
from export.fitting import fit
from export.open_set import DEFAULT_ACCEPT_RATE
from export.publish import prepare_out, staged
from export.writer import add_int8, build
from training.checkpoint import load_checkpoint, rebuild_model

__all__ = ["ExportError", "export_repository"]

NO_INT8_CALIBRATION = ("{checkpoint} records no held-out images to calibrate the INT8 model's activation ranges on "
                       "(the test set only verifies it); retrain with a held-out split, or add --fit-on-training-images "
                       "to calibrate on training images the net has seen (recorded in the manifest)")


def _rebuild(checkpoint: Path) -> tuple[dict, torch.nn.Module]:
    """The checkpoint and its net."""
    ckpt = load_checkpoint(checkpoint)
    try:
        net = rebuild_model(ckpt)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ExportError(f"{checkpoint}: weights do not fit the net its config describes ({exc})") from None
    return ckpt, net


def _check_detector(name: str) -> None:
    if name == AUTO_DETECTOR:
        return
    try:
        detector = get(name)
    except ValueError as exc:
        raise ExportError(f"{exc}; the graphs can compute {', '.join(IN_GRAPH)}") from None
    if not detector.in_graph:
        raise ExportError(f"the graphs cannot compute the {name} detector; they can compute {', '.join(IN_GRAPH)}")


def export_repository(checkpoint: str | Path, out: str | Path, force: bool = False,
                      images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      max_batch_size: int = 256, opset: int = 17, data_dir=None, cache_dir=None,
                      log=print, detector: str = AUTO_DETECTOR,
                      accept_rate: float = DEFAULT_ACCEPT_RATE, fit_images: torch.Tensor | None = None,
                      fit_labels: torch.Tensor | None = None, fit_on_training_images: bool = False,
                      int8: bool = False) -> dict:
    """Export, verify and lay out a repository; returns the manifest (with the parity report).

    images/labels: uint8 [N, 1, 28, 28] / int64 [N] to verify on; default: the full MNIST test set.
    The temperature and the known_score detector and threshold are fitted on the checkpoint's held-out training
    images (fit_images/fit_labels instead when given; the last 5000 training images with fit_on_training_images;
    else not fitted: temperature 1 and no threshold, said in one line). detector: one export.detectors can put in
    the graph (IN_GRAPH), or `auto`: the one measured best for how the checkpoint was trained (detector_for).
    int8: add the statically quantised ONNX model (export.quantize), calibrated on those same fit images (refused
    without them), with its own temperature and threshold fitted on them (export.int8_fit), and verified against
    the FP32 graph on the verification images.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _check_detector(detector)
    if not 0.0 < accept_rate <= 1.0:
        raise ExportError(f"accept rate must be in (0, 1], got {accept_rate}")
    prepare_out(out, force)
    ckpt, net = _rebuild(checkpoint)
    ckpt["_path"] = str(checkpoint)
    if detector == AUTO_DETECTOR:
        detector = detector_for(ckpt)
    fit_x, fit_y, fitted_on = fit_set(ckpt, checkpoint, fit_images, fit_labels, fit_on_training_images, data_dir,
                                      cache_dir)
    if int8 and fit_x is None:
        raise ExportError(NO_INT8_CALIBRATION.format(checkpoint=checkpoint))
    inference, calibration, open_set_record = fit(net, ckpt, fit_x, fit_y, fitted_on, detector, accept_rate, log)
    fits = {"calibration": calibration, "open_set": open_set_record}
    images, labels, on_full_test_set = verification_set(images, labels, ckpt["config"], data_dir, cache_dir)

    started = time.perf_counter()
    with staged(out, log) as tmp:
        manifest, report = build(tmp, checkpoint, ckpt, net, inference, images, labels, on_full_test_set,
                                 max_batch_size, opset, fits)
        if int8:
            manifest = add_int8(tmp, manifest, fit_x, fit_y, fitted_on, images, labels, log)
    for line in report.lines():
        log(line)
    if manifest.test_accuracy is not None and report.accuracy:
        log(f"checkpoint's recorded test accuracy {manifest.test_accuracy:.2f}%; exported graphs "
            + ", ".join(f"{k} {v:.2f}%" for k, v in report.accuracy.items()))
    log(f"wrote {out} ({time.perf_counter() - started:.1f}s)")
    return manifest.to_dict()
