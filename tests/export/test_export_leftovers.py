"""export.leftovers: which folders beside an export's output count as a killed export's temporary folder (its own
name pattern, an export's contents, a dead pid, an hour without change), and that nothing else is touched. The
end-to-end case (an export removing one) is tests/export/test_export.py::test_export_removes_what_a_killed_export_left.
Run: .venv/bin/python -m pytest tests/export/test_export_leftovers.py -q"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from export.leftovers import STALE_AFTER_S, is_stale, remove_stale, temp_prefix


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_tree(folder, contents=("manifest.json", "lsoftmax_mnist_onnx/1/model.onnx", "lsoftmax_mnist_onnx/config.pbtxt"),
              age_s: float = 2 * STALE_AFTER_S):
    """A folder as an export leaves it, every entry's mtime set age_s in the past."""
    folder.mkdir()
    for relative in contents:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    then = time.time() - age_s
    for path in sorted([folder, *folder.rglob("*")], key=lambda p: -len(p.parts)):  # folders after what they hold
        os.utime(path, (then, then), follow_symlinks=False)
    return folder


def test_the_temporary_folder_name_carries_the_pid(tmp_path):
    assert temp_prefix(tmp_path / "repo") == f".repo.tmp-{os.getpid()}-"


def test_only_a_dead_exports_quiet_folder_is_removed(tmp_path):
    out, pid = tmp_path / "repo", dead_pid()
    stale = make_tree(tmp_path / f".repo.tmp-{pid}-abc_1234")
    legacy = make_tree(tmp_path / ".repo.tmp-k2x9q0zz")  # the name before the pid was recorded
    empty = make_tree(tmp_path / f".repo.tmp-{pid}-00000000", contents=())  # killed right after mkdtemp
    keep = {
        "recent": make_tree(tmp_path / f".repo.tmp-{pid}-recent00", age_s=60),  # maybe a live export elsewhere
        "live pid": make_tree(tmp_path / ".repo.tmp-1-livepid0"),  # pid 1 is always alive
        "own pid": make_tree(tmp_path / f".repo.tmp-{os.getpid()}-mine0000"),
        "other output": make_tree(tmp_path / f".other.tmp-{pid}-abc_1234"),
        "user folder": make_tree(tmp_path / ".repo.tmp-notes"),
        "no dot": make_tree(tmp_path / f"repo.tmp-{pid}-abc_1234"),
        "old tree": make_tree(tmp_path / f".repo.old-{pid}"),
        "user content": make_tree(tmp_path / f".repo.tmp-{pid}-mydata00", contents=("notes.txt",)),
        "output": make_tree(out),
    }
    (tmp_path / f".repo.tmp-{pid}-afile000").write_text("a file, not a folder")
    link = tmp_path / f".repo.tmp-{pid}-alink000"
    link.symlink_to(keep["user content"])
    logged = []
    removed = remove_stale(out, log=logged.append)
    assert sorted(removed) == sorted([stale, legacy, empty])
    assert not any(p.exists() for p in (stale, legacy, empty))
    assert all(p.is_dir() for p in keep.values()), [k for k, p in keep.items() if not p.is_dir()]
    assert (tmp_path / f".repo.tmp-{pid}-afile000").is_file() and link.is_symlink()
    assert (keep["user content"] / "notes.txt").is_file()
    assert len(logged) == 3 and all("did not finish" in line for line in logged)


def test_a_change_inside_keeps_the_folder(tmp_path):
    """Quiet means nothing anywhere in the tree changed: one fresh file deep inside keeps it."""
    folder = make_tree(tmp_path / f".repo.tmp-{dead_pid()}-deep0000")
    assert is_stale(folder, tmp_path / "repo")
    (folder / "lsoftmax_mnist_onnx" / "1" / "model.onnx").touch()
    assert not is_stale(folder, tmp_path / "repo")
    assert is_stale(folder, tmp_path / "repo", now=time.time() + STALE_AFTER_S + 1)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_another_users_folder_is_kept(tmp_path):
    folder = make_tree(tmp_path / f".repo.tmp-{dead_pid()}-theirs00")
    os.chown(folder, 12345, 12345)
    assert not is_stale(folder, tmp_path / "repo")
