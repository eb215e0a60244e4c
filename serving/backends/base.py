"""The backend interface: uint8 images [N, 1, 28, 28] in, (logits [N, C], embedding [N, D]) float32 out.

A backend owns one loaded graph on one device. `infer` is synchronous and thread-safe; the server calls it
from a worker thread, never on the event loop. `resolve_device` turns --device auto|cpu|cuda into what
will actually be used.
"""

from __future__ import annotations

import abc

import numpy as np

from serving.errors import StartupError
from serving.repository_format import IMAGE_DIMS

__all__ = ["Backend", "resolve_device", "cuda_available", "DEVICES"]

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """True when PyTorch sees a usable NVIDIA GPU (the one test for 'a GPU is present')."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(requested: str) -> str:
    """auto → "cuda" when a GPU is present, else "cpu"; an explicit "cuda" without a GPU is a StartupError."""
    if requested not in DEVICES:
        raise StartupError(f"unknown device {requested!r}; choose from {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        raise StartupError("--device cuda was requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    return "cpu"


class Backend(abc.ABC):
    """One loaded model. Subclasses set `kind`, `device` and (ONNX Runtime) `providers` when loading."""

    kind: str = ""
    device: str = "cpu"
    providers: tuple[str, ...] = ()

    @abc.abstractmethod
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 1, 28, 28] → (logits float32 [N, C], embedding float32 [N, D])."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 3) -> tuple[int, int]:
        """Run each batch size a few times (lazy allocations, kernel selection, TorchScript's profiling
        runs) and check the output shapes; returns (num_classes, embedding_dim) as the graph reports them."""
        classes = dim = -1
        for n in batch_sizes:
            for _ in range(repeats):
                logits, embedding = self.infer(np.zeros((n, *IMAGE_DIMS), np.uint8))
            if logits.ndim != 2 or embedding.ndim != 2 or logits.shape[0] != n or embedding.shape[0] != n:
                raise StartupError(f"{self.kind} model returned logits {tuple(logits.shape)} and embedding "
                                   f"{tuple(embedding.shape)} for a batch of {n}; expected [N, C] and [N, D]")
            classes, dim = logits.shape[1], embedding.shape[1]
        return classes, dim

    def close(self) -> None:
        """Release the model (the process is about to exit or load another)."""
