"""bench/real_inputs: the capture generators (format, size, mode, determinism, the look each promises) and the
measurement's core on synthetic digits with a fake model (no MNIST, no exported model). A few seconds.
Run: .venv/bin/python -m pytest tests/bench/test_real_inputs.py -q"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench import real_inputs
from bench.real_inputs_render import GENERATORS, canvas, chalkboard, photo, scan, upscaled


def _seven() -> np.ndarray:
    """A smooth, MNIST-like 7: light anti-aliased stroke on black, 28x28."""
    image = Image.new("L", (112, 112), 0)
    ImageDraw.Draw(image).line([(28, 24), (84, 24), (48, 92)], fill=255, width=12)
    return np.asarray(image.resize((28, 28), Image.Resampling.LANCZOS))


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ink_mask(digit: np.ndarray, image: Image.Image) -> np.ndarray:
    """Where the ink is, found from the rendered image's own contrast with its median (the background)."""
    gray = np.asarray(image.convert("L"), np.float32)
    return np.abs(gray - np.median(gray)) > 40


EXPECTED = {  # kind: (formats, modes, sizes or None)
    "photo": ({"JPEG"}, {"RGB"}, {(240, 180)}),
    "scan": ({"JPEG", "PNG"}, {"L", "RGB"}, None),
    "canvas": ({"PNG"}, {"RGBA", "RGB"}, {(280, 280), (400, 400)}),
    "chalkboard": ({"JPEG"}, {"RGB"}, {(320, 240)}),
    "upscaled": ({"PNG"}, {"L"}, None),
}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generators_write_promised_files_deterministically(kind):
    digit = _seven()
    formats, modes, sizes = EXPECTED[kind]
    seen_modes = set()
    for seed in range(8):
        data = GENERATORS[kind](digit, _rng(seed))
        assert isinstance(data, bytes)
        image = _open(data)
        assert image.format in formats and image.mode in modes
        seen_modes.add(image.mode)
        if sizes is not None:
            assert image.size in sizes
        if kind == "scan":
            assert 300 <= image.width <= 400 and image.height == 300
        if kind == "upscaled":
            assert image.width == image.height and 56 <= image.width <= 224
    assert GENERATORS[kind](digit, _rng(3)) == GENERATORS[kind](digit, _rng(3))
    assert GENERATORS[kind](digit, _rng(3)) != GENERATORS[kind](digit, _rng(4))
    if kind == "canvas":
        assert seen_modes == {"RGBA", "RGB"}  # both exports show up over a few seeds


def test_photo_has_uneven_light_and_dark_ink_on_light_paper():
    digit = _seven()
    for seed in range(5):
        image = _open(photo(digit, _rng(seed)))
        gray = np.asarray(image.convert("L"), np.float32)
        corners = [gray[:20, :20].mean(), gray[:20, -20:].mean(), gray[-20:, :20].mean(), gray[-20:, -20:].mean()]
        assert max(corners) - min(corners) > 15  # a lighting gradient across the frame
        ink = _ink_mask(digit, image)
        assert ink.sum() > 200
        assert gray[ink].mean() < gray[~ink].mean() - 50  # dark ink on light paper
        rgb = np.asarray(image, np.float32)[~ink]
        assert np.abs(rgb.mean(axis=0) - rgb.mean()).max() > 0.5  # the paper is tinted, not grey


def test_scan_is_white_page_with_dark_ink():
    image = _open(scan(_seven(), _rng(1)))
    gray = np.asarray(image.convert("L"), np.float32)
    assert 228 <= np.median(gray) <= 252
    assert gray.min() < 100


def test_canvas_rgba_has_transparent_background_and_opaque_stroke():
    for seed in range(12):
        image = _open(canvas(_seven(), _rng(seed)))
        if image.mode != "RGBA":
            continue
        alpha = np.asarray(image)[..., 3]
        assert alpha[0].max() == 0 and alpha[-1].max() == 0 and alpha[:, 0].max() == 0 and alpha[:, -1].max() == 0
        assert (alpha == 255).sum() > 0.02 * alpha.size  # a thick, opaque stroke
        rows = np.flatnonzero(alpha.max(axis=1) > 127)
        assert 0.5 <= (rows[-1] - rows[0] + 1) / image.height <= 0.9
        return
    pytest.fail("no RGBA canvas in 12 seeds")


def test_chalkboard_ink_is_lighter_than_the_board():
    digit = _seven()
    image = _open(chalkboard(digit, _rng(2)))
    gray = np.asarray(image.convert("L"), np.float32)
    assert np.median(gray) < 90  # a dark board
    ink = _ink_mask(digit, image)
    assert ink.sum() > 100 and gray[ink].mean() > np.median(gray) + 60


def test_upscaled_is_the_digit_white_on_black():
    digit = _seven()
    image = _open(upscaled(digit, _rng(0)))
    back = np.asarray(image.resize((28, 28), Image.Resampling.BILINEAR), np.float32)
    assert np.corrcoef(back.ravel(), digit.astype(np.float32).ravel())[0, 1] > 0.9


def test_photo_renders_at_other_sizes():
    image = _open(photo(_seven(), _rng(0), size=(640, 480)))
    assert image.size == (640, 480) and image.format == "JPEG"


def _digits(n: int = 10):
    images = np.stack([_seven()] * n)
    labels = np.full(n, 7, np.int64)
    return np.arange(100, 100 + n), images, labels


def _fake_model(batch: np.ndarray) -> np.ndarray:
    """Says 7 when the 28x28 field has ink in its top rows and its lower half (a 7 does), else 1."""
    batch = batch[:, 0].astype(np.float32)
    is_seven = (batch[:, 3:10].max(axis=(1, 2)) > 100) & (batch[:, 16:26].max(axis=(1, 2)) > 100)
    logits = np.zeros((len(batch), 10), np.float32)
    logits[np.arange(len(batch)), np.where(is_seven, 7, 1)] = 1.0
    return logits


def _simple_preprocess(index: int, data: bytes) -> np.ndarray:
    """Independent of serving.images.decoding: flatten onto white, light-on-dark, plain resize; image 0 is rejected."""
    if index == 0:
        raise ValueError("rejected")
    image = _open(data).convert("RGBA")
    flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat.alpha_composite(image)
    gray = np.asarray(flat.convert("L"))
    if np.median(gray) > 127:
        gray = 255 - gray
    return np.asarray(Image.fromarray(gray).resize((28, 28), Image.Resampling.BILINEAR))


def test_measure_core_with_a_fake_model():
    ids, images, labels = _digits()
    result = real_inputs.measure(images, labels, ids, ["upscaled", "canvas"], _fake_model, _simple_preprocess)
    assert result["clean"] == {"images": 10, "accuracy": 100.0, "accepted": None}
    rows = {r["kind"]: r for r in result["kinds"]}
    assert rows["upscaled"]["rejected"] == 1 and rows["upscaled"]["accuracy"] == 90.0
    assert rows["upscaled"]["gap"] == pytest.approx(10.0)
    assert rows["canvas"]["clean_accuracy"] == 100.0 and rows["canvas"]["preprocess_ms_median"] > 0
    assert rows["canvas"]["accuracy"] == 90.0 and rows["canvas"]["rejected"] == 1
    assert result["samples"]["canvas"]["seen"].shape == (10, 28, 28)
    # The same digit renders the same whatever else is in the set (image i depends on seed, kind, id).
    again = real_inputs.render("canvas", images[3:5], ids[3:5], 0)
    assert again == result["samples"]["canvas"]["files"][3:5]


def test_measure_says_how_many_real_digits_the_open_set_answer_takes_for_digits():
    """accepts: the repository's known_score >= threshold; a refused input is never 'accepted'."""
    ids, images, labels = _digits()
    faint = lambda batch: batch.reshape(len(batch), -1).max(axis=1) >= 200  # noqa: E731 - "digits" have bright ink
    result = real_inputs.measure(images, labels, ids, ["upscaled"], _fake_model, _simple_preprocess, accepts=faint)
    row = result["kinds"][0]
    seen, predictions = result["samples"]["upscaled"]["seen"], result["samples"]["upscaled"]["predictions"]
    expected = 100.0 * ((predictions >= 0) & (seen.reshape(10, -1).max(axis=1) >= 200)).mean()
    assert row["accepted"] == pytest.approx(expected) and row["accepted"] <= 90.0  # one input is refused
    assert row["clean_accepted"] == result["clean"]["accepted"] == pytest.approx(
        100.0 * (images.reshape(10, -1).max(axis=1) >= 200).mean())
    table = real_inputs.markdown(result, "cmd", "pipeline")
    assert "accepted as digits (clean)" in table and f"{row['accepted']:.1f}% ({row['clean_accepted']:.1f}%)" in table


def test_cli_end_to_end_with_fakes(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(real_inputs, "load_test_digits", lambda cache_dir, count, seed: _digits(count))
    monkeypatch.setattr(real_inputs, "load_onnx_model", lambda repository: _fake_model)
    monkeypatch.setattr(real_inputs, "load_acceptance", lambda repository: None)  # an unfitted repository
    strip, saved = tmp_path / "strip.png", tmp_path / "files"
    argv = ["--model-repository", str(tmp_path), "--kinds", "photo,upscaled", "--count", "4",
            "--strip", str(strip), "--save", str(saved)]
    assert real_inputs.main(argv) == 0
    out = capsys.readouterr().out
    assert "| photo | 4 |" in out and "| upscaled | 4 |" in out and "python -m bench.real_inputs" in out
    assert _open(strip.read_bytes()).format == "PNG"
    assert sorted(p.name for p in (saved / "photo").iterdir())[0] == "00100_label7.jpg"
    assert len(list((saved / "upscaled").glob("*_label7.png"))) == 4

    assert real_inputs.main(["--model-repository", str(tmp_path), "--kinds", "upscaled", "--count", "3",
                             "--json", "--preprocess", "serving.images.decoding:decode_image"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kinds"][0]["images"] == 3 and report["pipeline"] == "serving.images.decoding:decode_image"


def test_preprocess_can_be_loaded_from_a_file(tmp_path):
    source = tmp_path / "pipeline.py"
    source.write_text("import numpy as np\ndef decode(index, data):\n    return np.zeros((28, 28), np.uint8)\n")
    function = real_inputs.load_function(f"{source}:decode")
    assert function(0, b"").shape == (28, 28)


def test_timing_rows():
    rows = real_inputs.timing(np.stack([_seven()] * 2), _simple_preprocess, sizes=((64, 48),), n=3)
    assert rows[0]["size"] == "64x48" and rows[0]["images"] == 3 and rows[0]["ms_median"] > 0
    assert rows[0]["rejected"] == 1  # _simple_preprocess rejects index 0
