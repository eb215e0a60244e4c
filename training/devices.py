"""The one place a --device choice (auto, cpu, cuda) becomes a torch.device, for single- and multi-process runs."""

from __future__ import annotations

import torch

__all__ = ["pick_device"]


def pick_device(choice: str, local_rank: int | None = None) -> torch.device:
    """auto: CUDA when available, else the CPU; cuda without a GPU is a ValueError. local_rank (DDP): the GPU of
    this process, made the current one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank is None:
        return torch.device("cuda")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
