"""Checkpoint -> verified model repository in Triton's layout.

    REPO/lsoftmax_mnist_onnx/{config.pbtxt, 1/model.onnx}
    REPO/lsoftmax_mnist_torchscript/{config.pbtxt, 1/model.pt}
    REPO/manifest.json

Everything is built in a temporary folder beside REPO (`.REPO.tmp-<pid>-<random>`) and renamed into place only
after the parity checks pass, so a failed export never leaves half a repository; the folder a killed export left
is removed by the next export to REPO (export.leftovers: only its own, once its process is gone and it has been
quiet for an hour). The tree is world-readable (folders 0755, files 0644, whatever the umask): the serving
image reads it as another user. The format (names, backend table, manifest.json structure, config.pbtxt as
Triton's ModelConfig) is the server's: serving.repository_*.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.graphs import load_onnx_session, load_torchscript, onnx_report, write_onnx, write_torchscript
from export import open_set
from export.leftovers import remove_stale, temp_prefix
from export.inference_module import build_inference_module, stage_features
from export.quantize import Int8Error, build_int8
from export.verify import ParityReport, check_parity
from serving.repository.config import model_config, read_config, write_config
from serving.repository.format import (BY_KIND, CONFIG_FILE, DEFAULT_VERSION, FORMATS, IMAGE_DIMS, MANIFEST_FILE,
                                       MANIFEST_FORMAT, MODEL_PREFIX, ONNX_INT8_MODEL, ModelFormat)
from serving.repository.manifest import InputSpec, ModelSpec, RepositoryManifest, TensorSpec, write_manifest
from training.checkpoint import fsync_dir, load_checkpoint, rebuild_model
from training.data import sha256_file

__all__ = ["MODEL_PREFIX", "MANIFEST_FORMAT", "ExportError", "export_repository", "sha256_file"]


class ExportError(RuntimeError):
    """The export could not be done; nothing was written to the output folder."""


# Test images by which the exported graphs' accuracy (float32, CPU) may differ from the checkpoint's own
# figure, by where that figure was measured: CPU float32 is exact; CUDA's float32 convolutions (TF32 off for
# scoring) sum in another order; checkpoints from before "evaluated_on" existed may have been scored under
# bf16 autocast on a GPU.
ACCURACY_SLACK_IMAGES = {"cpu": 0, "cuda": 5, "unrecorded": 10}


def _scored_on(config: dict) -> str:
    if config.get("evaluated_on") in ACCURACY_SLACK_IMAGES:
        return config["evaluated_on"]
    return "cpu" if config.get("train_args", {}).get("device") == "cpu" else "unrecorded"


def accuracy_mismatch(accuracy: dict, recorded: float, config: dict, images: int) -> dict:
    """Runtimes whose accuracy on the checkpoint's own test images is off its recorded figure: the graphs
    must get the same count right, give or take the borderline images another device's arithmetic flips."""
    tolerance = (ACCURACY_SLACK_IMAGES[_scored_on(config)] + 0.5) * 100.0 / images
    return {rt: acc for rt, acc in accuracy.items() if abs(acc - recorded) > tolerance}


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"{out.parent} is not writable")


DIR_MODE, FILE_MODE = 0o755, 0o644


def _seal(tree: Path) -> None:
    """Give every folder 0755 and every file 0644 (set outright, not through the umask; mkdtemp makes the top
    folder 0700), and fsync them, so that the tree is readable by any user and complete on disk before the
    rename publishes it."""
    for folder, _, files in os.walk(tree):
        for name in files:
            path = os.path.join(folder, name)
            os.chmod(path, FILE_MODE)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(folder, DIR_MODE)
        fsync_dir(folder)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished tree into place; an old tree (with --force) is moved aside first."""
    _seal(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)  # both renames reach the disk
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rebuild(checkpoint: Path) -> tuple[dict, torch.nn.Module]:
    """The checkpoint and its net."""
    ckpt = load_checkpoint(checkpoint)
    try:
        net = rebuild_model(ckpt)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ExportError(f"{checkpoint}: weights do not fit the net its config describes ({exc})") from None
    return ckpt, net


NOT_FITTED = ("{checkpoint} records no held-out images (trained with --val-size 0 or before it was recorded): "
              "the served probabilities stay uncalibrated (temperature 1) and no input is rejected as not a digit. "
              "Retrain with a held-out split, or export with --fit-on-training-images to fit on training images the "
              "net has seen (recorded in the manifest; the threshold then accepts more unknowns than it should)")


def _fit_set(ckpt: dict, checkpoint: Path, fit_images, fit_labels, fit_on_training_images: bool, data_dir,
             cache_dir) -> tuple[torch.Tensor | None, torch.Tensor | None, dict | None]:
    """The images calibration and the threshold are fitted on, and what they are (for the manifest): the
    checkpoint's held-out split (checked against its sha256), images the caller gives, the last training images
    with --fit-on-training-images, or none (not fitted)."""
    held = ckpt["config"].get("held_out")
    if fit_images is not None:
        return fit_images, fit_labels, {"source": "given by the caller", "count": len(fit_labels)}
    if not held and not fit_on_training_images:
        return None, None, None
    from training.data import load_split, prepare_mnist
    from training.train import held_out_digest

    images, labels = load_split(prepare_mnist(data_dir, cache_dir=cache_dir), train=True)
    if held:
        start, stop = int(held["start"]), int(held["stop"])
        images, labels = images[start:stop], labels[start:stop]
        if len(labels) != stop - start or held_out_digest(images, labels) != held.get("sha256"):
            raise ExportError(f"{checkpoint}: the held-out training images [{start}, {stop}) of this MNIST copy are not "
                              "the ones the checkpoint recorded (sha256 differs); use the run's --data-dir")
        return images, labels, {"source": "held-out training images", "split": "train", "start": start, "stop": stop,
                                "count": stop - start, "sha256": held["sha256"]}
    count = min(5000, len(labels))
    return images[-count:], labels[-count:], {
        "source": "training images the net trained on (--fit-on-training-images; no held-out split recorded)",
        "split": "train", "start": len(labels) - count, "stop": len(labels), "count": count}


@torch.no_grad()
def _outputs(module, images: torch.Tensor, batch_size: int = 1000) -> tuple:
    """Every output of `module` (a graph, or any batch -> tensors function) over images, batched, as numpy."""
    parts = [module(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return tuple(torch.cat([p[k] for p in parts]).numpy() for k in range(len(parts[0])))


def _fit(net, ckpt: dict, images, labels, fitted_on: dict | None, detector: str, accept_rate: float,
         log) -> tuple[torch.nn.Module, dict, dict]:
    """The inference module with its known_score detector, and the manifest's calibration and open_set records.

    The temperature minimises NLL on the fit images. For the Mahalanobis detectors the class means and covariance
    are fitted on the even-indexed fit images and the threshold (and multilayer_mahalanobis's per-layer spread) on
    the odd ones (a threshold on the images the statistics came from would accept fewer unseen digits than it says);
    max_cosine has no parameters and uses them all."""
    normalization = ckpt["config"]["normalization"]
    if images is None:
        log(NOT_FITTED.format(checkpoint=ckpt.get("_path", "the checkpoint")))
        module = build_inference_module(net, normalization, detector="max_cosine")
        return module, {"temperature": 1.0, "fitted_on": None}, {
            "output": "known_score", "detector": "max_cosine", "threshold": None, "accept_rate": None,
            "fitted_on": None, "description": open_set.DETECTORS["max_cosine"]}
    labels_np = labels.numpy()
    base = build_inference_module(net, normalization, detector="max_cosine")
    logits, embedding, _ = _outputs(base, images)
    temperature = open_set.fit_temperature(logits, labels_np)
    calibration = {"temperature": temperature, "fitted_on": fitted_on,
                   "nll_before": open_set.nll(logits, labels_np), "nll_after": open_set.nll(logits, labels_np, temperature),
                   "ece_before": open_set.ece(open_set.softmax(logits), labels_np),
                   "ece_after": open_set.ece(open_set.softmax(logits, temperature), labels_np)}
    fitted, threshold_rows = None, np.arange(len(labels_np))
    num_classes = int(ckpt["config"].get("num_classes", 10))
    if detector in ("mahalanobis", "multilayer_mahalanobis"):
        stats_rows, threshold_rows = threshold_rows[0::2], threshold_rows[1::2]
    if detector == "mahalanobis":
        fitted = open_set.fit_mahalanobis(embedding[stats_rows], labels_np[stats_rows], num_classes)
    elif detector == "multilayer_mahalanobis":
        features = _outputs(functools.partial(stage_features, base), images)
        fitted = open_set.fit_multilayer_mahalanobis([f[stats_rows] for f in features], labels_np[stats_rows],
                                                     [f[threshold_rows] for f in features], num_classes)
    module = build_inference_module(net, normalization, detector=detector, fitted=fitted)
    scores = _outputs(module, images[torch.from_numpy(threshold_rows)])[2]
    threshold = open_set.accept_threshold(scores, accept_rate)
    record = {"output": "known_score", "detector": detector, "threshold": threshold, "accept_rate": accept_rate,
              "fit_accepted": float((scores >= threshold).mean()), "fitted_on": fitted_on,
              "threshold_images": len(threshold_rows), "description": open_set.DETECTORS[detector]}
    log(f"calibration: temperature {temperature:.4g} on {len(labels_np)} {fitted_on['source']} (NLL "
        f"{calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}, ECE {100 * calibration['ece_before']:.2f}% -> "
        f"{100 * calibration['ece_after']:.2f}%); known_score {detector} >= {threshold:.6g} accepts "
        f"{100 * record['fit_accepted']:.2f}% of {len(threshold_rows)} of them")
    return module, calibration, record


def _verification_set(images, labels, config: dict, data_dir, cache_dir) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The images to verify on (default: the MNIST test set) and whether they are the set the checkpoint was
    scored on, so that its recorded accuracy must be matched."""
    on_full_test_set = images is None and not config.get("train_args", {}).get("test_subset")
    if images is None:
        from training.data import load_split, prepare_mnist

        images, labels = load_split(prepare_mnist(data_dir, cache_dir=cache_dir), train=False)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_DIMS:
        raise ExportError(f"verification images must be uint8 [N, 1, 28, 28], got {images.dtype} {list(images.shape)}")
    return images, labels, on_full_test_set


def config_parameters(fits: dict | None) -> dict[str, str]:
    """config.pbtxt's parameters: the served temperature, the known_score detector and its threshold (the
    manifest's calibration / open_set records). None for an unfitted export (temperature 1, nothing rejected):
    config.pbtxt then stays as before issue 13."""
    calibration, record = (fits or {}).get("calibration") or {}, (fits or {}).get("open_set") or {}
    if not calibration.get("fitted_on"):
        return {}
    out = {"temperature": repr(float(calibration.get("temperature", 1.0)))}
    if record.get("detector"):
        out["detector"] = record["detector"]
    if record.get("threshold") is not None:
        out["threshold"] = repr(float(record["threshold"]))
    return out


def _write_model(tmp: Path, fmt: ModelFormat, inference, opset: int, max_batch_size: int, num_classes: int,
                 embedding_dim: int, parameters: dict[str, str] | None = None) -> Path:
    """REPO/<model>/1/<file> and REPO/<model>/config.pbtxt; returns the model file."""
    path = tmp / fmt.file()
    path.parent.mkdir(parents=True)
    if fmt.kind == "onnx":
        write_onnx(inference, path, opset)
    else:
        write_torchscript(inference, path)
    write_config(tmp / fmt.directory, model_config(fmt, max_batch_size, num_classes, embedding_dim,
                                                   parameters=parameters))
    return path


def _manifest(tmp: Path, checkpoint: Path, ckpt: dict, paths: dict[str, Path], report: ParityReport,
              graph_facts: dict, max_batch_size: int, fits: dict | None = None) -> RepositoryManifest:
    """manifest.json's content: the served facts, every file's sha256, and the export's provenance."""
    config = ckpt["config"]
    num_classes, normalization = int(config.get("num_classes", 10)), config["normalization"]
    files = {path.relative_to(tmp).as_posix(): sha256_file(path) for path in sorted(tmp.rglob("*")) if path.is_file()}
    return RepositoryManifest(
        model_name_prefix=MODEL_PREFIX, net=config["model"], margin=int(config["margin"]), num_classes=num_classes,
        embedding_dim=int(config["embedding_dim"]), test_accuracy=(ckpt.get("metrics") or {}).get("test_acc"),
        verified_accuracy=report.accuracy, max_batch_size=max_batch_size,
        input=InputSpec(polarity=config.get("input", {}).get("polarity", "white digit on black (MNIST)"),
                        normalization={"scale": float(normalization.get("scale", 1 / 255)),
                                       "mean": float(normalization["mean"]), "std": float(normalization["std"])}),
        outputs=TensorSpec.outputs(num_classes, int(config["embedding_dim"]), known_score=True),
        models={fmt.directory: ModelSpec.of(fmt, sha256_file(paths[fmt.kind])) for fmt in FORMATS},
        files=files,
        records={**(fits or {}), "onnx": graph_facts, "parity": report.as_dict(),
                 "source_checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                                       "epoch": ckpt.get("epoch"), "train_args": config.get("train_args", {})},
                 "exporter": {**_versions(), "created_unix": int(time.time())}})


def _build(tmp: Path, checkpoint: Path, ckpt: dict, net, inference, images, labels, on_full_test_set: bool,
           max_batch_size: int, opset: int, fits: dict | None = None) -> tuple[RepositoryManifest, ParityReport]:
    """Write both graphs and their configs into tmp, verify them, then write manifest.json."""
    config = ckpt["config"]
    num_classes, embedding_dim = int(config.get("num_classes", 10)), int(config["embedding_dim"])
    paths = {fmt.kind: _write_model(tmp, fmt, inference, opset, max_batch_size, num_classes, embedding_dim,
                                    config_parameters(fits)) for fmt in FORMATS}
    graph_facts = onnx_report(paths["onnx"])
    report = check_parity(net, inference, load_torchscript(paths["torchscript"]), load_onnx_session(paths["onnx"]),
                          images, labels, config["normalization"])
    recorded = (ckpt.get("metrics") or {}).get("test_acc")
    if on_full_test_set and recorded is not None:
        off = accuracy_mismatch(report.accuracy, recorded, config, len(images))
        if off:
            raise ExportError(f"exported accuracy {off} differs from the checkpoint's recorded {recorded:.2f}%")
    manifest = _manifest(tmp, checkpoint, ckpt, paths, report, graph_facts, max_batch_size, fits)
    write_manifest(tmp, manifest)
    return manifest, report


NO_INT8_CALIBRATION = ("{checkpoint} records no held-out images to calibrate the INT8 model's activation ranges on "
                       "(the test set only verifies it); retrain with a held-out split, or add --fit-on-training-images "
                       "to calibrate on training images the net has seen (recorded in the manifest)")


def _add_int8(tmp: Path, manifest: RepositoryManifest, calibration_images: torch.Tensor, calibrated_on: dict,
              images: torch.Tensor, labels: torch.Tensor | None, log) -> RepositoryManifest:
    """REPO/lsoftmax_mnist_onnx_int8/{config.pbtxt, 1/model.onnx}: the verified FP32 ONNX graph quantised and
    checked against it (export.quantize), with the FP32 model's config.pbtxt under its own name, listed in
    manifest.json (models, files) with its `int8` record. A broken bound fails the export."""
    fp32 = BY_KIND["onnx"]
    path = tmp / ONNX_INT8_MODEL / DEFAULT_VERSION / fp32.filename
    path.parent.mkdir(parents=True)
    threshold = (manifest.records.get("open_set") or {}).get("threshold")
    try:
        record = build_int8(tmp / fp32.file(), path, calibration_images.numpy(), calibrated_on, images.numpy(),
                            None if labels is None else labels.numpy(), threshold)
    except Int8Error as exc:
        raise ExportError(str(exc)) from None
    config = read_config(tmp / fp32.directory / CONFIG_FILE)
    config.name = ONNX_INT8_MODEL
    write_config(tmp / ONNX_INT8_MODEL, config)
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != MANIFEST_FILE}
    spec = ModelSpec(backend=fp32.backend, file=path.relative_to(tmp).as_posix(), sha256=sha256_file(path))
    manifest = dataclasses.replace(manifest, models={**manifest.models, ONNX_INT8_MODEL: spec}, files=files,
                                   records={**manifest.records, "int8": record})
    write_manifest(tmp, manifest)
    check = record["verification"]
    accuracy = check["accuracy"] or {}
    log(f"int8: {ONNX_INT8_MODEL} ({len(record['quantized_nodes'])} Conv nodes quantised) vs FP32 on {check['images']} "
        f"images: top-1 agreement {check['top1_agreement']:.2f}%, accuracy "
        + (f"{accuracy['fp32']:.2f}% -> {accuracy['int8']:.2f}%" if accuracy else "n/a")
        + f", embedding cosine mean {check['embedding_cosine_mean']:.5f} (min {check['embedding_cosine_min']:.4f})"
        + (f", max|dknown_score| {check['known_score_max_abs_diff']:.3g} (of {check['known_score_scale']:.3g})"
           if check["known_score_max_abs_diff"] is not None else "")
        + (f", accept/reject agreement {check['decision_agreement']:.2f}%" if check["decision_agreement"] is not None
           else ""))
    return manifest


def export_repository(checkpoint: str | Path, out: str | Path, force: bool = False,
                      images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      max_batch_size: int = 256, opset: int = 17, data_dir=None, cache_dir=None,
                      log=print, detector: str = open_set.DEFAULT_DETECTOR,
                      accept_rate: float = open_set.DEFAULT_ACCEPT_RATE, fit_images: torch.Tensor | None = None,
                      fit_labels: torch.Tensor | None = None, fit_on_training_images: bool = False,
                      int8: bool = False) -> dict:
    """Export, verify and lay out a repository; returns the manifest (with the parity report).

    images/labels: uint8 [N, 1, 28, 28] / int64 [N] to verify on; default: the full MNIST test set.
    The temperature and the known_score threshold are fitted on the checkpoint's held-out training images
    (fit_images/fit_labels instead when given; the last 5000 training images with fit_on_training_images; else
    not fitted: temperature 1 and no threshold, said in one line). detector: max_cosine or mahalanobis.
    int8: add the statically quantised ONNX model (export.quantize), calibrated on those same fit images (refused
    without them) and verified against the FP32 graph on the verification images.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if detector not in open_set.IN_GRAPH:
        raise ExportError(f"unknown detector {detector!r}; the graphs can compute {', '.join(open_set.IN_GRAPH)}")
    if not 0.0 < accept_rate <= 1.0:
        raise ExportError(f"accept rate must be in (0, 1], got {accept_rate}")
    _prepare_out(out, force)
    ckpt, net = _rebuild(checkpoint)
    ckpt["_path"] = str(checkpoint)
    fit_x, fit_y, fitted_on = _fit_set(ckpt, checkpoint, fit_images, fit_labels, fit_on_training_images, data_dir,
                                       cache_dir)
    if int8 and fit_x is None:
        raise ExportError(NO_INT8_CALIBRATION.format(checkpoint=checkpoint))
    inference, calibration, open_set_record = _fit(net, ckpt, fit_x, fit_y, fitted_on, detector, accept_rate, log)
    fits = {"calibration": calibration, "open_set": open_set_record}
    images, labels, on_full_test_set = _verification_set(images, labels, ckpt["config"], data_dir, cache_dir)

    started = time.perf_counter()
    remove_stale(out, log)  # what an export to `out` that was killed left (export.leftovers says when)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        manifest, report = _build(tmp, checkpoint, ckpt, net, inference, images, labels, on_full_test_set,
                                  max_batch_size, opset, fits)
        if int8:
            manifest = _add_int8(tmp, manifest, fit_x, fitted_on, images, labels, log)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in report.lines():
        log(line)
    if manifest.test_accuracy is not None and report.accuracy:
        log(f"checkpoint's recorded test accuracy {manifest.test_accuracy:.2f}%; exported graphs "
            + ", ".join(f"{k} {v:.2f}%" for k, v in report.accuracy.items()))
    log(f"wrote {out} ({time.perf_counter() - started:.1f}s)")
    return manifest.to_dict()
