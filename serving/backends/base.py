"""The backend interface: uint8 images [N, 1, 28, 28] in, (logits [N, C], embedding [N, D][, known_score [N]]) float32 out.

A backend owns one loaded graph on one device. `infer` is synchronous and thread-safe; the server calls it
from a worker thread, never on the event loop. serving.backends.devices turns --device auto|cpu|cuda into
what will actually be used.
"""

from __future__ import annotations

import abc

import numpy as np

from serving.core.errors import StartupError
from serving.repository.format import IMAGE_DIMS

__all__ = ["Backend"]


class Backend(abc.ABC):
    """One loaded model. Subclasses set `kind`, `device` and (ONNX Runtime) `providers` when loading."""

    kind: str = ""
    device: str = "cpu"
    providers: tuple[str, ...] = ()
    has_known_score: bool = False  # the graph returns known_score third (newer repositories); set on load/warmup

    @abc.abstractmethod
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [N, 1, 28, 28] → (logits float32 [N, C], embedding float32 [N, D][, known_score float32 [N]])."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 3) -> tuple[int, int]:
        """Run each batch size a few times (lazy allocations, kernel selection, TorchScript's profiling
        runs) and check the output shapes; returns (num_classes, embedding_dim) as the graph reports them."""
        classes = dim = -1
        for n in batch_sizes:
            for _ in range(repeats):
                outputs = self.infer(np.zeros((n, *IMAGE_DIMS), np.uint8))
                self.has_known_score = len(outputs) > 2
            logits, embedding = outputs[:2]
            if len(outputs) > 2 and tuple(outputs[2].shape) != (n,):
                raise StartupError(f"{self.kind} model returned known_score {tuple(outputs[2].shape)} for a batch of "
                                   f"{n}; expected [N]")
            if logits.ndim != 2 or embedding.ndim != 2 or logits.shape[0] != n or embedding.shape[0] != n:
                raise StartupError(f"{self.kind} model returned logits {tuple(logits.shape)} and embedding "
                                   f"{tuple(embedding.shape)} for a batch of {n}; expected [N, C] and [N, D]")
            classes, dim = logits.shape[1], embedding.shape[1]
        if not self.has_known_score:
            import logging

            from serving.logs import log_event

            log_event(logging.getLogger("serving.backends"), logging.WARNING, "no_known_score", backend=self.kind,
                      detail="the graph has no known_score output (exported before the open-set score): nothing is rejected as "
                             "not a digit and probabilities are uncalibrated; re-export the repository")
        return classes, dim

    def close(self) -> None:
        """Release the model (the process is about to exit or load another)."""
