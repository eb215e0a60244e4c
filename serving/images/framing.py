"""MNIST framing of a grayscale capture: polarity, then the digit found and normalised as MNIST's digits were.

Photos, scans and drawings are not MNIST arrays: the page is lit unevenly, the sensor is noisy, JPEG adds
blocks, the frame holds specks, ruled lines or the page's edge, and the digit is small and off-centre.
fit_digit (FIT_DIGIT, and FIT_AUTO for anything not 28x28), on a light-on-dark image (see is_light_background):
1. Flatten the lighting: the background is estimated at a scale larger than any stroke (a grey-level opening
   on a coarse copy, about a quarter of the frame wide, then smoothed) and subtracted.
2. Find the ink: Otsu's threshold on the flattened, lightly smoothed image; no ink at all (the two classes no
   further apart than the noise allows) gives an all-black field, not an error.
3. Keep the digit: thin rows/columns of ink spanning most of the frame (ruled lines) are removed; of the
   connected components, those lying along the frame's border (a page edge) are dropped; the digit is the
   largest remaining one near the centre, with the components close to it that are not specks.
4. MNIST's own normalisation (LeCun et al.), from the flattened grey levels of the kept ink: background to 0,
   the ink's robust peak to 255, cropped to the digit's bounding box, resized (Lanczos, antialiased) so the
   longer side is 20 px keeping the aspect ratio, and placed in a black 28x28 field so that its centre of mass
   lands on the field's centre (13.5, 13.5), kept inside the field.
FIT_RESIZE (resize_to) is a plain Lanczos resize to 28x28.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["SIDE", "BOX", "fit_digit", "find_digit", "is_light_background", "resize_to"]

SIDE = 28
BOX = 20  # MNIST: the digit's longer side is normalised to 20 px inside the 28 px field
_COARSE = 48  # longer side of the copy the background is estimated on
_BACKGROUND_WINDOW = 0.25  # opening width, as a fraction of the frame's shorter side (wider than any stroke)
_MIN_CONTRAST = 12.0  # grey levels between ink and background, at least
_NOISE_FACTOR = 6.0  # ... and this many times the background's noise
_LINE_SPAN = 0.6  # a ruled line spans at least this fraction of the frame
_LINE_THICKNESS = 0.025  # ... and is at most this fraction of the frame thick
_EDGE_CONTACT = 0.3  # a component lying along this fraction of a border is the page's edge, not ink
_SPECK = 0.05  # components smaller than this fraction of the digit's main one are specks
_NEAR = 0.35  # components further than this fraction of the main one's size from its box are not the digit


def is_light_background(gray: np.ndarray) -> bool:
    """Dark ink on light paper (so the image must be inverted for the model): the typical pixel (the median:
    ink covers less than half of any sensible frame) lies nearer the brightest than the darkest pixel. Extremes
    are taken on a box-averaged copy (at most 2x2 per output pixel below 96 px, so single noisy pixels do not
    count); percentiles would miss a small digit."""
    height, width = gray.shape
    if min(height, width) < 3:
        values = gray.astype(np.float32)
    else:
        factor = max(2, max(height, width) // 96)
        values = np.asarray(Image.fromarray(gray).reduce(factor), dtype=np.float32)
    low, high, median = float(values.min()), float(values.max()), float(np.median(values))
    return median - low > high - median


def _resize(values: np.ndarray, width: int, height: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    """Resize of a float [H, W] array (Pillow mode F), clipped to 0..255."""
    out = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), resample)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 255.0)


def resize_to(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """FIT_RESIZE: uint8 [H, W] → uint8 [height, width], Lanczos."""
    return np.round(_resize(gray.astype(np.float32), width, height)).astype(np.uint8)


def _flatten(values: np.ndarray) -> np.ndarray:
    """Subtract the lighting: a grey opening (min then max filter) wider than a stroke, on a coarse copy."""
    height, width = values.shape
    scale = min(1.0, _COARSE / max(height, width))
    coarse_w, coarse_h = max(1, round(width * scale)), max(1, round(height * scale))
    coarse = _resize(values, coarse_w, coarse_h, Image.Resampling.BOX) if scale < 1.0 else values
    window = max(3, int(_BACKGROUND_WINDOW * min(coarse_h, coarse_w)) | 1)
    background = ndimage.grey_opening(coarse, size=(window, window), mode="nearest")
    # Second estimate from the background pixels only (a local mean that skips the ink found with the first),
    # so a stroke as wide as the window (a marker on a small pad) does not lift the background under it.
    above = coarse - background
    threshold, _, _ = _otsu(above)
    # Holes filled: the middle of a stroke wider than the window is missed by the opening but ringed by its edges.
    paper = ~ndimage.binary_dilation(_fill_holes(above > threshold), iterations=1)
    weight = ndimage.uniform_filter(paper.astype(np.float32), size=window, mode="nearest")
    local = ndimage.uniform_filter(coarse * paper, size=window, mode="nearest")
    background = np.where(weight > 0.05, local / np.maximum(weight, 1e-6), background)
    if scale < 1.0:
        background = _resize(background, width, height, Image.Resampling.BILINEAR)
    return np.clip(values - background, 0.0, None)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """mask with every region of False not connected to the border set True (one labelling pass, unlike
    ndimage.binary_fill_holes, which dilates until nothing changes)."""
    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.zeros(count + 1, bool)
    outside[border] = True
    outside[0] = False
    return ~outside[labels]


def _otsu(values: np.ndarray) -> tuple[float, float, float]:
    """(threshold, mean below, mean above) by Otsu's method on a 256-bin histogram of values (>= 0)."""
    top = float(values.max())
    if top <= 0.0:
        return 0.0, 0.0, 0.0
    step = top / 255.0
    hist = np.bincount((values * (1.0 / step)).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    centres = np.arange(256, dtype=np.float64) * step
    weight = np.cumsum(hist)
    mass = np.cumsum(hist * centres)
    total, total_mass = weight[-1], mass[-1]
    below, above = weight, total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = mass / below
        mean_above = (total_mass - mass) / above
        between = below * above * (mean_below - mean_above) ** 2
    between[~np.isfinite(between)] = -1.0
    k = int(np.argmax(between))
    return (k + 0.5) * step, float(mean_below[k]), float(mean_above[k])


def _remove_ruled_lines(mask: np.ndarray) -> None:
    """Clear thin rows (and columns) of ink that span most of the frame, in place."""
    for axis in (1, 0):  # rows, then columns
        length = mask.shape[axis]
        thickness = max(2, round(_LINE_THICKNESS * mask.shape[1 - axis]))
        full = mask.sum(axis=axis) >= _LINE_SPAN * length
        if not full.any():
            continue
        labels, count = ndimage.label(full)
        for run in ndimage.find_objects(labels):
            if run[0].stop - run[0].start <= thickness:
                if axis == 1:
                    mask[run[0], :] = False
                else:
                    mask[:, run[0]] = False


def _keep_digit(mask: np.ndarray) -> np.ndarray | None:
    """The components that make up the digit (boolean mask), or None when nothing digit-like is left."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return None
    height, width = mask.shape
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(labels)
    edge = [np.bincount(labels[0], minlength=count + 1), np.bincount(labels[-1], minlength=count + 1),
            np.bincount(labels[:, 0], minlength=count + 1), np.bincount(labels[:, -1], minlength=count + 1)]
    inside, along_border = [], []
    for i in np.flatnonzero(areas >= 0.01 * areas.max()) + 1:  # specks of noise are never the digit: skip them
        box = boxes[i - 1]
        along = max(edge[0][i] / width, edge[1][i] / width, edge[2][i] / height, edge[3][i] / height)
        cy, cx = (box[0].start + box[0].stop) / 2.0, (box[1].start + box[1].stop) / 2.0
        off_centre = np.hypot((cy - height / 2.0) / height, (cx - width / 2.0) / width)
        # Lying along a border: the page's edge or the table beyond it, unless nothing else is there (a digit
        # drawn up to the edges of a drawing pad).
        (along_border if along >= _EDGE_CONTACT else inside).append((areas[i - 1] * (1.0 - off_centre), i))
    candidates = inside if inside and max(inside)[0] >= _SPECK * max(along_border, default=(0.0,))[0] \
        else inside + along_border
    main = max(candidates)[1]
    main_box, main_area = boxes[main - 1], areas[main - 1]
    reach = _NEAR * max(main_box[0].stop - main_box[0].start, main_box[1].stop - main_box[1].start)
    keep = [main]
    for _, i in candidates:
        box = boxes[i - 1]
        if i == main or areas[i - 1] < _SPECK * main_area:
            continue
        gap_y = max(main_box[0].start - box[0].stop, box[0].start - main_box[0].stop, 0)
        gap_x = max(main_box[1].start - box[1].stop, box[1].start - main_box[1].stop, 0)
        if max(gap_y, gap_x) <= reach:
            keep.append(i)
    wanted = np.zeros(count + 1, bool)
    wanted[keep] = True
    return wanted[labels]


def find_digit(gray: np.ndarray) -> np.ndarray | None:
    """float32 [h, w] crop of the digit (light on black, 0..255, MNIST-like levels), or None when there is no ink."""
    values = _flatten(gray.astype(np.float32))
    smooth = ndimage.uniform_filter(values, 3, mode="nearest")
    threshold, background, ink = _otsu(smooth)
    below = smooth[smooth <= threshold]
    noise = 1.2533 * float(np.abs(below - background).mean()) if ink > 0 and below.size else 0.0  # sigma, Gaussian
    if ink - background < max(_MIN_CONTRAST, _NOISE_FACTOR * noise):
        return None  # a blank (or uniformly noisy) page
    mask = smooth > threshold
    _remove_ruled_lines(mask)
    kept = _keep_digit(mask)
    if kept is None:
        return None
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    size = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    # The strokes' soft edges: about a pixel of the final 20 px box around the thresholded ink.
    reach = max(2, round(size / BOX))
    region = ndimage.maximum_filter(kept.view(np.uint8), size=2 * reach + 1, mode="constant") > 0
    peak = float(np.percentile(values[kept], 95)) - background
    if peak <= 0.0:
        return None
    digit = np.clip((values - background) * (255.0 / peak), 0.0, 255.0) * region
    # The box holds every pixel above a tenth of the ink's level, soft edges included, as MNIST's did.
    rows, cols = np.flatnonzero((digit > 25.5).any(axis=1)), np.flatnonzero((digit > 25.5).any(axis=0))
    if not rows.size:
        return None
    return digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _place(crop: np.ndarray) -> np.ndarray:
    """MNIST's last step: longer side to 20 px keeping the aspect ratio, centre of mass at the field's centre."""
    height, width = crop.shape
    scale = BOX / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    patch = _resize(crop, new_w, new_h)
    mass = float(patch.sum())
    if mass <= 0.0:
        return np.zeros((SIDE, SIDE), np.uint8)
    cy = float((patch.sum(axis=1) * np.arange(new_h)).sum()) / mass
    cx = float((patch.sum(axis=0) * np.arange(new_w)).sum()) / mass
    centre = (SIDE - 1) / 2.0
    top = min(max(round(centre - cy), 0), SIDE - new_h)
    left = min(max(round(centre - cx), 0), SIDE - new_w)
    field = np.zeros((SIDE, SIDE), np.float32)
    field[top:top + new_h, left:left + new_w] = patch
    return np.round(field).astype(np.uint8)


def fit_digit(gray: np.ndarray) -> np.ndarray:
    """MNIST framing of a light-on-dark uint8 [H, W] image → uint8 [28, 28] (see the module docstring); a blank
    image becomes an all-black field."""
    crop = find_digit(gray)
    if crop is None:
        return np.zeros((SIDE, SIDE), np.uint8)
    return _place(crop)
