"""Images that are not digits, made offline, to measure the open-set score against.

    sets = unknown_sets(n=2000, seed=0)        # {"uniform_noise", "gaussian_noise", "blank", "letters"} uint8 [N,1,28,28]
    fashion = fashion_mnist()                  # Fashion-MNIST test images, or None when it cannot be had offline

Noise: uniform pixels, and Gaussian blobs of MNIST-like ink level. Blank: all-black images and near-blank ones
(a few faint specks, a single dot, a thin border line), which a blank page scan becomes. Letters: A-Z, a-z and a few
symbols rendered with the DejaVu fonts matplotlib ships, at random sizes, slants and stroke weights, framed as MNIST's
digits were (longer side 20 px, centre of mass at the centre of 28x28). Some letters look like digits (O, l, S, Z,
B, g, q): no score can reject those without rejecting digits, which bounds what any detector reaches on that set.
Fashion-MNIST: Debian's `dataset-fashion-mnist` package (`apt-get download`, unpacked with `dpkg-deb -x`, no root
needed), its t10k files checked against their sha256 and cached beside MNIST (`$LSOFTMAX_CACHE/fashion-mnist`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["SYNTHETIC_SETS", "unknown_sets", "uniform_noise", "gaussian_noise", "blank", "letters", "fashion_mnist",
           "frame_mnist", "FASHION_FILES"]

SYNTHETIC_SETS = ("uniform_noise", "gaussian_noise", "blank", "letters")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#%&@?!$+=*"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_FILES = {  # the package's gzipped IDX files (bookworm 0.0~git20200523.55506a9-1) = zalandoresearch's
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def uniform_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)


def gaussian_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """N(mean, sigma) pixels clipped to 0..255, mean and sigma drawn per image (dark to mid-grey backgrounds)."""
    mean = rng.uniform(0, 128, size=(n, 1, 1, 1))
    sigma = rng.uniform(20, 100, size=(n, 1, 1, 1))
    return np.clip(rng.normal(mean, sigma, size=(n, 1, 28, 28)), 0, 255).astype(np.uint8)


def blank(n: int, rng: np.random.Generator) -> np.ndarray:
    """A quarter all black, the rest near-blank: faint specks, one dot, or a thin line along an edge."""
    out = np.zeros((n, 1, 28, 28), np.uint8)
    for i in range(n // 4, n):
        kind = i % 3
        if kind == 0:
            k = rng.integers(1, 8)
            out[i, 0, rng.integers(0, 28, k), rng.integers(0, 28, k)] = rng.integers(20, 120, k)
        elif kind == 1:
            r, c = rng.integers(4, 24, 2)
            out[i, 0, r:r + 2, c:c + 2] = rng.integers(128, 256)
        else:
            j = rng.integers(0, 3)
            if rng.random() < 0.5:
                out[i, 0, j, :] = rng.integers(60, 256)
            else:
                out[i, 0, :, 27 - j] = rng.integers(60, 256)
    return out


def frame_mnist(ink: np.ndarray) -> np.ndarray:
    """A float ink image (white on black) framed as MNIST: bounding box scaled to a 20 px longer side,
    centre of mass moved to the centre of a 28x28 field; uint8 [28, 28] (all zero when there is no ink)."""
    from PIL import Image
    from scipy import ndimage

    rows, cols = np.nonzero(ink > 0.05 * ink.max()) if ink.max() > 0 else ((), ())
    if len(rows) == 0:
        return np.zeros((28, 28), np.uint8)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray((255 * crop / crop.max()).astype(np.uint8)).resize(size, Image.LANCZOS),
                       np.float64)
    field = np.zeros((28, 28))
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    field[top:top + size[1], left:left + size[0]] = small
    cy, cx = ndimage.center_of_mass(field)
    field = ndimage.shift(field, (13.5 - cy, 13.5 - cx), order=1, mode="constant")
    return np.clip(field, 0, 255).round().astype(np.uint8)


def _fonts() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name)  # Display: a few glyphs only


def letters(n: int, rng: np.random.Generator) -> np.ndarray:
    """Letters and symbols (not digits) in the DejaVu fonts matplotlib ships, random size, rotation and weight."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = _fonts()
    if not fonts:
        raise RuntimeError("matplotlib's DejaVu fonts were not found")
    out = np.zeros((n, 1, 28, 28), np.uint8)
    for i in range(n):
        char = LETTERS[i % len(LETTERS)]
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(40, 64)))
        canvas = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(canvas).text((48, 48), char, fill=255, font=font, anchor="mm")
        canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        if rng.random() < 0.5:
            canvas = canvas.filter(ImageFilter.MaxFilter(3))  # bolder stroke, as a pen's
        out[i, 0] = frame_mnist(np.asarray(canvas, np.float64))
    return out


def unknown_sets(n: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic unknown sets, n images each, deterministic for a seed."""
    makers = {"uniform_noise": uniform_noise, "gaussian_noise": gaussian_noise, "blank": blank, "letters": letters}
    return {name: makers[name](n, np.random.default_rng([seed, k])) for k, name in enumerate(SYNTHETIC_SETS)}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_idx_images(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    if int.from_bytes(data[:4], "big") != 0x803:
        raise ValueError(f"{path}: not an IDX image file")
    count, rows, cols = (int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(3))
    return np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols).copy()


def fashion_mnist(cache_dir: str | Path | None = None, fetch: bool = True, log=print) -> np.ndarray | None:
    """Fashion-MNIST's 10,000 test images uint8 [N,1,28,28] from the cache, fetching Debian's package into it when
    missing (apt-get download + dpkg-deb -x, sha256-checked); None (with one line logged) when it cannot be had."""
    from training.data import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir() / "fashion-mnist"
    images = root / "t10k-images-idx3-ubyte.gz"
    if not images.is_file() and fetch:
        try:
            _fetch_fashion(root)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log(f"Fashion-MNIST unavailable ({exc}); skipping it")
            return None
    if not images.is_file():
        return None
    if _sha256(images) != FASHION_FILES[images.name]:
        log(f"{images}: sha256 mismatch; skipping Fashion-MNIST (delete the folder to fetch it again)")
        return None
    return _read_idx_images(images)


def _fetch_fashion(root: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise OSError("apt-get/dpkg-deb not found (use torchvision.datasets.FashionMNIST on a machine with internet)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fashion-") as tmp:
        subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, check=True, capture_output=True, timeout=300)
        debs = sorted(Path(tmp).glob(f"{FASHION_DEB}_*.deb"))
        if not debs:
            raise OSError(f"apt-get download {FASHION_DEB} left no .deb")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True, capture_output=True)
        staged = Path(tmp) / "out"
        staged.mkdir()
        for name, digest in FASHION_FILES.items():
            found = next((Path(tmp) / "x").rglob(name), None)
            if found is None or _sha256(found) != digest:
                raise ValueError(f"{debs[0].name}: {name} missing or its sha256 differs from the pinned one")
            shutil.copyfile(found, staged / name)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
