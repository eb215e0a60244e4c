"""Checkpoint -> verified model repository in Triton's layout.

    REPO/lsoftmax_mnist_onnx/{config.pbtxt, 1/model.onnx}
    REPO/lsoftmax_mnist_torchscript/{config.pbtxt, 1/model.pt}
    REPO/manifest.json

Everything is built in a temporary folder beside REPO and renamed into place only after the parity
checks pass, so a failed export never leaves half a repository. The tree is world-readable (folders 0755,
files 0644, whatever the umask): the serving image reads it as another user.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from export.graphs import (INPUT_NAME, OUTPUT_NAMES, load_onnx_session, load_torchscript, onnx_report,
                           write_onnx, write_torchscript)
from export.inference_module import build_inference_module
from export.verify import check_parity
from training.checkpoint import fsync_dir, load_checkpoint, rebuild_model
from training.data import sha256_file

__all__ = ["MODEL_PREFIX", "MANIFEST_FORMAT", "ExportError", "export_repository", "config_pbtxt", "sha256_file"]

MODEL_PREFIX = "lsoftmax_mnist"
MANIFEST_FORMAT = "lsoftmax-serve/model-repository"
# (directory suffix, Triton backend, file name, writer)
FORMATS = (
    ("onnx", "onnxruntime", "model.onnx", "onnx"),
    ("torchscript", "pytorch", "model.pt", "torchscript"),
)


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


def config_pbtxt(name: str, backend: str, max_batch_size: int, num_classes: int, embedding_dim: int,
                 preferred_batch_sizes=(8, 32, 64)) -> str:
    """Triton ModelConfig in text format. max_batch_size > 0, so dims exclude the batch axis."""
    preferred = ", ".join(str(b) for b in preferred_batch_sizes if b <= max_batch_size)
    return (
        f'name: "{name}"\n'
        f'backend: "{backend}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f'input [\n  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_UINT8\n    dims: [ 1, 28, 28 ]\n  }}\n]\n'
        f"output [\n"
        f'  {{\n    name: "{OUTPUT_NAMES[0]}"\n    data_type: TYPE_FP32\n    dims: [ {num_classes} ]\n  }},\n'
        f'  {{\n    name: "{OUTPUT_NAMES[1]}"\n    data_type: TYPE_FP32\n    dims: [ {embedding_dim} ]\n  }}\n'
        f"]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n  max_queue_delay_microseconds: 200\n}}\n"
        f"instance_group [\n  {{\n    kind: KIND_AUTO\n    count: 1\n  }}\n]\n"
    )


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


def export_repository(checkpoint: str | Path, out: str | Path, force: bool = False,
                      images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      max_batch_size: int = 256, opset: int = 17, data_dir=None, cache_dir=None,
                      log=print) -> dict:
    """Export, verify and lay out a repository; returns the manifest (with the parity report).

    images/labels: uint8 [N, 1, 28, 28] / int64 [N] to verify on; default: the full MNIST test set.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _prepare_out(out, force)
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    try:
        net = rebuild_model(ckpt)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ExportError(f"{checkpoint}: weights do not fit the net its config describes ({exc})") from None
    normalization = config["normalization"]
    inference = build_inference_module(net, normalization)

    on_full_test_set = images is None and not config.get("train_args", {}).get("test_subset")
    if images is None:
        from training.data import load_split, prepare_mnist

        images, labels = load_split(prepare_mnist(data_dir, cache_dir=cache_dir), train=False)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ExportError(f"verification images must be uint8 [N, 1, 28, 28], got {images.dtype} {list(images.shape)}")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        paths = {}
        for suffix, backend, filename, kind in FORMATS:
            name = f"{MODEL_PREFIX}_{suffix}"
            (tmp / name / "1").mkdir(parents=True)
            path = tmp / name / "1" / filename
            if kind == "onnx":
                write_onnx(inference, path, opset)
            else:
                write_torchscript(inference, path)
            (tmp / name / "config.pbtxt").write_text(
                config_pbtxt(name, backend, max_batch_size, int(config.get("num_classes", 10)),
                             int(config["embedding_dim"])))
            paths[kind] = path
        graph_facts = onnx_report(paths["onnx"])
        report = check_parity(net, inference, load_torchscript(paths["torchscript"]),
                              load_onnx_session(paths["onnx"]), images, labels, normalization)
        recorded = (ckpt.get("metrics") or {}).get("test_acc")
        if on_full_test_set and recorded is not None:
            off = accuracy_mismatch(report.accuracy, recorded, config, len(images))
            if off:
                raise ExportError(f"exported accuracy {off} differs from the checkpoint's recorded {recorded:.2f}%")
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "model_name_prefix": MODEL_PREFIX,
            "net": config["model"],
            "margin": int(config["margin"]),
            "num_classes": int(config.get("num_classes", 10)),
            "embedding_dim": int(config["embedding_dim"]),
            "test_accuracy": recorded,
            "verified_accuracy": report.accuracy,
            "max_batch_size": max_batch_size,
            "input": {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 1, 28, 28],
                      "polarity": config.get("input", {}).get("polarity", "white digit on black (MNIST)"),
                      "normalization": {"scale": float(normalization.get("scale", 1 / 255)),
                                        "mean": float(normalization["mean"]), "std": float(normalization["std"])}},
            "outputs": [{"name": OUTPUT_NAMES[0], "datatype": "FP32", "shape": [-1, int(config.get("num_classes", 10))]},
                        {"name": OUTPUT_NAMES[1], "datatype": "FP32", "shape": [-1, int(config["embedding_dim"])]}],
            "models": {},
            "files": {},
            "onnx": graph_facts,
            "parity": report.as_dict(),
            "source_checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                                  "epoch": ckpt.get("epoch"), "train_args": config.get("train_args", {})},
            "exporter": {**_versions(), "created_unix": int(time.time())},
        }
        for suffix, backend, filename, kind in FORMATS:
            name = f"{MODEL_PREFIX}_{suffix}"
            rel = f"{name}/1/{filename}"
            manifest["models"][name] = {"backend": backend, "file": rel, "sha256": sha256_file(paths[kind])}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            manifest["files"][path.relative_to(tmp).as_posix()] = sha256_file(path)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in report.lines():
        log(line)
    if recorded is not None and report.accuracy:
        log(f"checkpoint's recorded test accuracy {recorded:.2f}%; exported graphs "
            + ", ".join(f"{k} {v:.2f}%" for k, v in report.accuracy.items()))
    log(f"wrote {out} ({time.perf_counter() - started:.1f}s)")
    return manifest
