"""The bad-input corpus, built in a test's tmp dir from ../shared/slides (never committed).

Each entry says what a correct pipeline does with it: `fail` (fails alone, with a reason),
`empty` (succeeds with 0 patches), `done` (succeeds with patches) or `any` (a damaged file whose
outcome depends on which bytes were hit: either it fails with a reason or it is stored whole).
Entries that are not slides at all (a folder named .svs) are `skip`: discovery passes over them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
REAL = SHARED / "slides" / "real"
IMAGES = SHARED / "slides" / "images"
BROKEN = SHARED / "slides" / "broken"
MAKE_TEST_SLIDE = SHARED / "tools" / "make_test_slide.py"
CMU = REAL / "CMU-1-Small-Region.svs"
NDPI = REAL / "ndpi-dapi-fluorescence.ndpi"
TRUNCATE_AT = (0.1, 0.5, 0.9)
REAL_SLIDES = [
    CMU,
    NDPI,
    REAL / "boxes-synthetic-4level.tiff",
    REAL / "small-16px.svs",
    REAL / "kidney-ihc-plain.tif",
]
UNREADABLE = "unreadable-perm.svs"


@dataclass(frozen=True)
class Entry:
    name: str  # file (or folder) name in the corpus folder; the slide id is its stem
    kind: str  # what it is, for the table
    expect: str  # fail | empty | done | any | skip

    @property
    def stem(self) -> str:
        return Path(self.name).stem


def _aperio_tiff(path: Path, rgb: np.ndarray, description: str) -> None:
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), compression="jpeg", photometric="rgb", description=description, metadata=None)


def _aperio(w: int, h: int, extra: str) -> str:
    return f"Aperio Image Library v1.0\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG Q=80|{extra}"


def _tissue_rgb(h: int, w: int) -> np.ndarray:
    """Real H&E pixels (a tissue-rich region of the CMU slide) tiled onto the canvas."""
    import openslide

    with openslide.OpenSlide(str(CMU)) as s:
        src = np.asarray(s.read_region((500, 2000), 0, (min(w, 1024), min(h, 900))).convert("RGB"))
    reps = (-(-h // src.shape[0]), -(-w // src.shape[1]), 1)
    return np.ascontiguousarray(np.tile(src, reps)[:h, :w])


def small_tissue_slide(path: Path) -> Path:
    """A 1024x768 aperio-like slide of real H&E pixels at 20x (MPP 0.5): ~10 patches of 224 px."""
    w, h = 1024, 768
    _aperio_tiff(path, _tissue_rgb(h, w), _aperio(w, h, "AppMag = 20|MPP = 0.5"))
    return path


def _garble(src: Path, dst: Path, seed: int) -> None:
    """Random bytes over 5 % of the file, in the middle (where the tile data is)."""
    data = bytearray(src.read_bytes())
    n = len(data)
    start, size = int(n * 0.45), max(64, n // 20)
    data[start : start + size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


def build(folder: Path) -> list[Entry]:
    """Write every bad input (plus one good control slide) into `folder`; returns the entries."""
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []

    def add(name: str, kind: str, expect: str) -> None:
        entries.append(Entry(name, kind, expect))

    for f in sorted(BROKEN.iterdir()):
        shutil.copyfile(f, folder / f"broken-{f.name}")
        add(f"broken-{f.name}", f"shared broken file {f.name}", "fail")
    (folder / "zero-byte.svs").write_bytes(b"")
    add("zero-byte.svs", "zero-byte .svs", "fail")
    for src in REAL_SLIDES:
        data = src.read_bytes()
        for frac in TRUNCATE_AT:
            name = f"trunc{int(frac * 100):02d}-{src.stem}{src.suffix}"
            (folder / name).write_bytes(data[: int(len(data) * frac)])
            add(name, f"{src.name} truncated at {int(frac * 100)} %", "any")
    for i, src in enumerate((CMU, NDPI)):
        name = f"garbled-{src.stem}{src.suffix}"
        _garble(src, folder / name, seed=i)
        add(name, f"{src.name} with random bytes mid-file", "any")
    (folder / "text.svs").write_text("this is a text file, not a slide\n")
    add("text.svs", "text named .svs", "fail")
    (folder / "text.ndpi").write_text("Hamamatsu? no: plain text\n" * 20)
    add("text.ndpi", "text named .ndpi", "fail")
    (folder / "folder.svs").mkdir()
    (folder / "folder.svs" / "readme.txt").write_text("a folder named like a slide\n")
    add("folder.svs", "directory named .svs", "skip")
    shutil.copyfile(CMU, folder / UNREADABLE)
    os.chmod(folder / UNREADABLE, 0)
    add(UNREADABLE, "file without read permission", "fail")
    w, h = 1024, 768
    rgb = _tissue_rgb(h, w)
    _aperio_tiff(folder / "mpp-absurd.svs", rgb, _aperio(w, h, "MPP = 0.00001"))
    add("mpp-absurd.svs", "absurd MPP 1e-5, no objective", "fail")
    _aperio_tiff(folder / "mpp-huge.svs", rgb, _aperio(w, h, "MPP = 5000"))
    add("mpp-huge.svs", "absurd MPP 5000, no objective", "fail")
    _aperio_tiff(folder / "mpp-nan.svs", rgb, _aperio(w, h, "MPP = nan"))
    add("mpp-nan.svs", "MPP 'nan'", "fail")
    _aperio_tiff(folder / "mpp-absurd-mag20.svs", rgb, _aperio(w, h, "AppMag = 20|MPP = -3"))
    add("mpp-absurd-mag20.svs", "negative MPP, AppMag 20 (falls back to 10/mag)", "done")
    _aperio_tiff(folder / "native-5x.svs", rgb, _aperio(w, h, "AppMag = 5|MPP = 2.0"))
    add("native-5x.svs", "native 5x slide in a 20x run (above native)", "fail")
    _aperio_tiff(folder / "tissue-free.svs", np.full((2048, 2048, 3), 245, np.uint8), _aperio(2048, 2048, "MPP = 0.5"))
    add("tissue-free.svs", "blank glass, no tissue", "empty")
    for f in sorted(IMAGES.iterdir()):
        shutil.copyfile(f, folder / f.name)
        add(f.name, f"{f.suffix} without MPP", "fail")
    shutil.copyfile(CMU, folder / CMU.name)
    add(CMU.name, "control: intact real slide", "done")
    return entries
