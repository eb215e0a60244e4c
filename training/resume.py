"""--resume: the checkpoint's own flags against the ones given, and the metrics log cut back to the checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import stat
import tempfile
from pathlib import Path

from training.checkpoint import CheckpointError, fsync_dir, load_checkpoint
from training.options import ABSENT_FROM_OLD_CHECKPOINTS, RUNTIME_FLAGS, get_args_parser

__all__ = ["load_resume", "truncate_metrics", "replace_text"]


def _flag_and_value(dest: str, value) -> str:
    flag = "--" + dest.replace("_", "-")
    return f"{flag} (unset)" if value is None else f"{flag} {shlex.quote(str(value))}"


def load_resume(out: Path, args, explicit: set[str] | None = None) -> tuple[dict, argparse.Namespace]:
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
    recorded = {**defaults, **ABSENT_FROM_OLD_CHECKPOINTS, **saved}
    conflicts = [f"{_flag_and_value(k, getattr(args, k))} conflicts with the checkpoint's "
                 f"{_flag_and_value(k, recorded[k])}"
                 for k in defaults if k in explicit and k not in RUNTIME_FLAGS and k != "epochs"
                 and getattr(args, k) != recorded[k]]
    if conflicts:
        raise ValueError(f"{', '.join(conflicts)} ({path}); resume keeps the run's own flags")
    done = int(ckpt["epoch"])
    changed = {k: getattr(args, k) for k in RUNTIME_FLAGS}
    if "epochs" in explicit and args.epochs is not None:
        if args.epochs < done:
            raise ValueError(f"--epochs {args.epochs} is below the {done} epoch(s) {path} already holds; "
                             "resume can only continue a run")
        changed["epochs"] = args.epochs
    return ckpt, argparse.Namespace(**{**recorded, **changed})


def replace_text(path: Path, text: str) -> None:
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


def truncate_metrics(path: Path, last_epoch: int) -> None:
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
        replace_text(path, new)
