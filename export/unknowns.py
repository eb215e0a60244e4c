"""Images that are not digits, made offline, to measure the open-set score against.

    sets = unknown_sets(n=2000, seed=0)        # {"uniform_noise", "gaussian_noise", "blank", "letters"} uint8 [N,1,28,28]
    drawn = character_sets(n=2000, seed=0)     # {"letters", "handwritten_letters", "greek", "devanagari"}: Rendered
    fashion = fashion_mnist()                  # Fashion-MNIST test images, or None when it cannot be had offline

Noise: uniform pixels, and Gaussian blobs of MNIST-like ink level. Blank: all-black images and near-blank ones
(a few faint specks, a single dot, a thin border line), which a blank page scan becomes. Letters: A-Z, a-z and a few
symbols rendered with the DejaVu fonts matplotlib ships, at random sizes, slants and stroke weights, framed as MNIST's
digits were (longer side 20 px, centre of mass at the centre of 28x28).
Fashion-MNIST: Debian's `dataset-fashion-mnist` package (`apt-get download`, unpacked with `dpkg-deb -x`, no root
needed), its t10k files checked against their sha256 and cached beside MNIST (`$LSOFTMAX_CACHE/fashion-mnist`).

Held out from the training negatives (training.negatives draws Latin letters and symbols in the Hershey stroke
fonts, strokes, scribbles and distorted digits), drawn as `letters` is in fonts from Debian packages fetched as
Fashion-MNIST is (export.unknown_fonts): `handwritten_letters`, the same characters in handwriting and informal
fonts; `greek` and `devanagari`, letters of two other scripts (no digits of theirs, no Greek capital that is a
Latin one). A set whose packages cannot be had is left out with a line logged. Each drawn image comes with the
character it is (Rendered.characters), so that a report can be split per character: some characters are shaped
like a digit (LOOKALIKES: O, l, S, Z, B, g, q, ...), no score can reject those without rejecting digits, and the
evaluation reports them apart from the rest of their set.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from training.negatives import frame_like_mnist  # the one MNIST framing of rendered ink (training and evaluation)

from export.debian import FETCH_ERRORS, fetch_package_files, sha256

__all__ = ["SYNTHETIC_SETS", "FONT_SETS", "CHARACTER_SETS", "LETTERS", "GREEK", "DEVANAGARI", "LOOKALIKES",
           "Rendered", "unknown_sets", "character_sets", "uniform_noise", "gaussian_noise", "blank", "letters",
           "render_characters", "is_lookalike", "fashion_mnist", "FASHION_FILES"]

SYNTHETIC_SETS = ("uniform_noise", "gaussian_noise", "blank", "letters")
FONT_SETS = ("handwritten_letters", "greek", "devanagari")  # drawn in Debian's fonts (export.unknown_fonts)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#%&@?!$+=*"
# Greek letters but the capitals that are Latin ones (A B E Z H I K M N O P T Y X) and omicron (an o).
GREEK = "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθικλμνξπρσςτυφχψω"
# Devanagari's independent vowels and its consonants; never its digits (०-९, U+0966-U+096F, are digits).
DEVANAGARI = "अआइईउऊऋएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह"
CHARACTER_SETS = {"letters": LETTERS, "handwritten_letters": LETTERS, "greek": GREEK, "devanagari": DEVANAGARI}
LOOKALIKES = {  # character: the digit it is shaped like, once framed as MNIST (longer side 20 px, centred)
    # 1: one upright stroke, perhaps with a hook, a foot or a dot, which is how MNIST's 1s are written
    "l": "1", "I": "1", "i": "1", "j": "1", "J": "1", "!": "1", "ι": "1",
    # 0: one closed oval (D: a flat side; Q: a short tail; Θ θ: the barred zero some write)
    "O": "0", "o": "0", "D": "0", "Q": "0", "Θ": "0", "θ": "0",
    # 2: Z is a 2 drawn with straight strokes
    "Z": "2", "z": "2",
    # 3: Devanagari u is a 3 under a headline
    "उ": "3",
    # 5: S is a 5 with its top corner rounded off
    "S": "5", "s": "5",
    # 6: a loop at the bottom and a stroke rising from it (G: its bar reads as the 6's inner end)
    "b": "6", "G": "6", "δ": "6",
    # 7: a bar and a stroke down from its middle, which a slanted 7 becomes
    "T": "7",
    # 8: two loops stacked
    "B": "8", "&": "8",
    # 9: a loop at the top and a stroke down from it
    "q": "9", "g": "9",
}
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


def _fonts() -> list[Path]:
    """The DejaVu fonts matplotlib ships (Display left out: a few glyphs only)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name)
    if not fonts:
        raise RuntimeError("matplotlib's DejaVu fonts were not found")
    return fonts


class Rendered(NamedTuple):
    """A drawn character set: the images and, image by image, the character each one is."""
    images: np.ndarray         # uint8 [N, 1, 28, 28]
    characters: np.ndarray     # str [N]: images[k] is characters[k]
    fonts: dict[str, list[Path]]  # the font files it was drawn in, by where they come from (a Debian package)


def render_characters(n: int, rng: np.random.Generator, chars: str,
                      fonts: Sequence[Path | Sequence[Path]]) -> tuple[np.ndarray, np.ndarray]:
    """n images cycling through CHARS (uint8 [n, 1, 28, 28]) and the character of each (str [n]): a font drawn
    from FONTS (an entry that is a group of files: the group drawn, then a file in it), a random size, a rotation
    of up to 15 degrees, half of them bolder, framed as MNIST's digits were."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    loaded: dict[tuple[Path, int], ImageFont.FreeTypeFont] = {}
    characters = np.array([chars[i % len(chars)] for i in range(n)], dtype="<U1")
    out = np.zeros((n, 1, 28, 28), np.uint8)
    for i, char in enumerate(characters):
        path = fonts[rng.integers(len(fonts))]
        if not isinstance(path, (str, Path)):
            path = path[rng.integers(len(path))]
        key = (Path(path), int(rng.integers(40, 64)))
        if key not in loaded:
            loaded[key] = ImageFont.truetype(str(key[0]), key[1])
        font = loaded[key]
        left, top, right, bottom = font.getbbox(char, anchor="mm")
        side = max(96, 2 * math.ceil(math.hypot(max(-left, right), max(-top, bottom))) + 8)  # room to rotate
        canvas = Image.new("L", (side, side), 0)
        ImageDraw.Draw(canvas).text((side // 2, side // 2), char, fill=255, font=font, anchor="mm")
        canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        if rng.random() < 0.5:
            canvas = canvas.filter(ImageFilter.MaxFilter(3))  # bolder stroke, as a pen's
        out[i, 0] = frame_like_mnist(np.asarray(canvas, np.float64))
    return out, characters


def letters(n: int, rng: np.random.Generator) -> np.ndarray:
    """Letters and symbols (not digits) in the DejaVu fonts matplotlib ships, random size, rotation and weight."""
    return render_characters(n, rng, LETTERS, _fonts())[0]


def is_lookalike(characters: np.ndarray) -> np.ndarray:
    """bool [N]: which of these characters are shaped like a digit (LOOKALIKES)."""
    return np.isin(np.asarray(characters), list(LOOKALIKES))


def _rng(name: str, seed: int) -> np.random.Generator:
    """Each set's own stream: the same images for a seed whichever other sets are made."""
    return np.random.default_rng([seed, (SYNTHETIC_SETS + FONT_SETS).index(name)])


def unknown_sets(n: int = 2000, seed: int = 0, names: Sequence[str] = SYNTHETIC_SETS) -> dict[str, np.ndarray]:
    """The synthetic unknown sets (NAMES of SYNTHETIC_SETS), n images each, deterministic for a seed."""
    makers = {"uniform_noise": uniform_noise, "gaussian_noise": gaussian_noise, "blank": blank, "letters": letters}
    return {name: makers[name](n, _rng(name, seed)) for name in names}


def character_sets(n: int = 2000, seed: int = 0, names: Sequence[str] = tuple(CHARACTER_SETS),
                   cache_dir: str | Path | None = None, fetch: bool = True, log=print) -> dict[str, Rendered]:
    """The character sets NAMES (of CHARACTER_SETS), n images each with their characters, deterministic for a seed
    and the fonts had: `letters` (the same images as unknown_sets') in matplotlib's DejaVu, the others in Debian's
    font packages (export.unknown_fonts; cached in CACHE_DIR, default `$LSOFTMAX_CACHE/fonts`; fetched when missing
    unless fetch=False). A set none of whose packages can be had is left out, with one line logged for each."""
    from export.unknown_fonts import SET_FONTS, set_fonts

    out = {}
    for name in names:
        if name == "letters":
            sources = {"matplotlib": _fonts()}
            fonts = sources["matplotlib"]
        else:  # a package drawn first, then one of its files
            sources = set_fonts(name, cache_dir, fetch, log)
            if not sources:
                log(f"{name} left out: none of its font packages ({', '.join(SET_FONTS[name])}) could be had")
                continue
            fonts = [paths[0] if len(paths) == 1 else paths for paths in sources.values()]
        images, characters = render_characters(n, _rng(name, seed), CHARACTER_SETS[name], fonts)
        out[name] = Rendered(images, characters, sources)
    return out


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
            fetch_package_files(FASHION_DEB, FASHION_FILES, root)
        except FETCH_ERRORS as exc:
            log(f"Fashion-MNIST unavailable ({exc}); skipping it")
            return None
    if not images.is_file():
        return None
    if sha256(images) != FASHION_FILES[images.name]:
        log(f"{images}: sha256 mismatch; skipping Fashion-MNIST (delete the folder to fetch it again)")
        return None
    return _read_idx_images(images)
