"""Model backends (TorchScript, ONNX Runtime) behind one interface, and `load_backend` to pick one.

    backend = load_backend("onnx", "REPO/lsoftmax_mnist_onnx/1/model.onnx", requested_device="auto")
    logits, embedding = backend.infer(uint8_images)   # [N,1,28,28] → [N,10], [N,D]
"""

from __future__ import annotations

from pathlib import Path

from serving.backends.base import DEVICES, Backend, cuda_available, resolve_device
from serving.errors import StartupError

__all__ = ["Backend", "BACKENDS", "DEVICES", "cuda_available", "load_backend", "resolve_device"]

# CLI name → the backend string Triton's config.pbtxt and our manifest use.
BACKENDS = {"onnx": "onnxruntime", "torchscript": "pytorch"}


def load_backend(kind: str, path: str | Path, requested_device: str = "auto") -> Backend:
    """kind: "onnx" or "torchscript" (or the manifest's "onnxruntime" / "pytorch")."""
    device = resolve_device(requested_device)
    if kind in ("onnx", "onnxruntime"):
        from serving.backends.ort import OrtBackend

        return OrtBackend(path, device, strict=requested_device == "cuda")
    if kind in ("torchscript", "pytorch"):
        from serving.backends.torchscript import TorchScriptBackend

        return TorchScriptBackend(path, device)
    raise StartupError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
