"""Outlier exposure for L-Softmax: the training negatives' loss and the stream of them beside the digits' batches.

A negative belongs to no class, so it gets no margin term: its logits are the plain W.x the served graph computes,
and its target is the uniform distribution over the classes (Hendrycks et al. 2019's outlier exposure; Dhamija et
al. 2018's entropic open-set loss), added to the digits' L-Softmax loss with a weight:

    loss = CE(margin logits of the digits, labels) + weight * mean_negatives(logsumexp(z) - mean(z) - log C)

(logsumexp(z) - mean(z) is the cross-entropy of softmax(z) against the uniform target; less log C it is the KL
divergence from the uniform distribution: 0 exactly when every logit is equal, the same gradient.) How it was chosen and what it buys: docs/open_set.md.
"""

from __future__ import annotations

import math
import time

import torch

from training.data import normalize

__all__ = ["uniform_target_loss", "NegativeStream", "negative_stream", "pool_size", "POOL_MAX"]

POOL_MAX = 20000  # images generated per run: about one epoch's worth at the default ratio


def uniform_target_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean KL divergence of the uniform distribution over the classes from softmax(logits): 0 when all logits
    are equal (and for no rows)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logits = logits.float()
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean() - math.log(logits.shape[1])


def pool_size(batches_per_epoch: int, per_batch: int) -> int:
    """How many negatives to generate: one epoch's worth, at most POOL_MAX (later epochs see them again, in
    another order)."""
    return min(POOL_MAX, batches_per_epoch * per_batch)


class NegativeStream:
    """per_batch normalised negatives per training step, in an order that depends only on (seed, epoch), so a
    resumed run sees the same ones as an unbroken run; with several processes each rank takes its own share."""

    def __init__(self, pool: torch.Tensor, per_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if per_batch < 1 or len(pool) < per_batch:
            raise ValueError(f"a pool of {len(pool)} negatives cannot give {per_batch} per batch")
        self.pool, self.per_batch, self.seed = pool, per_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def batches(self):
        """An endless iterator of normalised float batches [per_batch, 1, 28, 28] on the pool's device."""
        n = len(self.pool)
        cycle = 0
        while True:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch * 1_009 + cycle)
            order = torch.randperm(n, generator=gen)[self.rank::self.world_size].to(self.pool.device)
            for b in range(len(order) // self.per_batch):
                yield normalize(self.pool[order[b * self.per_batch:(b + 1) * self.per_batch]])
            cycle += 1


def negative_stream(args, train_x, train_y, batches_per_epoch: int, dist_env, on: torch.device,
                    is_main: bool) -> tuple[NegativeStream, dict]:
    """The training negatives (made from this run's training digits only, never the held-out or test ones),
    per_batch of them beside each batch, and what the checkpoint records of them."""
    from training.negatives import FAMILIES, negative_images

    if args.negative_ratio <= 0:
        raise ValueError(f"--negative-ratio must be > 0 with --negatives on, got {args.negative_ratio}")
    per_batch = max(1, round(args.batch_size // dist_env.world_size * args.negative_ratio))
    count = pool_size(batches_per_epoch, per_batch * dist_env.world_size)
    started = time.perf_counter()
    pool = torch.from_numpy(negative_images(count, args.seed, train_x.numpy(), train_y.numpy()))
    if is_main:
        print(f"made {count} training negatives in {time.perf_counter() - started:.1f}s ({per_batch} beside each "
              f"batch, loss weight {args.negative_weight})", flush=True)
    record = {"generator": "training.negatives", "count": count, "seed": args.seed, "families": FAMILIES,
              "per_batch": per_batch, "weight": args.negative_weight, "loss": "uniform target on the plain logits"}
    return NegativeStream(pool.to(on), per_batch, args.seed, dist_env.rank, dist_env.world_size), record
