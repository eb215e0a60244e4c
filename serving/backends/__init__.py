"""Model backends (TorchScript, ONNX Runtime) behind one interface, and `load_backend` to pick one.

    backend = load_backend("onnx", "REPO/lsoftmax_mnist_onnx/1/model.onnx", requested_device="auto",
                           input_name=manifest.input_name)
    logits, embedding = backend.infer(uint8_images)   # [N,1,28,28] → [N,10], [N,D]
"""

from __future__ import annotations

from pathlib import Path

from serving.backends.base import Backend
from serving.backends.devices import DEVICES, cuda_device_count, module_available, resolve_device
from serving.core.errors import StartupError
from serving.repository.format import FORMATS, INPUT, format_named

__all__ = ["Backend", "BACKENDS", "DEVICES", "REQUIRED_MODULE", "backend_available", "cuda_device_count",
           "load_backend", "resolve_device"]

# CLI name → the backend string Triton's config.pbtxt and our manifest use (serving.repository.format's table).
BACKENDS = {f.kind: f.backend for f in FORMATS}
# CLI name → the package its backend imports; the serving image ships onnxruntime only (requirements-serving.txt),
# torch comes with requirements-serving-torchscript.txt.
REQUIRED_MODULE = {"onnx": "onnxruntime", "torchscript": "torch"}


def backend_available(kind: str) -> bool:
    """Whether this installation can load models of `kind` ("onnx" / "torchscript"), checked without importing."""
    return module_available(REQUIRED_MODULE[format_named(kind).kind])


def load_backend(kind: str, path: str | Path, requested_device: str = "auto", input_name: str = INPUT,
                 intra_op_threads: int | None = None) -> Backend:
    """kind: "onnx" or "torchscript" (or the manifest's "onnxruntime" / "pytorch"); input_name: the graph input
    the images are fed to (the manifest's input.name; TorchScript's forward takes them by position);
    intra_op_threads: threads one backend call may use (--intra-op-threads; None: the library's default)."""
    device = resolve_device(requested_device)
    try:
        kind = format_named(kind).kind
    except KeyError:
        raise StartupError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}") from None
    if kind == "onnx":
        from serving.backends.ort import OrtBackend

        return OrtBackend(path, device, strict=requested_device == "cuda", input_name=input_name,
                          intra_op_threads=intra_op_threads)
    from serving.backends.torchscript import TorchScriptBackend  # the table's other format

    return TorchScriptBackend(path, device, strict=requested_device == "cuda", intra_op_threads=intra_op_threads)
