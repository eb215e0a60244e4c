"""Files out of a Debian package, fetched without root and kept in a cache: the offline unknown sets' sources.

    fetch_package_files("dataset-fashion-mnist", {"t10k-images-idx3-ubyte.gz": "<sha256>", ...}, root)
    debs = download(["fonts-gargi", "fonts-lohit-deva"], folder)     # several .debs in one apt-get call

`apt-get download PACKAGE` (the machine's configured mirror, no root needed) into a temporary folder beside `root`
(or a .deb downloaded before), `dpkg-deb -x` to unpack it, each pinned file found by name anywhere in the package
and checked against its sha256, then all of them moved into `root` at once (a failed fetch leaves `root` as it
was). Raises OSError when apt-get or dpkg-deb is missing, fails or the package cannot be had,
subprocess.TimeoutExpired when a command runs too long, ValueError when a pinned file is missing or differs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["FETCH_ERRORS", "sha256", "download", "fetch_package_files"]

FETCH_ERRORS = (OSError, subprocess.SubprocessError, ValueError)  # what fetch_package_files raises


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(packages: list[str], folder: str | Path, timeout: float = 300) -> dict[str, Path]:
    """{package: its .deb} for PACKAGES, downloaded into FOLDER by one `apt-get download` (one package the mirror
    lacks fails them all)."""
    if shutil.which("apt-get") is None:
        raise OSError("apt-get not found")
    _run(["apt-get", "download", *packages], folder, timeout)
    debs = {}
    for package in packages:
        found = sorted(Path(folder).glob(f"{package}_*.deb"))
        if not found:
            raise OSError(f"apt-get download {package} left no .deb")
        debs[package] = found[0]
    return debs


def fetch_package_files(package: str, files: dict[str, str], root: str | Path, timeout: float = 300,
                        deb: str | Path | None = None) -> None:
    """Debian's PACKAGE's files named in FILES ({file name: sha256}) into the folder ROOT (replaced whole); deb:
    the package's .deb when it was downloaded already (else apt-get downloads it)."""
    if shutil.which("dpkg-deb") is None:
        raise OSError("dpkg-deb not found")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{package}-") as tmp:
        deb = Path(deb) if deb is not None else download([package], tmp, timeout)[package]
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], tmp, timeout)
        staged = Path(tmp) / "out"
        staged.mkdir()
        for name, digest in files.items():
            found = next((p for p in (Path(tmp) / "x").rglob(name) if p.is_file()), None)
            if found is None or sha256(found) != digest:
                raise ValueError(f"{deb.name}: {name} missing or its sha256 differs from the pinned one")
            shutil.copyfile(found, staged / name)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)


def _run(command: list[str], cwd: str | Path, timeout: float) -> None:
    """Run COMMAND; OSError with the last line it wrote to stderr when it fails (one line for the log)."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise OSError(f"{' '.join(command[:2])} failed: {said}")
