"""Train an L-Softmax net on MNIST and write self-describing checkpoints and per-epoch metrics.

    python -m training --model fast --margin 4 --epochs 2 --out runs/f4
    python -m training --model paper --margin 4 --out runs/p4          # the paper's recipe (18k iterations)
    python -m training --out runs/f4 --resume                           # continue from runs/f4/last.pt
    python -m training --out runs/f4 --resume --epochs 4                # extend it to 4 epochs

Writes DIR/last.pt and DIR/best.pt (atomically, each loadable with torch.load(weights_only=True)),
DIR/metrics.jsonl (one JSON object per epoch) and, with --vis, DIR/features.png.
Reported accuracy is the final epoch's test accuracy. best.pt is picked on a validation split carved
from the training set (--val-size, by default the last 5000 MNIST training images; the checkpoint's
config["held_out"] records which, and export fits calibration and the open-set threshold on them); without one it is the final epoch, because picking an
epoch on the test set and reporting its test accuracy would overstate the result.

--resume continues DIR/last.pt with the run's own flags, saved in the checkpoint: a flag given again must
repeat the saved value (a different one is an error), except how-to-run flags (--device, --progress, the
data paths, --vis) and --epochs. --epochs N sets the run's new length (not below the epochs done): the
schedules sized by the run's total iterations, one-cycle lr and the caffe beta curve with its default gamma,
are rebuilt for N epochs and continue at the iteration reached, so the remaining epochs follow the curves of
an unbroken N-epoch run (lr and beta jump there from the shorter run's end values); multistep milestones,
constant lr, exp/constant beta and an explicit --beta-gamma depend on the iteration only and just go on.
Resuming a finished run without a larger --epochs does nothing (exit status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import distributed
from training.augment import capture_like
from training.checkpoint import CheckpointError, save_checkpoint
from training.data import MNIST_MEAN, MNIST_STD, Batches, DataError, load_split, prepare_mnist
from training.devices import pick_device
from training.models import build_model, embedding_dim
from training.options import explicit_flags, get_args_parser, resolve_args, resolve_val_size
from training.outlier_exposure import NegativeStream, negative_stream, uniform_target_loss
from training.resume import load_resume, truncate_metrics
from training.schedules import build_beta, build_lr_scheduler, resume_lr_scheduler

__all__ = ["get_args_parser", "explicit_flags", "run", "main", "train_one_epoch", "evaluate"]

FINITE_CHECK_EVERY = 50  # iterations between checks that the training loss is still finite


def _autocast(device: torch.device, enabled: bool):
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_finite(totals: torch.Tensor, iteration: int, desc: str, optimizer, beta_schedule) -> None:
    if not math.isfinite(totals[0].item()):
        raise FloatingPointError(f"training loss became non-finite by iteration {iteration} of {desc} "
                                 f"(beta={beta_schedule.current:.4g}, lr={optimizer.param_groups[0]['lr']:.4g})")


def train_one_epoch(model, batches, optimizer, lr_scheduler, beta_schedule, device, amp: bool,
                    progress: bool, desc: str, channels_last: bool = False, negatives=None,
                    negative_weight: float = 0.0, augment=None) -> dict:
    """One pass over `batches`; lr and beta step once per iteration. Returns loss and accuracy
    measured on the margin logits (what the optimiser sees), summed over all ranks. negatives: an iterator of
    normalised non-digit batches put after each batch's digits (training.outlier_exposure), their uniform-target
    loss weighted by negative_weight. augment: normalised batch -> normalised batch, applied to digits and
    negatives together (training.augment)."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    iteration = 0
    for iteration, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        known = labels.shape[0]
        if negatives is not None:
            images = torch.cat([images, next(negatives).to(device, non_blocking=True)])
        if augment is not None:
            images = augment(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(images, labels)  # rows past the labels: negatives, plain logits
        loss = F.cross_entropy(logits[:known].float(), labels)
        if negatives is not None:
            loss = loss + negative_weight * uniform_target_loss(logits[known:])
        logits = logits[:known]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        beta_schedule.step()
        n = labels.numel()
        totals[0] += loss.detach().double() * n
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += n
        # Reading a CUDA value waits for the GPU; checking every step would keep the CPU from queueing
        # work ahead, so divergence is caught within FINITE_CHECK_EVERY iterations instead (the sum of
        # losses stays non-finite once any loss is).
        if iteration % FINITE_CHECK_EVERY == 0:
            _check_finite(totals, iteration, desc, optimizer, beta_schedule)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", beta=f"{beta_schedule.current:.3g}")
    if iteration % FINITE_CHECK_EVERY:
        _check_finite(totals, iteration, desc, optimizer, beta_schedule)
    distributed.all_reduce_sum(totals)
    loss_sum, correct, count = totals.tolist()
    return {"loss": loss_sum / max(count, 1), "acc": 100.0 * correct / max(count, 1)}


@contextlib.contextmanager
def _exact_float32(device: torch.device):
    """cuDNN convolutions in true float32 (not TF32) on CUDA, so a score matches the CPU's to an image or so."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def evaluate(model, batches, device, channels_last: bool = False) -> dict:
    """Plain-logit (margin-free) cross-entropy and top-1 accuracy, in float32 (no autocast, no TF32) even
    when training runs under bf16: the exported float32 graphs must reproduce this figure."""
    model.eval()
    loss_sum = correct = count = 0.0
    with _exact_float32(device):
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += labels.numel()
    return {"loss": loss_sum / max(count, 1), "acc": 100.0 * correct / max(count, 1)}


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output directory {out} is not writable ({exc.strerror or exc})") from None


@dataclass
class _Data:
    train: Batches
    test: Batches
    val: Batches | None
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_count: int
    held_out: dict | None = None
    negatives: NegativeStream | None = None
    negatives_record: dict | None = None


def _load_data(args, dist_env: distributed.DistEnv, device: torch.device, is_main: bool) -> _Data:
    """MNIST (fetched once, by rank 0), split into train / optional validation (the last --val-size training
    images) / test, as batches on the training device (CUDA) or the CPU."""
    root = prepare_mnist(args.data_dir, args.data_source, args.cache_dir) if is_main or args.data_dir else None
    distributed.barrier()
    if root is None:
        root = prepare_mnist(args.data_dir, args.data_source, args.cache_dir)
    train_x, train_y = load_split(root, train=True)
    test_x, test_y = load_split(root, train=False)
    val_x = val_y = None
    args.val_size = resolve_val_size(args.val_size, len(train_y))  # "auto" -> a number, saved as such
    held_out = None
    if args.val_size:
        if args.val_size >= len(train_y):
            raise ValueError(f"--val-size {args.val_size} leaves no training images")
        val_x, val_y = train_x[-args.val_size:], train_y[-args.val_size:]
        train_x, train_y = train_x[:-args.val_size], train_y[:-args.val_size]
        held_out = held_out_record(val_x, val_y, len(train_y))
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[:args.test_subset], test_y[:args.test_subset]
    on = device if device.type == "cuda" else torch.device("cpu")
    if args.batch_size % dist_env.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) is not divisible by {dist_env.world_size} processes")
    train = Batches(train_x.to(on), train_y.to(on), args.batch_size // dist_env.world_size, shuffle=True,
                    seed=args.seed, rank=dist_env.rank, world_size=dist_env.world_size)
    val = Batches(val_x.to(on), val_y.to(on), args.eval_batch_size) if args.val_size else None
    data = _Data(train, Batches(test_x.to(on), test_y.to(on), args.eval_batch_size), val, test_x, test_y,
                 len(train_y), held_out)
    if args.negatives == "on":
        data.negatives, data.negatives_record = negative_stream(args, train_x, train_y, len(train), dist_env, on,
                                                                is_main)
    return data


@dataclass
class _Trainer:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    beta_schedule: object
    channels_last: bool
    start_epoch: int = 1
    best: dict = field(default_factory=lambda: {"score": -math.inf, "epoch": 0})


def _build_trainer(args, device: torch.device, total_iters: int, resume_ckpt: dict | None) -> _Trainer:
    """The net, SGD and the schedules, restored from the checkpoint when resuming."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv kernels once
    model = build_model(args.model, args.margin).to(device)
    channels_last = getattr(args, "channels_last", "auto") != "off"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    trainer = _Trainer(model, optimizer, build_lr_scheduler(args, optimizer, total_iters),
                       build_beta(args, model.head, total_iters), channels_last)
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        trainer.lr_scheduler = resume_lr_scheduler(args, optimizer, trainer.lr_scheduler,
                                                   resume_ckpt["lr_scheduler"], total_iters)
        trainer.beta_schedule.load_state_dict(resume_ckpt["beta_schedule"])
        trainer.start_epoch = int(resume_ckpt["epoch"]) + 1
        trainer.best = dict(resume_ckpt.get("best", trainer.best))
    return trainer


def held_out_record(images: torch.Tensor, labels: torch.Tensor, start: int) -> dict:
    """What the checkpoint says about the held-out split: MNIST training images [start, stop), never trained
    on, and the sha256 of their pixels and labels, so export can check it fits on the very same images."""
    return {"split": "train", "start": int(start), "stop": int(start + len(labels)), "count": int(len(labels)),
            "sha256": held_out_digest(images, labels)}


def held_out_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 over the uint8 pixels then the labels as little-endian int64."""
    import hashlib

    digest = hashlib.sha256(images.to(torch.uint8).contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _run_config(args, device: torch.device, held_out: dict | None = None, negatives: dict | None = None) -> dict:
    """What a checkpoint needs to rebuild and describe the net (export reads it). held_out: which training images
    were held out (None: none were), what export fits calibration and the open-set threshold on."""
    return {
        "model": args.model, "margin": args.margin, "num_classes": 10,
        "embedding_dim": embedding_dim(args.model),
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD, "scale": 1.0 / 255.0},
        "input": {"shape": [1, 28, 28], "dtype": "uint8", "polarity": "white digit on black (MNIST)"},
        "train_args": {k: v for k, v in vars(args).items()},
        "evaluated_on": device.type,  # another device's float32 arithmetic may flip a borderline image or two
        "held_out": held_out,
        "negatives": negatives,  # what the net was shown as not a digit (None: digits only)
    }


def _record_epoch(out: Path, trainer: _Trainer, config: dict, record: dict, has_val: bool) -> None:
    """Rank 0: the log line, best.pt when the run improved, last.pt."""
    epoch = record["epoch"]
    score = record["val_acc"] if has_val else epoch  # no val split: final epoch wins
    improved = score >= trainer.best["score"]
    if improved:
        trainer.best = {"score": score, "epoch": epoch}
    state = {"config": config, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "lr_scheduler": trainer.lr_scheduler.state_dict(), "beta_schedule": trainer.beta_schedule.state_dict(),
             "epoch": epoch, "metrics": record, "best": trainer.best, "torch_version": str(torch.__version__)}
    # Order matters for a run killed in between: the log line first (resume drops lines past last.pt's
    # epoch), last.pt last (until it lands, resume redoes this epoch and rewrites best.pt identically).
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if improved:
        save_checkpoint({**state, "selected_by": "val_acc" if has_val else "final epoch"}, out / "best.pt")
    save_checkpoint(state, out / "last.pt")


def _resume_or_stop(args, explicit, out: Path) -> tuple[dict | None, argparse.Namespace, bool]:
    """(checkpoint or None, the run's flags, whether there is anything left to train)."""
    if not args.resume:
        return None, resolve_args(args), True
    ckpt, args = load_resume(out, args, explicit)
    saved_epochs = ckpt["config"]["train_args"].get("epochs")
    args = resolve_args(args)
    done = int(ckpt["epoch"])
    if done >= args.epochs:
        if os.environ.get("RANK", "0") == "0":  # (under torchrun every rank gets here, before joining the group)
            print(f"nothing to do: {out / 'last.pt'} already holds epoch {done} of the run's {args.epochs}; "
                  f"to train it further, resume with a larger --epochs (e.g. --epochs {done + 1})", flush=True)
        return ckpt, args, False
    if saved_epochs not in (None, args.epochs) and os.environ.get("RANK", "0") == "0":
        print(f"run resized from {saved_epochs} to {args.epochs} epochs: schedules sized by its length follow "
              f"the {args.epochs}-epoch curves from here", flush=True)
    return ckpt, args, True


def run(args: argparse.Namespace, explicit: set[str] | None = None) -> dict:
    """The whole training run; returns the final epoch's metrics. explicit: the dests given on the command
    line (see explicit_flags), which --resume checks against the checkpoint's flags."""
    out = Path(args.out)
    resume_ckpt, args, todo = _resume_or_stop(args, explicit, out)
    if not todo:
        return resume_ckpt.get("metrics")
    dist_env = distributed.setup(args.device)
    is_main = dist_env.rank == 0
    device = pick_device(args.device, dist_env.local_rank if dist_env.world_size > 1 else None)
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    progress = is_main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    if is_main:
        _check_writable(out)
        if resume_ckpt is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run must not append to an old log
    torch.manual_seed(args.seed)
    data = _load_data(args, dist_env, device, is_main)
    trainer = _build_trainer(args, device, args.epochs * len(data.train), resume_ckpt)
    if resume_ckpt is not None and is_main:
        truncate_metrics(out / "metrics.jsonl", trainer.start_epoch - 1)
        print(f"resuming {out / 'last.pt'} at epoch {trainer.start_epoch}/{args.epochs}", flush=True)
    train_model = distributed.wrap(trainer.model, dist_env)
    config = _run_config(args, device, data.held_out, data.negatives_record)
    if is_main:
        print(f"training {args.model} m={args.margin} on {device} ({dist_env.world_size} process(es)): "
              f"{data.train_count} train / {len(data.test_y)} test images"
              + (f" ({args.val_size} held out)" if args.val_size else "") + f", {args.epochs} epochs x "
              f"{len(data.train)} iterations, batch {args.batch_size}, lr {args.lr} ({args.lr_schedule}), "
              f"wd {args.weight_decay}", flush=True)
    final = None
    for epoch in range(trainer.start_epoch, args.epochs + 1):
        data.train.epoch = epoch
        negatives = augment = None
        if args.capture_augment == "on":  # draws seeded per epoch: a resumed run softens the same images alike
            augment = functools.partial(capture_like, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        if data.negatives is not None:
            data.negatives.epoch = epoch
            negatives = data.negatives.batches()
        started = time.perf_counter()
        lr, beta = trainer.optimizer.param_groups[0]["lr"], trainer.beta_schedule.current
        train_stats = train_one_epoch(train_model, data.train, trainer.optimizer, trainer.lr_scheduler,
                                      trainer.beta_schedule, device, amp, progress, f"epoch {epoch}/{args.epochs}",
                                      trainer.channels_last, negatives=negatives,
                                      negative_weight=args.negative_weight, augment=augment)
        test_stats = evaluate(trainer.model, data.test, device, trainer.channels_last)
        final = {"epoch": epoch, "lr": lr, "beta": beta, "train_loss": train_stats["loss"],
                 "train_acc": train_stats["acc"], "test_loss": test_stats["loss"], "test_acc": test_stats["acc"]}
        if data.val is not None:
            final["val_acc"] = evaluate(trainer.model, data.val, device, trainer.channels_last)["acc"]
        final["seconds"] = time.perf_counter() - started
        if is_main:
            _record_epoch(out, trainer, config, final, data.val is not None)
            print(f"epoch {epoch}/{args.epochs}: train loss {final['train_loss']:.4f} acc {final['train_acc']:.2f}% "
                  f"| test loss {final['test_loss']:.4f} acc {final['test_acc']:.2f}% | lr {lr:.4g} beta {beta:.4g} "
                  f"| {final['seconds']:.1f}s", flush=True)
    if is_main and args.vis:
        from training.visualize import plot_checkpoint_features
        png = plot_checkpoint_features(trainer.model, data.test_x, data.test_y, out / "features.png", device=device,
                                       title=f"{args.model} m={args.margin}: test features")
        print(f"wrote {png}")
    if is_main and final is not None:
        print(f"final test accuracy {final['test_acc']:.2f}% (epoch {final['epoch']}); "
              f"checkpoints in {out}", flush=True)
    distributed.teardown()
    return final


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args, explicit_flags(argv))
    except (DataError, CheckpointError, OSError, FloatingPointError) as exc:  # the run failed: exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # flags that cannot work together (or with the checkpoint): a usage error, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; resume with: python -m training --out {args.out} --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
