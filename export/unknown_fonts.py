"""The fonts the held-out character sets of export.unknowns are drawn in: Debian font packages, never Hershey.

    fonts = set_fonts("greek", log=print)    # {package: [font file, ...]} of the packages that could be had

The training negatives (training.negatives) draw Latin letters and symbols in the Hershey stroke fonts; the
evaluation measures on what that generator never sees: handwriting and informal fonts for the same letters, and two
other scripts (Greek, Devanagari) in fonts of their own. Each package is fetched as Fashion-MNIST is
(`apt-get download` + `dpkg-deb -x`, no root; export.debian), its font files checked against the sha256 pinned here
(Debian bookworm's versions) and cached in `$LSOFTMAX_CACHE/fonts/PACKAGE/` beside MNIST; once cached nothing
needs the network. A package that cannot be had costs one logged line and the set goes on with the others.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from export.debian import FETCH_ERRORS, download, fetch_package_files, sha256

__all__ = ["FONT_PACKAGES", "SET_FONTS", "font_cache_dir", "package_fonts", "set_fonts"]

FETCH_TIMEOUT = 120  # seconds, per apt-get or dpkg-deb call
FONT_PACKAGES = {  # package: {font file: sha256} (bookworm versions in the comments)
    # handwriting and informal Latin fonts, for handwritten_letters
    "fonts-dkg-handwriting": {  # 0.17-1: a marker-pen hand, four styles
        "dkg.ttf": "93eb07f57b84f04fa975ebf49ecec43d9b2c85834a9b63864072c6b993efd131",
        "dkgBd.ttf": "62b88a2819923a5f0ab3944713122d0a0957a4081c0294d00c3205e225d5c3f2",
        "dkgIt.ttf": "911843f094cbe0508dd5049e3e610020d97b395cdaa8ed088f0f3af8e3a6e661",
        "dkgBI.ttf": "42699be9d77fc2b580b7bb83e664855e835b3306801187a6577f802409dd0f48",
    },
    "fonts-humor-sans": {  # 1.0-4: xkcd's hand; all capitals (its a-z are small capitals)
        "Humor-Sans.ttf": "2ded6a27448c9ed30aaff177744e2bcf1e52e0aab018b2a8be64565df633318f",
    },
    "fonts-comic-neue": {  # 2.51-4: informal, six weights and slants
        "ComicNeue-Regular.otf": "2728ee8f303e31934e62bf27b044fd7657b0613412d51f7444db1078cc3a7cb2",
        "ComicNeue-Italic.otf": "e5b8b4c03b0a93b058038401f722074cef03da066a8653d92436e8ee597cbc53",
        "ComicNeue-Bold.otf": "0637fea8f858cd1d9a6e0ff786bed3d8cc2dc59b871a28e268a5a0106f052a92",
        "ComicNeue-BoldItalic.otf": "317338fd1611f4a18476b5fbbeea367816c6663c6e973e770f1b281fcc90fed4",
        "ComicNeue-Light.otf": "2b8a7a8c1a6b670a9ca2673bec28affd02d411415dc763648386c8b0bb165006",
        "ComicNeue-LightItalic.otf": "3b747803d67a741e981d4b66fa64ba685848b8bba24b66a4bd8d03ad6548cb86",
    },
    "fonts-breip": {  # 1:0.5.1-3: a thin handwriting (its breipfont.ttf is the same face again)
        "Breip.ttf": "cded2aeeeb7d35baa8aa5b57df35a25836910498271d3d2eec502f6aa7033eb7",
    },
    "fonts-kristi": {  # 20101220-1: a slanted blackboard hand
        "Kristi.ttf": "6c14164cd50b52d03d88728971285fe1dbf0d6ee8af6d29274b5d5026a0fb622",
    },
    "fonts-dancingscript": {  # 1.2-2: a joined script
        "DancingScript-Regular.otf": "38178945aaefdea573f4998d8b984985aaebb95964da337b23e77e682d7d3d17",
        "DancingScript-Bold.otf": "0ef9febbf9cf763e47b51170bc74c5ac0e0cc65918469ec6521729ce11dacd46",
    },
    # Greek (the Greek Font Society's faces, not DejaVu, which draws the `letters` set)
    "fonts-gfs-neohellenic": {  # 1.1-7
        "GFSNeohellenic.otf": "acff5add00a6919b64e3f6d853a04a4d8665461b6a4d11c36ad2dad6a891f365",
        "GFSNeohellenicIt.otf": "3c2aaf027ed71e1a1bb39b2a5aa80c87b7e3f692d2ea4d7cacf8df74e7108620",
        "GFSNeohellenicBold.otf": "750528dfec86e7db23d7fafb16eb89064563e1b86d1c1abb37b916fcc53798aa",
        "GFSNeohellenicBoldIt.otf": "1739907b36bae01b56ee8dd7f366e981ba90f6b3846ac239f0ab1fd927f8bee6",
    },
    "fonts-gfs-artemisia": {  # 1.1-6
        "GFSArtemisia.otf": "33f8e57abcd8d58864b0a7ba9607107481c4c0f57dd9cc765d9e97eba17f2412",
        "GFSArtemisiaIt.otf": "91cf590d2991eca10eca0fac33551639a8524f151bb614b3e7f804917610fef0",
        "GFSArtemisiaBold.otf": "65648d94b200cc5f9fd6856b111d6e68bee1563da5395ebc52913f78ad280a4b",
        "GFSArtemisiaBoldIt.otf": "2f308ac1f896200f6c10396a53e0a53208e46f2004deebaff269a0a81a1358f3",
    },
    "fonts-gfs-didot": {  # 1.1-7
        "GFSDidot.otf": "27d80cbfb7446a627f577b3a3bc519e1cec71d53328cd3873368e9c3b54e0fc1",
        "GFSDidotItalic.otf": "83f07e3f4e919d0a0dd8d07c224c624c7a383d013d33ade105908d044109dfe0",
        "GFSDidotBold.otf": "8f1febc6e7088c6721c968056f2600f6a1e8b591fd8e686df8b4de19f3ee435c",
        "GFSDidotBoldItalic.otf": "074f1040beb899dbdd137117a519427017a5a73bec4a53715420f1a2d89cd917",
    },
    "fonts-gfs-porson": {  # 1.1-7: a cursive Greek
        "GFSPorson.otf": "94883e6d8fbb7c5346c9ca2b5125551edeebb2c8a459afaab7ada03fb05d7d1d",
    },
    "fonts-gfs-solomos": {  # 1.1-6: a slanted Greek
        "GFSSolomos.otf": "3afba0af2b85c8b65970763c11ba2b65bcf060932566483f27f6a592170ed6f2",
    },
    # Devanagari
    "fonts-gargi": {  # 2.0-6
        "Gargi.ttf": "9e825a30989c87834651f25b6bde0c6ed32479c2200bcf8397d88b376a8dd5c5",
    },
    "fonts-lohit-deva": {  # 2.95.4-5
        "Lohit-Devanagari.ttf": "245eef612b94246c6ab9640d07ce21d3d886fabeba6d4ba5beaa859ba58bc7d0",
    },
    "fonts-samyak-deva": {  # 1.2.2-6
        "Samyak-Devanagari.ttf": "6294af3599c66f67d5308d9cd5233ec7ec449bb54d3a0bcf1987dba15963ad61",
    },
    "fonts-deva-extra": {  # 3.0-6: Kalimati, Samanata and Chandas (the last with Marathi/Nepali letter forms)
        "kalimati.ttf": "7adf2cd4283e33f3cdad5802147648a0fb705f4366e48417a5a1638cde5c4b23",
        "samanata.ttf": "6bb201c726db297639ab50ec3df43a380180746b2323eaebf8f14b2f669d26cd",
        "chandas1-2.ttf": "3ec43827db73ac426742fe6d3f610851789967337e917974f4651fcfa3a2967d",
    },
}
# Left out: fonts-femkeklaver (hollow outline letters, not a pen's strokes), fonts-klee (a 64 MB Japanese
# package for a few Latin glyphs), fonts-gfs-complutum (one Greek face next to these five, its Latin barely there).
SET_FONTS = {
    "handwritten_letters": ("fonts-dkg-handwriting", "fonts-humor-sans", "fonts-comic-neue", "fonts-breip",
                            "fonts-kristi", "fonts-dancingscript"),
    "greek": ("fonts-gfs-neohellenic", "fonts-gfs-artemisia", "fonts-gfs-didot", "fonts-gfs-porson",
              "fonts-gfs-solomos"),
    "devanagari": ("fonts-gargi", "fonts-lohit-deva", "fonts-samyak-deva", "fonts-deva-extra"),
}


def font_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """CACHE_DIR, else `fonts` in the MNIST cache ($LSOFTMAX_CACHE, ...; training.data.default_cache_dir)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from training.data import default_cache_dir

    return default_cache_dir() / "fonts"


def package_fonts(package: str, cache_dir: str | Path | None = None, fetch: bool = True, log=print,
                  deb: str | Path | None = None) -> list[Path] | None:
    """PACKAGE's pinned font files in the cache, fetched into it when missing (fetch=False: never; deb: its .deb
    when downloaded already); None, with one line logged, when they cannot be had or one differs from its pin."""
    files = FONT_PACKAGES[package]
    root = font_cache_dir(cache_dir) / package
    paths = [root / name for name in files]
    if not all(p.is_file() for p in paths):
        if not fetch:
            log(f"{package}: not in the cache {root} (fetching disabled); going on without it")
            return None
        try:
            fetch_package_files(package, files, root, timeout=FETCH_TIMEOUT, deb=deb)
        except FETCH_ERRORS as exc:
            log(f"{package}: could not be had ({exc}); going on without it")
            return None
    differs = [p.name for p in paths if sha256(p) != files[p.name]]
    if differs:
        log(f"{package}: {', '.join(differs)} in {root} differ from the pinned sha256 (delete the folder to fetch "
            "it again); going on without it")
        return None
    return paths


def set_fonts(name: str, cache_dir: str | Path | None = None, fetch: bool = True, log=print) -> dict[str, list[Path]]:
    """{package: font files} for the set NAME (a key of SET_FONTS), the packages that could be had only. The
    missing ones are downloaded by one apt-get call (each alone when that fails, one logged line a failure)."""
    root = font_cache_dir(cache_dir)
    missing = [p for p in SET_FONTS[name] if not all((root / p / f).is_file() for f in FONT_PACKAGES[p])]
    debs = {}
    with contextlib.ExitStack() as stack:
        if fetch and len(missing) > 1:
            root.mkdir(parents=True, exist_ok=True)
            folder = stack.enter_context(tempfile.TemporaryDirectory(dir=root, prefix=".download-"))
            with contextlib.suppress(*FETCH_ERRORS):
                debs = download(missing, folder, timeout=FETCH_TIMEOUT)
        out = {}
        for package in SET_FONTS[name]:
            paths = package_fonts(package, cache_dir, fetch, log, deb=debs.get(package))
            if paths:
                out[package] = paths
    return out
