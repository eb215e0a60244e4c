"""Read digit arrays for the client: uint8 images from .npy or IDX files, integer labels likewise.

    images = load_digits("t10k-images-idx3-ubyte")   # uint8 [N, 28, 28]; also .npy [N,28,28] / [N,784] / [N,1,28,28]
    labels = load_labels("t10k-labels-idx1-ubyte")   # int64 [N]; also .npy of any integer dtype

IDX is MNIST's own format (big-endian magic 0x0000080D, D dims, then the data), optionally gzipped;
this is what `python -m training.data` leaves under ROOT/MNIST/raw/. .npy files load with allow_pickle=False.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["ArrayFileError", "load_digits", "load_labels", "read_idx"]


class ArrayFileError(ValueError):
    """The file is not a digit/label array this client understands; the message names it and says why."""


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (uint8 data only, as MNIST's) → ndarray of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ArrayFileError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ArrayFileError(f"{path}: IDX data type 0x{data[2]:02x} is not uint8 (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ArrayFileError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    if len(data) - header != count:
        raise ArrayFileError(f"{path}: IDX header declares {shape} ({count} bytes), the file has {len(data) - header}")
    return np.frombuffer(data, np.uint8, count, header).reshape(shape)


def _load(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ArrayFileError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ArrayFileError(f"{path}: not a plain .npy array ({exc})") from None
    return read_idx(path)


def load_digits(path: str | Path) -> np.ndarray:
    """uint8 [N, 28, 28] from .npy ([N,28,28], [N,784] or [N,1,28,28]) or IDX."""
    array = _load(path)
    if array.dtype != np.uint8:
        raise ArrayFileError(f"{path}: images must be uint8 (0..255, white digit on black), got {array.dtype}")
    if array.ndim == 2 and array.shape[1] == 784:
        array = array.reshape(-1, 28, 28)
    elif array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ArrayFileError(f"{path}: expected [N,28,28], [N,784] or [N,1,28,28], got {list(array.shape)}")
    return np.ascontiguousarray(array)


def load_labels(path: str | Path) -> np.ndarray:
    """int64 [N] from .npy (any integer dtype) or IDX."""
    array = _load(path)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 1:
        raise ArrayFileError(f"{path}: labels must be a 1-D integer array, got {array.dtype} {list(array.shape)}")
    return array.astype(np.int64)
