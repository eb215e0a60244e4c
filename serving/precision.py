"""Which ONNX model the typed API serves, by precision (--precision auto|fp32|int8).

Under auto, a repository exported with `--int8` is served as INT8 where ONNX Runtime runs on the CPU (more images
per CPU-second at FP32's accuracy, with its own temperature and threshold: BENCHMARKS.md, "INT8 by default (issue
23)") and as FP32 on CUDA (where the quantisation was made and measured for the CPU's kernels only); a repository
without the INT8 model serves FP32 as before. fp32 and int8 force either (int8 on CUDA too); --model names a model
outright and --backend torchscript has only FP32. KServe serves every model of the repository by name whatever
this says.
"""

from __future__ import annotations

from serving.backends.devices import module_available, resolve_device
from serving.core.errors import StartupError, UsageError
from serving.repository.format import MANIFEST_FILE, ONNX_INT8_MODEL, precision_of
from serving.repository.reader import Manifest, ModelEntry

__all__ = ["PRECISION_CHOICES", "INT8_MAX_BATCH_SIZE", "onnx_device", "choose_precision", "default_max_batch_size"]

PRECISION_CHOICES = ("auto", "fp32", "int8")
CUDA_PROVIDER = "CUDAExecutionProvider"
# The INT8 model's backend batches when --max-batch-size is not given: its images per second on one CPU core fall
# past 32 (the demo model, one interleaved run: 4,791 at 32, 4,396 at 64, 2,981 at 256; FP32's 2,035 / 1,984 /
# 1,732), so larger requests and batches are split into calls of 32: 2.2x FP32's images per server CPU-second over
# the test set (1.55x without the split, on the digits-only model; BENCHMARKS.md, "INT8 by default").
INT8_MAX_BATCH_SIZE = 32


def onnx_device(requested_device: str) -> str:
    """"cuda" when ONNX Runtime would run on the GPU (the driver reports one and this onnxruntime build has the
    CUDA provider), else "cpu": the same decision serving.backends.ort makes when it loads the model."""
    if resolve_device(requested_device) != "cuda":
        return "cpu"
    if not module_available("onnxruntime"):
        return "cpu"
    import onnxruntime

    return "cuda" if CUDA_PROVIDER in onnxruntime.get_available_providers() else "cpu"


def choose_precision(requested: str, manifest: Manifest, model: str | None, backend: str | None,
                     requested_device: str) -> str | None:
    """The precision Manifest.select should pick the typed model by, or None when --model or a non-ONNX
    --backend decides it; UsageError when the flags contradict each other, StartupError when the repository
    lacks the INT8 model --precision int8 asks for."""
    if requested not in PRECISION_CHOICES:
        raise UsageError(f"unknown precision {requested!r}; choose from {', '.join(PRECISION_CHOICES)}")
    if model is not None:
        if requested != "auto" and precision_of(model) != requested:
            raise UsageError(f"--model {model} is an {precision_of(model).upper()} model but --precision "
                             f"{requested} was given")
        return None
    if backend not in (None, "onnx"):
        if requested == "int8":
            raise UsageError(f"--precision int8: the INT8 model is ONNX ({ONNX_INT8_MODEL}); --backend {backend} "
                             "has only FP32")
        return None
    onnx_precisions = {entry.precision for entry in manifest.models.values() if entry.kind == "onnx"}
    if requested == "int8" and "int8" not in onnx_precisions:
        raise StartupError(f"--precision int8: {manifest.root / MANIFEST_FILE} has no INT8 model "
                           f"({ONNX_INT8_MODEL}); export with `python -m export CHECKPOINT --out REPO --int8`, "
                           "or serve with --precision auto or fp32")
    if requested != "auto":
        return requested
    if "int8" in onnx_precisions and ("fp32" not in onnx_precisions or onnx_device(requested_device) == "cpu"):
        return "int8"
    return "fp32" if "fp32" in onnx_precisions else None


def default_max_batch_size(entry: ModelEntry, config_max_batch_size: int) -> int:
    """The most images per backend call without --max-batch-size: the model's config.pbtxt max_batch_size, at most
    INT8_MAX_BATCH_SIZE for the INT8 model."""
    if entry.precision == "int8":
        return min(config_max_batch_size, INT8_MAX_BATCH_SIZE)
    return config_max_batch_size
