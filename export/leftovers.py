"""Temporary folders a killed export left beside its output, removed by the next export to the same output.

export_repository builds REPO in a folder beside it, `.REPO.tmp-<pid>-<8 random chars>` (tempfile.mkdtemp, in the
same parent so that the final rename is atomic), and removes it when the export fails; a killed export (SIGKILL, a
lost machine) cannot, and leaves it behind. `remove_stale(out)` is called by the next export of `out`, before it
makes its own, and removes a folder only when all of these hold:

- its name is exactly `.<out.name>.tmp-<pid>-<8 chars>`, or `.<out.name>.tmp-<8 chars>` (the name exports gave it
  before the pid was recorded), for this output's name: another output's temporary folder, or the user's own
  `.repo.old`, `repo.tmp-x` or `.repo.tmp-notes`, never matches;
- it is a directory (not a link to one) owned by this user, and holds nothing but what an export writes there:
  model folders (`lsoftmax_mnist_*`) and manifest.json, or nothing yet;
- the process that made it is gone: its pid is not a live process on this machine (the old name has no pid);
- nothing in it changed for STALE_AFTER_S (an hour). A pid alone is not proof: a parent folder shared between
  machines or containers (a network volume, pid namespaces) shows a live export elsewhere as a dead pid here, and
  an export writes its files within minutes, so an hour of quiet means nobody is writing there.

So a folder an export is still writing (on this machine or another) is never touched, and a stale one is removed by
the first export of the same output an hour or more after it was killed. Removal is best effort (what cannot be
removed is left and reported to no one but `log`); nothing else in the parent folder is read beyond its names.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from pathlib import Path

from serving.repository.format import MANIFEST_FILE, MODEL_PREFIX

__all__ = ["STALE_AFTER_S", "temp_prefix", "is_stale", "remove_stale"]

STALE_AFTER_S = 3600.0
_RANDOM = "[a-z0-9_]{8}"  # tempfile.mkdtemp's random part: 8 of [a-z0-9_]


def temp_prefix(out: Path) -> str:
    """mkdtemp's prefix for an export to `out`: `.<name>.tmp-<pid>-` (the random part follows)."""
    return f".{out.name}.tmp-{os.getpid()}-"


def _pattern(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.tmp-(?:(?P<pid>[1-9][0-9]*)-)?{_RANDOM}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another export in this process (a thread) may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):  # a pid this system cannot have
        return False
    return True


def _newest_change(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except OSError:
                pass
    return newest


def _looks_like_an_export(folder: Path) -> bool:
    """Only what export writes at the top of its temporary folder: model folders and manifest.json."""
    for entry in os.scandir(folder):
        if entry.name == MANIFEST_FILE and entry.is_file(follow_symlinks=False):
            continue
        if entry.name.startswith(f"{MODEL_PREFIX}_") and entry.is_dir(follow_symlinks=False):
            continue
        return False
    return True


def is_stale(folder: Path, out: Path, now: float | None = None) -> bool:
    """Whether `folder` is a temporary folder a dead export to `out` left (the rules in this module's docstring)."""
    match = _pattern(out).fullmatch(folder.name)
    if match is None or folder.parent != out.parent:
        return False
    try:
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return False
        if match["pid"] is not None and _alive(int(match["pid"])):
            return False
        if not _looks_like_an_export(folder):
            return False
        return (time.time() if now is None else now) - _newest_change(folder) >= STALE_AFTER_S
    except OSError:
        return False


def remove_stale(out: Path, log=print) -> list[Path]:
    """Remove the temporary folders dead exports to `out` left in its parent folder; returns those removed."""
    removed = []
    try:
        names = os.listdir(out.parent)
    except OSError:
        return removed
    pattern = _pattern(out)
    for name in sorted(names):
        folder = out.parent / name
        if pattern.fullmatch(name) is None or not is_stale(folder, out):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            removed.append(folder)
            log(f"removed {folder}: left by an export to {out} that did not finish")
    return removed
