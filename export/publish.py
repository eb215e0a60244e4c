"""Publishing a repository: built in a temporary folder beside REPO, sealed, and renamed into place in one step.

The temporary folder is `.REPO.tmp-<pid>-<random>` in REPO's parent (the rename must not cross file systems), so a
failed export never leaves half a repository; one a killed export left is removed by the next export to REPO
(export.leftovers). The tree is world-readable (folders 0755, files 0644, whatever the umask): the serving image
reads it as another user (docs/architecture.md §4).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from export.errors import ExportError
from export.leftovers import remove_stale, temp_prefix
from training.checkpoint import fsync_dir

__all__ = ["DIR_MODE", "FILE_MODE", "prepare_out", "seal", "install", "staged"]

DIR_MODE, FILE_MODE = 0o755, 0o644


def prepare_out(out: Path, force: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder without force, or whose parent cannot be written."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"{out.parent} is not writable")


def seal(tree: Path) -> None:
    """Give every folder 0755 and every file 0644 (set outright, not through the umask; mkdtemp makes the top
    folder 0700), and fsync them, so that the tree is readable by any user and complete on disk before the
    rename publishes it."""
    for folder, _, files in os.walk(tree):
        for name in files:
            path = os.path.join(folder, name)
            os.chmod(path, FILE_MODE)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(folder, DIR_MODE)
        fsync_dir(folder)


def install(tmp: Path, out: Path) -> None:
    """Seal the finished tree and rename it into place; an old tree (with --force) is moved aside first."""
    seal(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)  # both renames reach the disk
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: Path, log=print) -> Iterator[Path]:
    """The temporary folder to build `out` in: installed as `out` when the block finishes, removed if it raises.
    What a killed export to `out` left is removed first (export.leftovers says when)."""
    remove_stale(out, log)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        yield tmp
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
