"""Self-describing checkpoints: the net's config beside every state dict, written atomically.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(path, weights_only=True)`; `rebuild_model(ckpt)` needs nothing but the file.
"""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from pathlib import Path

import torch

from training.models import LSoftmaxNet, build_model

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "rebuild_model", "fsync_dir"]

CHECKPOINT_FORMAT = "lsoftmax-serve/checkpoint"
CHECKPOINT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename (or a new name) in it survives a crash, not just the renamed
    file's bytes. A no-op where directories cannot be opened (Windows) or fsynced (some file systems)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours; the message names the file."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them visible
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself reaches the disk


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True and check it is one of ours; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # garbage bytes also warn about a "pickle protocol 83": the error says it
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # on arbitrary bytes the unpickler also raises IndexError, KeyError, ...
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"{path}: not a readable lsoftmax-serve checkpoint ({detail})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an lsoftmax-serve training checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt


def rebuild_model(ckpt: dict) -> LSoftmaxNet:
    """Build the net from the checkpoint's own config and load its weights (eval mode)."""
    config = ckpt["config"]
    model = build_model(config["model"], int(config["margin"]), int(config.get("num_classes", 10)))
    model.load_state_dict(ckpt["model"])
    return model.eval()
