"""Data-parallel helpers for `torchrun --nproc_per_node N -m training ...` (DDP; single process is a no-op).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 we join a process group (NCCL on
CUDA, gloo on CPU), wrap the net in DistributedDataParallel and sum the metric counters over ranks.
Only rank 0 fetches data, writes checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.devices import pick_device


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def device(self, choice: str) -> torch.device:
        return pick_device(choice, self.local_rank)


def setup(device_choice: str = "auto") -> DistEnv:
    """Join the process group torchrun describes; NCCL only when the run will use CUDA tensors
    (`--device cpu` on a GPU machine needs gloo, NCCL cannot reduce CPU tensors)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device_choice != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return env


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    if env.world_size <= 1:
        return model
    device_ids = [env.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def teardown() -> None:
    if is_active():
        dist.destroy_process_group()
