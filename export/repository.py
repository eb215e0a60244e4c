"""Checkpoint -> verified model repository in Triton's layout.

    REPO/lsoftmax_mnist_onnx/{config.pbtxt, 1/model.onnx}
    REPO/lsoftmax_mnist_torchscript/{config.pbtxt, 1/model.pt}
    REPO/manifest.json

Everything is built in a temporary folder beside REPO and renamed into place only after the parity
checks pass, so a failed export never leaves half a repository. The tree is world-readable (folders 0755,
files 0644, whatever the umask): the serving image reads it as another user. The format (names, backend
table, manifest.json structure, config.pbtxt as Triton's ModelConfig) is the server's: serving.repository_*.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from export.graphs import load_onnx_session, load_torchscript, onnx_report, write_onnx, write_torchscript
from export.inference_module import build_inference_module
from export.verify import ParityReport, check_parity
from serving.repository_config import model_config, write_config
from serving.repository_format import FORMATS, IMAGE_DIMS, MANIFEST_FORMAT, MODEL_PREFIX, ModelFormat
from serving.repository_manifest import InputSpec, ModelSpec, RepositoryManifest, TensorSpec, write_manifest
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


def _rebuild(checkpoint: Path) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """The checkpoint, its net, and the inference module (margin folded away, normalisation inside)."""
    ckpt = load_checkpoint(checkpoint)
    try:
        net = rebuild_model(ckpt)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ExportError(f"{checkpoint}: weights do not fit the net its config describes ({exc})") from None
    return ckpt, net, build_inference_module(net, ckpt["config"]["normalization"])


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


def _write_model(tmp: Path, fmt: ModelFormat, inference, opset: int, max_batch_size: int, num_classes: int,
                 embedding_dim: int) -> Path:
    """REPO/<model>/1/<file> and REPO/<model>/config.pbtxt; returns the model file."""
    path = tmp / fmt.file()
    path.parent.mkdir(parents=True)
    if fmt.kind == "onnx":
        write_onnx(inference, path, opset)
    else:
        write_torchscript(inference, path)
    write_config(tmp / fmt.directory, model_config(fmt, max_batch_size, num_classes, embedding_dim))
    return path


def _manifest(tmp: Path, checkpoint: Path, ckpt: dict, paths: dict[str, Path], report: ParityReport,
              graph_facts: dict, max_batch_size: int) -> RepositoryManifest:
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
        outputs=TensorSpec.outputs(num_classes, int(config["embedding_dim"])),
        models={fmt.directory: ModelSpec.of(fmt, sha256_file(paths[fmt.kind])) for fmt in FORMATS},
        files=files,
        records={"onnx": graph_facts, "parity": report.as_dict(),
                 "source_checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                                       "epoch": ckpt.get("epoch"), "train_args": config.get("train_args", {})},
                 "exporter": {**_versions(), "created_unix": int(time.time())}})


def _build(tmp: Path, checkpoint: Path, ckpt: dict, net, inference, images, labels, on_full_test_set: bool,
           max_batch_size: int, opset: int) -> tuple[RepositoryManifest, ParityReport]:
    """Write both graphs and their configs into tmp, verify them, then write manifest.json."""
    config = ckpt["config"]
    num_classes, embedding_dim = int(config.get("num_classes", 10)), int(config["embedding_dim"])
    paths = {fmt.kind: _write_model(tmp, fmt, inference, opset, max_batch_size, num_classes, embedding_dim)
             for fmt in FORMATS}
    graph_facts = onnx_report(paths["onnx"])
    report = check_parity(net, inference, load_torchscript(paths["torchscript"]), load_onnx_session(paths["onnx"]),
                          images, labels, config["normalization"])
    recorded = (ckpt.get("metrics") or {}).get("test_acc")
    if on_full_test_set and recorded is not None:
        off = accuracy_mismatch(report.accuracy, recorded, config, len(images))
        if off:
            raise ExportError(f"exported accuracy {off} differs from the checkpoint's recorded {recorded:.2f}%")
    manifest = _manifest(tmp, checkpoint, ckpt, paths, report, graph_facts, max_batch_size)
    write_manifest(tmp, manifest)
    return manifest, report


def export_repository(checkpoint: str | Path, out: str | Path, force: bool = False,
                      images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      max_batch_size: int = 256, opset: int = 17, data_dir=None, cache_dir=None,
                      log=print) -> dict:
    """Export, verify and lay out a repository; returns the manifest (with the parity report).

    images/labels: uint8 [N, 1, 28, 28] / int64 [N] to verify on; default: the full MNIST test set.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _prepare_out(out, force)
    ckpt, net, inference = _rebuild(checkpoint)
    images, labels, on_full_test_set = _verification_set(images, labels, ckpt["config"], data_dir, cache_dir)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest, report = _build(tmp, checkpoint, ckpt, net, inference, images, labels, on_full_test_set,
                                  max_batch_size, opset)
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
