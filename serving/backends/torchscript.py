"""TorchScript backend: `torch.jit.load` of the repository's model.pt, run under inference mode.

The exported module's forward(image uint8 [N, 1, 28, 28]) returns the tuple (logits, embedding, known_score)
(older repositories: (logits, embedding)).
TorchScript is deprecated upstream but is what the repository ships (and what Triton's pytorch backend
loads), so torch.jit.load's FutureWarning is silenced at load time.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from serving.backends.base import Backend
from serving.core.errors import StartupError
from serving.logs import log_event
from serving.repository.format import BY_KIND

__all__ = ["TorchScriptBackend"]

logger = logging.getLogger("serving.backends.torchscript")


class TorchScriptBackend(Backend):
    kind = BY_KIND["torchscript"].kind  # "torchscript", as GetModelInfo reports it

    def __init__(self, path: str | Path, device: str = "cpu", strict: bool = False,
                 intra_op_threads: int | None = None) -> None:
        """device: "cuda" or "cpu" as resolved from the driver; strict: fail (instead of falling back to the CPU)
        when CUDA was asked for explicitly but this torch cannot use it; intra_op_threads: torch.set_num_threads
        (process-wide; None leaves torch's default, one per core)."""
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            if strict:
                raise StartupError(f"--device cuda: this torch build ({torch.__version__}) cannot use the GPU "
                                   "(torch.cuda.is_available() is False)")
            log_event(logger, logging.WARNING, "torch_cuda_unavailable", fallback="cpu", torch=torch.__version__)
            device = "cpu"

        if intra_op_threads is not None:
            torch.set_num_threads(intra_op_threads)
        self.intra_op_threads = torch.get_num_threads()

        self._torch = torch
        self._device = torch.device("cuda:0" if device == "cuda" else "cpu")
        self.device = str(self._device)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
                self._module = torch.jit.load(str(path), map_location=self._device).eval()
        except Exception as exc:
            raise StartupError(f"{path}: cannot load TorchScript module ({str(exc).strip().splitlines()[0]})") from exc

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        torch = self._torch
        if not images.flags.writeable:  # torch.from_numpy warns on read-only buffers
            images = images.copy()
        with torch.inference_mode():
            out = self._module(torch.from_numpy(images).to(self._device))
            if not (isinstance(out, (tuple, list)) and len(out) in (2, 3)):
                raise RuntimeError(f"TorchScript forward returned {type(out).__name__}; expected (logits, embedding"
                                   "[, known_score])")
            self.has_known_score = len(out) == 3
            return tuple(t.float().cpu().numpy() for t in out)

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
