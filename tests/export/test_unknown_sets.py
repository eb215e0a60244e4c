"""export.unknowns' character sets and export.unknown_fonts: characters carried image by image, look-alikes, scripts
without their digits, fonts from Debian's cache (never the training negatives' Hershey fonts), and a package that
cannot be had costing one logged line.

The tests drawing Debian's real fonts use the cache (`$LSOFTMAX_CACHE/fonts`), fetching it with apt-get when it is
missing, and skip when it cannot be had; the others run offline on fake packages made of matplotlib's DejaVu."""

import ast
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from export import unknown_fonts, unknowns
from export.debian import sha256
from export.unknown_fonts import FONT_PACKAGES, SET_FONTS, font_cache_dir, package_fonts, set_fonts
from export.unknowns import (CHARACTER_SETS, DEVANAGARI, FONT_SETS, GREEK, LETTERS, LOOKALIKES, character_sets,
                             is_lookalike, render_characters)

ROOT = Path(__file__).resolve().parents[2]


def _cycled(chars: str, n: int) -> list[str]:
    return [chars[i % len(chars)] for i in range(n)]


# -- the character lists -------------------------------------------------------------------------------------------


def test_lookalikes_are_drawn_characters_each_with_a_digit():
    drawn = set(LETTERS) | set(GREEK) | set(DEVANAGARI)
    assert set(LOOKALIKES) <= drawn
    assert all(len(c) == 1 and not c.isdigit() for c in LOOKALIKES)
    assert set(LOOKALIKES.values()) <= set("0123456789")
    assert {"l", "I", "O", "o", "S", "Z", "B", "g", "q"} <= set(LOOKALIKES)  # the ones docs/open_set.md names
    mask = is_lookalike(np.array(list("lOAx&")))
    assert mask.tolist() == [True, True, False, False, True]


def test_the_scripts_hold_letters_and_no_digits():
    for chars, script in ((GREEK, "GREEK"), (DEVANAGARI, "DEVANAGARI")):
        assert len(set(chars)) == len(chars)
        for c in chars:
            assert unicodedata.name(c).startswith(f"{script} ") and unicodedata.category(c) in ("Lu", "Ll", "Lo"), c
            assert not c.isdigit() and unicodedata.decimal(c, None) is None, c
    assert not set(DEVANAGARI) & {chr(c) for c in range(0x0966, 0x0970)}  # ० .. ९
    assert not set("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧο") & set(GREEK)  # drawn as Latin letters are: not another script
    assert not set(GREEK) & set(LETTERS)
    assert set(CHARACTER_SETS) == {"letters"} | set(FONT_SETS) == {"letters"} | set(SET_FONTS)


# -- drawing, offline --------------------------------------------------------------------------------------------------


def test_render_characters_is_deterministic_and_carries_the_characters():
    fonts = unknowns._fonts()
    grouped = [fonts[0], fonts[1:4]]  # a file alone, and a group drawn as one
    images, chars = render_characters(9, np.random.default_rng(4), "AbΩ", grouped)
    assert images.dtype == np.uint8 and images.shape == (9, 1, 28, 28)
    assert chars.shape == (9,) and chars.tolist() == _cycled("AbΩ", 9)
    assert images.reshape(9, -1).max(1).min() > 0
    again, _ = render_characters(9, np.random.default_rng(4), "AbΩ", grouped)
    assert np.array_equal(images, again)
    assert not np.array_equal(images, render_characters(9, np.random.default_rng(5), "AbΩ", grouped)[0])


def test_letters_are_unknown_sets_letters_with_characters():
    drawn = character_sets(n=7, seed=2, names=("letters",))
    assert set(drawn) == {"letters"}
    assert np.array_equal(drawn["letters"].images, unknowns.unknown_sets(n=7, seed=2, names=("letters",))["letters"])
    assert drawn["letters"].characters.tolist() == _cycled(LETTERS, 7)
    assert list(drawn["letters"].fonts) == ["matplotlib"]
    assert all("DejaVu" in p.name for p in drawn["letters"].fonts["matplotlib"])


def test_lookalike_split_partitions_a_set():
    chars = np.array(_cycled(LETTERS, 200))
    mask = is_lookalike(chars)
    assert mask.any() and (~mask).any()
    assert set(chars[mask]) == set(LOOKALIKES) & set(LETTERS)
    assert set(chars[mask]).isdisjoint(chars[~mask]) and set(chars[mask]) | set(chars[~mask]) == set(chars)


# -- a package that cannot be had, offline (fake packages of DejaVu files) -------------------------------------------


@pytest.fixture
def fake_packages(monkeypatch, tmp_path):
    """Greek drawn from two fake packages, `fake-good` (DejaVuSans.ttf, fetched by copying) and `fake-broken`
    (its fetch raises); the fetches made are recorded."""
    dejavu = next(p for p in unknowns._fonts() if p.name == "DejaVuSans.ttf")
    monkeypatch.setitem(FONT_PACKAGES, "fake-good", {"DejaVuSans.ttf": sha256(dejavu)})
    monkeypatch.setitem(FONT_PACKAGES, "fake-broken", {"Nothing.ttf": "0" * 64})
    monkeypatch.setitem(SET_FONTS, "greek", ("fake-broken", "fake-good"))
    fetched = []

    def fetch(package, files, root, timeout=300, deb=None):
        fetched.append(package)
        if package != "fake-good":
            raise OSError("apt-get download failed: E: Unable to locate package " + package)
        Path(root).mkdir(parents=True)
        shutil.copyfile(dejavu, Path(root) / "DejaVuSans.ttf")

    def download(packages, folder, timeout=300):  # the mirror lacks fake-broken: the joint download fails
        raise OSError("apt-get download failed: E: Unable to locate package fake-broken")

    monkeypatch.setattr(unknown_fonts, "fetch_package_files", fetch)
    monkeypatch.setattr(unknown_fonts, "download", download)
    return tmp_path / "fonts", fetched


def test_a_package_that_cannot_be_had_is_one_line_and_the_set_goes_on(fake_packages):
    cache, fetched = fake_packages
    lines = []
    drawn = character_sets(n=5, seed=0, names=("greek",), cache_dir=cache, log=lines.append)
    assert len(lines) == 1 and "fake-broken" in lines[0] and "going on without it" in lines[0]
    assert drawn["greek"].fonts == {"fake-good": [cache / "fake-good" / "DejaVuSans.ttf"]}
    assert drawn["greek"].characters.tolist() == _cycled(GREEK, 5) and drawn["greek"].images.shape == (5, 1, 28, 28)
    # cached now: the good one is not fetched again, and the same images come back
    again = character_sets(n=5, seed=0, names=("greek",), cache_dir=cache, log=lines.append)
    assert fetched == ["fake-broken", "fake-good", "fake-broken"]
    assert np.array_equal(again["greek"].images, drawn["greek"].images)


def test_a_set_none_of_whose_packages_can_be_had_is_left_out(fake_packages, monkeypatch):
    cache, _ = fake_packages
    monkeypatch.setitem(SET_FONTS, "greek", ("fake-broken",))
    lines = []
    drawn = character_sets(n=4, seed=0, names=("letters", "greek"), cache_dir=cache, log=lines.append)
    assert set(drawn) == {"letters"}
    assert len(lines) == 2 and "fake-broken" in lines[0] and lines[1].startswith("greek left out")


def test_a_cached_font_that_differs_or_no_fetch_is_one_line(fake_packages):
    cache, fetched = fake_packages
    lines = []
    assert package_fonts("fake-good", cache, fetch=False, log=lines.append) is None  # not cached, no fetch
    assert fetched == [] and len(lines) == 1 and "not in the cache" in lines[0]
    (cache / "fake-good").mkdir(parents=True)
    (cache / "fake-good" / "DejaVuSans.ttf").write_bytes(b"not a font")
    assert package_fonts("fake-good", cache, log=lines.append) is None
    assert fetched == [] and len(lines) == 2 and "pinned sha256" in lines[1]


# -- Debian's fonts (the cache, fetched when missing; skipped when they cannot be had) -------------------------------


@pytest.fixture(scope="module")
def debian_fonts():
    """{set: {package: files}} from the cache, fetching what is missing; skips when the first package cannot be
    had (no apt, no mirror), so that an offline machine does not wait on each package in turn."""
    first = SET_FONTS["handwritten_letters"][0]
    lines = []
    if package_fonts(first, log=lines.append) is None:
        pytest.skip(f"Debian's font packages cannot be had here: {lines[-1]}")
    return {name: set_fonts(name, log=lines.append) for name in FONT_SETS}


def test_every_font_has_every_character_of_its_set(debian_fonts):
    from fontTools.ttLib import TTFont

    for name, packages in debian_fonts.items():
        for package, files in packages.items():
            for path in files:
                cmap = TTFont(str(path), lazy=True).getBestCmap()
                missing = [c for c in CHARACTER_SETS[name] if ord(c) not in cmap]
                assert not missing, f"{name}: {package}/{path.name} lacks {''.join(missing)}"


def test_font_sets_are_deterministic_images_with_their_characters(debian_fonts, monkeypatch):
    # the training negatives' Hershey fonts cannot even be imported while the sets are drawn
    monkeypatch.setitem(sys.modules, "HersheyFonts", None)
    monkeypatch.setitem(sys.modules, "training.negatives", None)
    names = [name for name in FONT_SETS if debian_fonts[name]]
    drawn = character_sets(n=6, seed=1, names=names, fetch=False)
    again = character_sets(n=6, seed=1, names=names, fetch=False)
    for name in names:
        d = drawn[name]
        assert d.images.dtype == np.uint8 and d.images.shape == (6, 1, 28, 28), name
        assert d.characters.tolist() == _cycled(CHARACTER_SETS[name], 6), name
        assert d.images.reshape(6, -1).max(1).min() > 0, name  # every glyph has ink
        assert np.array_equal(d.images, again[name].images), name
        # drawn from the pinned files in Debian's cache, none of them Hershey's or matplotlib's
        assert d.fonts == debian_fonts[name] and set(d.fonts) <= set(SET_FONTS[name])
        for package, path in ((package, p) for package, files in d.fonts.items() for p in files):
            assert path.parent == font_cache_dir() / package, path
            assert sha256(path) == FONT_PACKAGES[path.parent.name][path.name], path
            assert "hershey" not in str(path).lower() and "matplotlib" not in str(path)


def test_no_set_uses_the_training_negatives_sources():
    """Nothing that draws the unknown sets imports the Hershey fonts, or anything of training.negatives but the
    MNIST framing both share."""
    for module in ("export/unknowns.py", "export/unknown_fonts.py", "export/debian.py", "export/evaluate.py"):
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if "hershey" in m.lower()}, module
        from_negatives = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                          and (node.module or "").startswith("training.negatives") for alias in node.names}
        assert from_negatives <= {"frame_like_mnist"}, module
    assert not set(FONT_PACKAGES) & {"hershey", "python3-hersheyfonts"}
