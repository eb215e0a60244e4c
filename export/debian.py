"""Files out of a Debian package, fetched without root and kept in a cache: the offline unknown sets' sources.

    fetch_package_files("dataset-fashion-mnist", {"t10k-images-idx3-ubyte.gz": "<sha256>", ...}, root)

`apt-get download PACKAGE` (the machine's configured mirror, no root needed) into a temporary folder beside `root`,
`dpkg-deb -x` to unpack it, each pinned file found by name anywhere in the package and checked against its sha256,
then all of them moved into `root` at once (a failed fetch leaves `root` as it was). Raises OSError when apt-get or
dpkg-deb is missing or the package cannot be had, subprocess.SubprocessError when a command fails or times out,
ValueError when a pinned file is missing or differs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["FETCH_ERRORS", "sha256", "fetch_package_files"]

FETCH_ERRORS = (OSError, subprocess.SubprocessError, ValueError)  # what fetch_package_files raises


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_package_files(package: str, files: dict[str, str], root: str | Path, timeout: float = 300) -> None:
    """Debian's PACKAGE's files named in FILES ({file name: sha256}) into the folder ROOT (replaced whole)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise OSError("apt-get/dpkg-deb not found")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{package}-") as tmp:
        _run(["apt-get", "download", package], tmp, timeout)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise OSError(f"apt-get download {package} left no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], tmp, timeout)
        staged = Path(tmp) / "out"
        staged.mkdir()
        for name, digest in files.items():
            found = next((p for p in (Path(tmp) / "x").rglob(name) if p.is_file()), None)
            if found is None or sha256(found) != digest:
                raise ValueError(f"{debs[0].name}: {name} missing or its sha256 differs from the pinned one")
            shutil.copyfile(found, staged / name)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)


def _run(command: list[str], cwd: str, timeout: float) -> None:
    """Run COMMAND; OSError with the last line it wrote to stderr when it fails (one line for the log)."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise OSError(f"{' '.join(command[:2])} failed: {said}")
