"""Training negatives: images that are not digits, made offline from a training-only pool (docs/open_set.md).

    images = negative_images(16384, seed=0, digits=train_x, labels=train_y)   # uint8 [N, 1, 28, 28]

Outlier exposure (Hendrycks et al. 2019) shows the net what is *not* a digit during training, so that its
"not a digit" answer learns more than the digits' feature density. The pool has three families, framed as MNIST's
digits were (longer side 20 px, centre of mass at the centre of 28x28) with varied stroke widths:

- **stroke fonts**: Latin letters and symbols of the Hershey vector fonts (PyPI `Hershey-Fonts`) and its symbol
  fonts (astrology, markers, music, meteorology, symbolic). Its Greek, Cyrillic and Japanese fonts are left out, so
  that another script stays an honest held-out test, and so are the characters shaped like a digit
  (DIGIT_SHAPED: an `l` *is* a `1` in a stroke font, and teaching the net to refuse it would refuse digits).
  Evaluation renders letters in other fonts (export.unknowns); it shares only frame_like_mnist with this module.
- **strokes and scribbles**: random Bezier curves, zigzags, spirals, hatching, crosses and stars, two or more
  strokes each (one straight stroke is a `1`, one closed loop a `0`).
- **hard negatives from digits**: part of a digit (cut along a line through its centre of mass), two digits of
  different classes overlapped, a digit cut in two with one half shifted sideways.

Deterministic for a seed. Training makes its pool from the run's training digits; the export's learned detector
(export/detectors/learned.py) makes its own, with another seed, from the held-out digits it fits statistics on.
Neither ever sees a test image or an evaluation font.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["read_stroke_fonts", "FAMILIES", "DIGIT_SHAPED", "LATIN_FONTS", "SYMBOL_FONTS", "negative_images", "frame_like_mnist",
           "stroke_font_glyphs", "scribbles", "digit_fragments"]

# Hershey's Latin faces (its Greek, Cyrillic, Japanese and Greek-bearing math fonts stay out of training).
LATIN_FONTS = ("futural", "futuram", "rowmans", "rowmand", "rowmant", "timesr", "timesrb", "timesi", "timesib",
               "scripts", "scriptc", "cursive", "gothiceng", "gothicger", "gothicita", "gothgbt", "gothgrt", "gothitt")
SYMBOL_FONTS = ("astrology", "markers", "music", "meteorology", "symbolic")
# Characters a digit reader cannot refuse without refusing digits: l I i j J | ! / \\ 1 ; O o D Q 0 ; Z z 2 ;
# S s 5 ; b G 6 ; B & 8 ; q g 9 ; T 7 ; ( ) [ ] { } read as 1 once framing stretches them to 20 px.
DIGIT_SHAPED = set("lIijJ|!/\\OoDQZzSsbGB&qgT()[]{}")
LATIN_CHARS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#%@?$+=*<>~^_-:;\"'`,."
                      if c not in DIGIT_SHAPED)
SYMBOL_CHARS = "".join(chr(c) for c in range(33, 127))
FAMILIES = {"stroke_font": 0.4, "scribble": 0.3, "digit_fragment": 0.3}  # share of the pool
CANVAS = 128


def frame_like_mnist(ink: np.ndarray) -> np.ndarray:
    """A float ink image (white on black, any size) framed as MNIST: the ink's bounding box scaled to a 20 px
    longer side, its centre of mass moved to the centre of 28x28. uint8 [28, 28]; all zero without ink."""
    from PIL import Image
    from scipy import ndimage

    peak = float(ink.max()) if ink.size else 0.0
    if peak <= 0:
        return np.zeros((28, 28), np.uint8)
    rows, cols = np.nonzero(ink > 0.05 * peak)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray((255.0 * crop / peak).astype(np.uint8)).resize(size, Image.LANCZOS),
                       np.float64)
    field = np.zeros((28, 28))
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    field[top:top + size[1], left:left + size[0]] = small
    if field.sum() <= 0:
        return np.zeros((28, 28), np.uint8)
    cy, cx = ndimage.center_of_mass(field)
    field = ndimage.shift(field, (13.5 - cy, 13.5 - cx), order=1, mode="constant")
    return np.clip(field, 0, 255).round().astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _font_strokes(font: str) -> dict[str, list]:
    """{character: [stroke: [(x, y), ...]]} of a Hershey font (y down), characters with ink only."""
    try:
        from HersheyFonts import HersheyFonts
    except ImportError as exc:  # a dependency of the project (pyproject.toml); say which package provides it
        raise ImportError("the training negatives need the Hershey stroke fonts: pip install Hershey-Fonts") from exc
    hf = HersheyFonts()
    hf.load_default_font(font)
    chars = SYMBOL_CHARS if font in SYMBOL_FONTS else LATIN_CHARS
    out = {}
    for char in chars:
        strokes = [list(s) for s in hf.strokes_for_text(char)]
        if strokes and any(len(s) > 1 for s in strokes):
            out[char] = strokes
    return out


def read_stroke_fonts() -> None:
    """Read every Hershey font the generator draws from (once per process: decompressing them is ~0.1 s a font)."""
    for font in LATIN_FONTS + SYMBOL_FONTS:
        _font_strokes(font)


def _draw(strokes: list, rng: np.random.Generator) -> np.ndarray:
    """Strokes (any units) drawn on a CANVAS x CANVAS field with a random affine distortion and pen width."""
    from PIL import Image, ImageDraw

    points = np.concatenate([np.asarray(s, np.float64) for s in strokes])
    centre = (points.max(axis=0) + points.min(axis=0)) / 2
    extent = max(float(np.ptp(points, axis=0).max()), 1e-6)
    angle = math.radians(rng.uniform(-15, 15))
    shear, aspect = rng.uniform(-0.3, 0.3), math.exp(rng.uniform(-0.25, 0.25))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine = rot @ np.array([[aspect, shear], [0.0, 1.0 / aspect]]) * (0.7 * CANVAS / extent)
    width = int(rng.integers(5, 15))  # MNIST strokes are 10-20% of the digit's height
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        xy = (np.asarray(stroke, np.float64) - centre) @ affine.T + CANVAS / 2
        pts = [tuple(p) for p in xy]
        if len(pts) == 1:
            pts = pts * 2
        draw.line(pts, fill=255, width=width, joint="curve")
        r = width / 2  # round pen ends
        for x, y in (pts[0], pts[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas, np.float64)


def stroke_font_glyphs(n: int, rng: np.random.Generator) -> np.ndarray:
    """n glyphs of the Hershey Latin and symbol fonts (no digit-shaped characters), drawn and framed."""
    fonts = LATIN_FONTS + SYMBOL_FONTS
    out = np.zeros((n, 1, 28, 28), np.uint8)
    for i in range(n):
        glyphs = _font_strokes(fonts[int(rng.integers(len(fonts)))])
        chars = sorted(glyphs)
        out[i, 0] = frame_like_mnist(_draw(glyphs[chars[int(rng.integers(len(chars)))]], rng))
    return out


def _bezier(rng: np.random.Generator) -> np.ndarray:
    p = rng.uniform(0, 1, size=(4, 2))
    t = np.linspace(0, 1, 24)[:, None]
    return ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3])


def _scribble(rng: np.random.Generator) -> list:
    """One procedural shape as strokes in the unit square: never a single straight stroke or a lone loop."""
    kind = int(rng.integers(6))
    if kind == 0:  # two to four free curves
        return [_bezier(rng) for _ in range(int(rng.integers(2, 5)))]
    if kind == 1:  # zigzag
        k = int(rng.integers(4, 9))
        x = np.linspace(0, 1, k)
        y = np.where(np.arange(k) % 2 == 0, 0.0, 1.0) * rng.uniform(0.3, 1.0) + rng.normal(0, 0.05, k)
        return [np.stack([x, y], 1)]
    if kind == 2:  # spiral of 1.5 to 3 turns
        t = np.linspace(0, rng.uniform(3, 6) * math.pi, 60)
        r = t / t[-1]
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    if kind == 3:  # hatching: 3 to 6 parallel strokes, sometimes crossed
        k = int(rng.integers(3, 7))
        strokes = [np.array([[i / k, 0.0], [i / k + 0.3, 1.0]]) for i in range(k)]
        if rng.random() < 0.5:
            strokes += [np.array([[0.0, i / k], [1.0, i / k + 0.2]]) for i in range(k)]
        return strokes
    if kind == 4:  # a cross, an asterisk or a star of 3 to 5 strokes through one point
        k = int(rng.integers(2, 6))
        angles = rng.uniform(0, math.pi, k)
        return [np.array([[-math.cos(a), -math.sin(a)], [math.cos(a), math.sin(a)]]) for a in angles]
    # wave: a sine of 2 to 4 periods
    x = np.linspace(0, 1, 48)
    return [np.stack([x, 0.25 * np.sin(2 * math.pi * rng.uniform(2, 4) * x + rng.uniform(0, 6))], 1)]


def scribbles(n: int, rng: np.random.Generator) -> np.ndarray:
    """n procedural strokes and scribbles, drawn and framed."""
    out = np.zeros((n, 1, 28, 28), np.uint8)
    for i in range(n):
        out[i, 0] = frame_like_mnist(_draw([s * 100 for s in _scribble(rng)], rng))
    return out


def _part(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The digit cut along a random line through its centre of mass, one side kept (30-70% of its ink)."""
    ys, xs = np.mgrid[0:28, 0:28]
    total = digit.sum()
    cy, cx = (ys * digit).sum() / total, (xs * digit).sum() / total
    a = rng.uniform(0, 2 * math.pi)
    kept = digit * (((xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)) > rng.uniform(-2, 2))
    return kept if 0.3 <= kept.sum() / total <= 0.7 else None


def _overlap(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two digits on one field, the second shifted by 3-8 px."""
    field = np.zeros((44, 44))
    field[8:36, 8:36] = a
    dy, dx = (int(rng.integers(3, 9)) * int(rng.choice([-1, 1])) for _ in range(2))
    field[8 + dy:36 + dy, 8 + dx:36 + dx] = np.maximum(field[8 + dy:36 + dy, 8 + dx:36 + dx], b)
    return field


def _cut_shift(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit cut across (a row or a column near its middle) and one half shifted sideways by 5-9 px."""
    shift = int(rng.integers(5, 10)) * int(rng.choice([-1, 1]))
    cut = int(rng.integers(11, 17))
    horizontal = rng.random() < 0.5
    source = digit if horizontal else digit.T
    field = np.zeros((28, 46))
    field[:cut, 9:37] = source[:cut]
    field[cut:, 9 + shift:37 + shift] = source[cut:]
    return field if horizontal else field.T


def digit_fragments(n: int, rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """n hard negatives made from these digits (uint8 [N, 1, 28, 28] / int [N]): a part of one, two of different
    classes overlapped, or one cut and shifted; each re-framed as MNIST."""
    if len(digits) < 2 or len(np.unique(labels)) < 2:
        raise ValueError("hard negatives need digits of at least two classes")
    out = np.zeros((n, 1, 28, 28), np.uint8)
    i = 0
    while i < n:
        a = int(rng.integers(len(digits)))
        digit = digits[a, 0].astype(np.float64)
        kind = i % 3
        if kind == 0:
            ink = _part(digit, rng)
            if ink is None:
                continue
        elif kind == 1:
            b = int(rng.integers(len(digits)))
            if labels[b] == labels[a]:
                continue
            ink = _overlap(digit, digits[b, 0].astype(np.float64), rng)
        else:
            ink = _cut_shift(digit, rng)
        out[i, 0] = frame_like_mnist(ink)
        i += 1
    return out


def negative_images(count: int, seed: int, digits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`count` training negatives (uint8 [count, 1, 28, 28]) in FAMILIES' shares, shuffled; the same for the same
    seed and digits. digits/labels: the digits to make the hard negatives from (never test images)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    digits, labels = np.asarray(digits), np.asarray(labels)
    sizes = [int(count * share) for share in FAMILIES.values()]
    sizes[0] += count - sum(sizes)
    rngs = [np.random.default_rng([seed, k]) for k in range(len(FAMILIES))]
    parts = [stroke_font_glyphs(sizes[0], rngs[0]), scribbles(sizes[1], rngs[1]),
             digit_fragments(sizes[2], rngs[2], digits, labels) if sizes[2] else np.zeros((0, 1, 28, 28), np.uint8)]
    pool = np.concatenate(parts)
    return pool[np.random.default_rng([seed, 99]).permutation(len(pool))]
