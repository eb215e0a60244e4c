"""The lr and beta schedules of a training run, built from its flags and its length in iterations."""

from __future__ import annotations

import torch

from training.lsoftmax import build_beta_schedule
from training.options import CAFFE_GAMMA, MOMENTUM_SWING, PAPER_ITERATIONS

__all__ = ["build_lr_scheduler", "build_beta", "resume_lr_scheduler"]


def build_lr_scheduler(args, optimizer, total_iters: int, start_iteration: int = 0):
    """The lr schedule, stepped once per iteration. start_iteration (one-cycle only): continue the cycle for
    total_iters at that iteration, as a resumed run whose length changed does; the optimizer must already hold
    the cycle's lr and momentum bounds in its param groups, as it does after loading its saved state."""
    if args.lr_schedule == "multistep":
        try:
            milestones = [int(m) for m in str(args.milestones).split(",") if m.strip()]
        except ValueError:
            raise ValueError(f"--milestones {args.milestones!r}: expected comma-separated iteration counts") from None
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    if args.lr_schedule == "onecycle":
        # OneCycleLR divides by (pct_start * total_steps - 1): zero when the warm-up is exactly one step,
        # which a 4-iteration run hits (pytorch/pytorch#180187); lengthen the warm-up a little there.
        pct_start = 0.25 if 0.25 * total_iters != 1 else 1.5 / total_iters
        # One-cycle also cycles momentum (low while lr is high); centre that cycle on --momentum, which
        # OneCycleLR would otherwise replace by its fixed 0.85..0.95 (the same cycle at the default 0.9).
        low, high = max(args.momentum - MOMENTUM_SWING, 0.0), min(args.momentum + MOMENTUM_SWING, 0.999)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_iters,
                                                   pct_start=pct_start, div_factor=20.0, final_div_factor=200.0,
                                                   cycle_momentum=args.momentum > 0, base_momentum=low,
                                                   max_momentum=high, last_epoch=start_iteration - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def build_beta(args, head, total_iters: int):
    if args.beta_schedule == "caffe":
        gamma = args.beta_gamma if args.beta_gamma is not None else CAFFE_GAMMA * PAPER_ITERATIONS / total_iters
        return build_beta_schedule("caffe", head, base=args.beta_base, gamma=gamma, power=args.beta_power,
                                   beta_min=args.beta_min)
    if args.beta_schedule == "exp":
        return build_beta_schedule("exp", head, start=args.beta_start, factor=args.beta_decay,
                                   beta_min=args.beta_min)
    return build_beta_schedule("constant", head, value=args.beta_base)


def resume_lr_scheduler(args, optimizer, scheduler, state: dict, total_iters: int):
    """The saved lr schedule. One-cycle is sized by the run's total iterations: when --epochs changed that
    total, the new total's cycle is built instead and fast-forwarded to the iteration reached (call this after
    loading the optimizer's state, which holds the cycle's bounds). The others depend on the iteration only."""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and state.get("total_steps") != total_iters:
        return build_lr_scheduler(args, optimizer, total_iters, start_iteration=int(state["last_epoch"]))
    scheduler.load_state_dict(state)
    return scheduler
