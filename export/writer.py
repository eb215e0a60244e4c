"""Writing a repository's content into the folder export.publish installs: both graphs with their config.pbtxt,
checked against eager (export.verify), manifest.json, and the optional INT8 model.

    REPO/lsoftmax_mnist_onnx/{config.pbtxt, 1/model.onnx}
    REPO/lsoftmax_mnist_torchscript/{config.pbtxt, 1/model.pt}
    REPO/lsoftmax_mnist_onnx_int8/{config.pbtxt, 1/model.onnx}     (--int8)
    REPO/manifest.json

The format (names, backend table, manifest.json structure, config.pbtxt as Triton's ModelConfig) is the server's:
serving.repository (docs/architecture.md §5, Repository).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from export.errors import ExportError
from export.graphs import load_onnx_session, load_torchscript, onnx_report, write_onnx, write_torchscript
from export.quantize import Int8Error, build_int8
from export.verify import ParityReport, accuracy_mismatch, check_parity
from serving.repository.config import model_config, read_config, write_config
from serving.repository.format import (BY_KIND, CONFIG_FILE, DEFAULT_VERSION, FORMATS, MANIFEST_FILE,
                                       MODEL_CALIBRATION, MODEL_PREFIX, ONNX_INT8_MODEL, ModelFormat)
from serving.repository.manifest import InputSpec, ModelSpec, RepositoryManifest, TensorSpec, write_manifest
from training.data import sha256_file

__all__ = ["config_parameters", "write_model", "manifest_of", "build", "add_int8", "int8_report", "versions"]


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def config_parameters(fits: dict | None) -> dict[str, str]:
    """config.pbtxt's parameters: the served temperature, the known_score detector and its threshold (the
    manifest's calibration / open_set records). None for an unfitted export (temperature 1, nothing rejected):
    config.pbtxt then stays as for a graph without known_score."""
    calibration, record = (fits or {}).get("calibration") or {}, (fits or {}).get("open_set") or {}
    if not calibration.get("fitted_on"):
        return {}
    out = {"temperature": repr(float(calibration.get("temperature", 1.0)))}
    if record.get("detector"):
        out["detector"] = record["detector"]
    if record.get("threshold") is not None:
        out["threshold"] = repr(float(record["threshold"]))
    return out


def write_model(tmp: Path, fmt: ModelFormat, inference, opset: int, max_batch_size: int, num_classes: int,
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


def manifest_of(tmp: Path, checkpoint: Path, ckpt: dict, paths: dict[str, Path], report: ParityReport,
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
                 "exporter": {**versions(), "created_unix": int(time.time())}})


def build(tmp: Path, checkpoint: Path, ckpt: dict, net, inference, images, labels, on_full_test_set: bool,
          max_batch_size: int, opset: int, fits: dict | None = None) -> tuple[RepositoryManifest, ParityReport]:
    """Write both graphs and their configs into tmp, verify them, then write manifest.json."""
    config = ckpt["config"]
    num_classes, embedding_dim = int(config.get("num_classes", 10)), int(config["embedding_dim"])
    paths = {fmt.kind: write_model(tmp, fmt, inference, opset, max_batch_size, num_classes, embedding_dim,
                                   config_parameters(fits)) for fmt in FORMATS}
    graph_facts = onnx_report(paths["onnx"])
    report = check_parity(net, inference, load_torchscript(paths["torchscript"]), load_onnx_session(paths["onnx"]),
                          images, labels, config["normalization"])
    recorded = (ckpt.get("metrics") or {}).get("test_acc")
    if on_full_test_set and recorded is not None:
        off = accuracy_mismatch(report.accuracy, recorded, config, len(images))
        if off:
            raise ExportError(f"exported accuracy {off} differs from the checkpoint's recorded {recorded:.2f}%")
    manifest = manifest_of(tmp, checkpoint, ckpt, paths, report, graph_facts, max_batch_size, fits)
    write_manifest(tmp, manifest)
    return manifest, report


def add_int8(tmp: Path, manifest: RepositoryManifest, calibration_images: torch.Tensor,
             calibration_labels: torch.Tensor, calibrated_on: dict, images: torch.Tensor, labels: torch.Tensor | None,
             log) -> RepositoryManifest:
    """REPO/lsoftmax_mnist_onnx_int8/{config.pbtxt, 1/model.onnx}: the verified FP32 ONNX graph quantised, its own
    temperature and threshold fitted on the held-out images the FP32 ones were (export.int8_fit), and checked
    against FP32 (export.quantize); config.pbtxt is the FP32 model's under its own name with its own fitted
    parameters. Listed in manifest.json (models, files) with its `int8` record and its model_calibration entry,
    which the server answers with. A broken bound fails the export."""
    fp32 = BY_KIND["onnx"]
    path = tmp / ONNX_INT8_MODEL / DEFAULT_VERSION / fp32.filename
    path.parent.mkdir(parents=True)
    fp32_fits = {key: manifest.records.get(key) or {} for key in ("calibration", "open_set")}
    try:
        record, own = build_int8(tmp / fp32.file(), path, calibration_images.numpy(), calibration_labels.numpy(),
                                 calibrated_on, images.numpy(), None if labels is None else labels.numpy(), fp32_fits)
    except Int8Error as exc:
        raise ExportError(str(exc)) from None
    config = read_config(tmp / fp32.directory / CONFIG_FILE)
    config.name = ONNX_INT8_MODEL
    for key, value in config_parameters(own).items():
        config.parameters[key].string_value = value
    write_config(tmp / ONNX_INT8_MODEL, config)
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != MANIFEST_FILE}
    spec = ModelSpec(backend=fp32.backend, file=path.relative_to(tmp).as_posix(), sha256=sha256_file(path))
    calibrations = {**(manifest.records.get(MODEL_CALIBRATION) or {}), ONNX_INT8_MODEL: own}
    manifest = dataclasses.replace(manifest, models={**manifest.models, ONNX_INT8_MODEL: spec}, files=files,
                                   records={**manifest.records, "int8": record, MODEL_CALIBRATION: calibrations})
    write_manifest(tmp, manifest)
    for line in int8_report(record, fp32_fits, own):
        log(line)
    return manifest


def int8_report(record: dict, fp32_fits: dict, own: dict) -> list[str]:
    """The export's lines on the INT8 model: its verification against FP32, and its own fit beside FP32's."""
    check = record["verification"]
    accuracy, accepted = check["accuracy"] or {}, check.get("accepted") or {}
    lines = [f"int8: {ONNX_INT8_MODEL} ({len(record['quantized_nodes'])} Conv nodes quantised) vs FP32 on "
             f"{check['images']} images: top-1 agreement {check['top1_agreement']:.2f}%, accuracy "
             + (f"{accuracy['fp32']:.2f}% -> {accuracy['int8']:.2f}%" if accuracy else "n/a")
             + f", embedding cosine mean {check['embedding_cosine_mean']:.5f} (min {check['embedding_cosine_min']:.4f})"
             + (f", max|dknown_score| {check['known_score_max_abs_diff']:.3g} (of {check['known_score_scale']:.3g})"
                if check["known_score_max_abs_diff"] is not None else "")]
    fp32_temperature, int8_temperature = fp32_fits["calibration"].get("temperature"), own["calibration"]["temperature"]
    line = (f"int8: own fit on the FP32 fit's held-out images: temperature {int8_temperature:.4g} "
            f"(FP32 {fp32_temperature:.4g})")
    if check["decision_agreement"] is not None:
        line += (f", known_score threshold {check['int8_threshold']:.6g} (FP32 {check['threshold']:.6g}) accepts "
                 f"{100 * own['open_set']['fit_accepted']:.2f}% of {own['open_set']['threshold_images']}; on the "
                 f"{check['images']} verification images accept/reject agrees with FP32 on "
                 f"{check['decision_agreement']:.2f}% at each model's own threshold "
                 f"({check['decision_agreement_at_fp32_threshold']:.2f}% at FP32's), digits accepted FP32 "
                 f"{accepted['fp32']:.2f}%, INT8 {accepted['int8']:.2f}%")
    return [*lines, line]
