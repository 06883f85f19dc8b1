#!/usr/bin/env python3
"""Benchmark: tissue segmentation against known masks (Dice, artifact pixels called tissue).

Every case is a slide this script paints itself, so its tissue mask is known exactly: shapes
filled with fully-tissue regions of real images (scikit-image's IHC image, interior crops of the
H&E images and of CMU-1-Small-Region in ../shared/slides, and the same H&E re-stained into other
stains with scikit-image's colour deconvolution), on glass, optionally pale, on tinted, noisy or
unevenly lit glass, with pen strokes (blue, green, black, red), dust and fibres, dark slide and
cover-slip edges, air bubbles and a label area. The demo slide (`core/demo.py`) is a case too.

Slides are written as pyramidal Aperio-style TIFFs (JPEG, 1 µm/px at level 0) and segmented by the
pipeline's own `compute_tissue_mask` (thumbnail read from the pyramid, modality, segmentation), so
the numbers are those of a real run. Scores are on the stored mask's grid (the thumbnail):

  Dice       = 2|mask ∩ truth| / (|mask| + |truth|), truth cells = at least half tissue
  artifact % = artifact cells (at least half covered by ink, dust, edges, bubbles, label; never
               tissue) that the mask calls tissue

Goals: Dice ≥ 0.95 on every clean and pale case and on the demo, ≥ 0.90 with artifacts, and at
most 5 % of the artifact cells called tissue.

usage (from the repository root):
  python benchmarks/bench_segmentation_quality.py                       # this checkout's default method
  python benchmarks/bench_segmentation_quality.py --baseline b86c6bc    # + the method of that commit
  python benchmarks/bench_segmentation_quality.py --sam2-checkpoint sam2.1_hiera_tiny.pt
  python benchmarks/bench_segmentation_quality.py --cases ihc_pale,he_pen --save-overlays out/

`--baseline COMMIT` runs the same cases with the package as it was at COMMIT (`git archive` into a
temporary folder, evaluated in a child process), for the before → after columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from bench_segment_coords import baseline_tree  # benchmarks/ is on sys.path when run as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared" / "slides"
RESULT_PREFIX = "SEGQ_RESULT "
MPP0 = 1.0  # level-0 µm/px of the painted slides
SIZE = (6144, 4608)  # level-0 width, height (6.1 x 4.6 mm; 768 x 576 px mask at 8 µm/px)
GLASS = (242.0, 242.0, 242.0)
GOAL_CLEAN, GOAL_ARTIFACTS, GOAL_ARTIFACT_FRACTION = 0.95, 0.90, 0.05

# -- sources: fully-tissue crops of real images, as optical density (natural log) ----------------


def _load_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"source image missing: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _od(rgb: np.ndarray, white: float = 245.0) -> np.ndarray:
    return np.maximum(np.log(white / np.maximum(rgb.astype(np.float32), 1.0)), 0.0)


def _scaled(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def _source_ihc() -> np.ndarray:
    from skimage import data

    return _od(data.immunohistochemistry()[0:380, 60:512])  # rows/cols without the lumen (~1 µm/px)


def _source_he1000() -> np.ndarray:
    return _od(_scaled(_load_rgb(SHARED / "images" / "he-1000px.png")[0:600], 0.4))  # ~0.4 µm/px → 1


def _source_he500() -> np.ndarray:
    return _od(_scaled(_load_rgb(SHARED / "images" / "he-500x300.jpg"), 0.5))


def _source_cmu() -> np.ndarray:
    from atlaspatch_assets.core.slide import open_slide

    with open_slide(SHARED / "real" / "CMU-1-Small-Region.svs") as s:
        rgb = s.read_region((900, 1000), 0, (600, 1950))  # the epidermis/dermis trunk, 0.5 µm/px
    return _od(_scaled(rgb, 0.5))


def _restained(od: np.ndarray, stain: str) -> np.ndarray:
    """H&E re-stained: hematoxylin/eosin amounts (colour deconvolution) painted with other stains."""
    from skimage import color

    conc = color.separate_stains(np.exp(-od).clip(1e-6, 1), color.hed_from_rgb)  # (H, E, DAB) amounts
    conc = np.clip(conc, 0, None)
    matrices = {
        "pas": color.rgb_from_hpx,  # hematoxylin + periodic acid-Schiff (magenta)
        "trichrome": color.rgb_from_bpx,  # methyl blue + ponceau fuchsin (Masson-like)
        "alcian": color.rgb_from_ahx,  # alcian blue + hematoxylin
        "aec": color.rgb_from_hax,  # hematoxylin + AEC (red IHC chromogen)
        "giemsa": color.rgb_from_bex,  # methylene blue + eosin
    }
    m = matrices[stain]
    two = np.zeros_like(conc)
    if stain in ("trichrome", "giemsa"):  # blue stain on the nuclei/collagen, red on the rest
        two[..., 0], two[..., 1] = conc[..., 0], conc[..., 1]
    elif stain == "alcian":
        two[..., 0], two[..., 1] = conc[..., 1], conc[..., 0]
    else:
        two[..., 0], two[..., 1] = conc[..., 0], conc[..., 1]
    rgb = color.combine_stains(two, m)  # float 0..1 transmittance
    out = _od(np.clip(rgb * 255.0, 0, 255).astype(np.float32), white=255.0)
    # keep the H&E's overall density, so a re-stain is neither paler nor darker than its source
    ratio = float(od.max(axis=2).mean()) / max(float(out.max(axis=2).mean()), 1e-6)
    return (out * ratio).astype(np.float32)


_SOURCE_CACHE: dict[str, np.ndarray] = {}


def source(name: str) -> np.ndarray:
    if name not in _SOURCE_CACHE:
        base, _, stain = name.partition(":")
        loaders: dict[str, Callable[[], np.ndarray]] = {
            "ihc": _source_ihc,
            "he1000": _source_he1000,
            "he500": _source_he500,
            "cmu": _source_cmu,
        }
        od = loaders[base]()
        _SOURCE_CACHE[name] = _restained(od, stain) if stain else od.astype(np.float32)
    return _SOURCE_CACHE[name]


def _texture(src: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) OD: the source mirror-tiled (no seams), randomly flipped, rotated and offset."""
    s = np.rot90(src, int(rng.integers(4)))
    if rng.random() < 0.5:
        s = s[:, ::-1]
    sh, sw = s.shape[:2]
    oy, ox = int(rng.integers(sh)), int(rng.integers(sw))
    tile = np.concatenate([s, s[::-1]], axis=0)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    reps = (math.ceil((h + oy) / tile.shape[0]) + 1, math.ceil((w + ox) / tile.shape[1]) + 1, 1)
    return np.tile(tile, reps)[oy : oy + h, ox : ox + w]


# -- shapes ------------------------------------------------------------------------------------------


def _blob(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A smooth irregular blob (bool, its own bounding box) of mean radius `radius` px."""
    n = int(2 * radius * 1.5) + 3
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - n / 2
    theta = np.arctan2(yy, xx)
    r = np.full_like(theta, radius)
    for k in (2, 3, 5):
        r += radius * rng.uniform(0.03, 0.12) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy, xx) < r


def _core(rng: np.random.Generator, length: float, width: float) -> np.ndarray:
    """A needle-biopsy strip: rotated rounded rectangle (bool, own bounding box)."""
    n = int(length + width) + 4
    m = np.zeros((n, n), np.uint8)
    a = rng.uniform(0, np.pi)
    c = n / 2
    d = np.array([np.cos(a), np.sin(a)]) * (length / 2)
    p0, p1 = (np.array([c, c]) - d).round().astype(int), (np.array([c, c]) + d).round().astype(int)
    cv2.line(m, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, int(width), cv2.LINE_8)
    return m.astype(bool)


def _fat(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Adipose-like OD (h, w, 3): thin eosin membranes around ~70 µm cells, a few nuclei (synthetic)."""
    from scipy.spatial import cKDTree

    n = max(4, int(h * w / 70.0**2))
    pts = np.column_stack([rng.uniform(0, h, n), rng.uniform(0, w, n)])
    yy, xx = np.mgrid[0:h, 0:w]
    d, _ = cKDTree(pts).query(np.column_stack([yy.ravel(), xx.ravel()]), k=2)
    edge = ((d[:, 1] - d[:, 0]) < 2.0).reshape(h, w).astype(np.float32)
    od = np.zeros((h, w, 3), np.float32)
    eosin = np.array([0.10, 0.45, 0.18], np.float32)
    od += edge[..., None] * eosin * rng.uniform(0.6, 1.0)
    for y, x in pts[rng.random(n) < 0.1].astype(int):
        cv2.circle(od, (int(x), int(y)), 3, (0.55, 0.65, 0.30), -1)
    return od


@dataclass
class Canvas:
    """Level-0 optical density, the tissue truth and the artifact mask of one painted slide."""

    width: int
    height: int
    od: np.ndarray = field(init=False)
    truth: np.ndarray = field(init=False)
    artifact: np.ndarray = field(init=False)
    brighten: np.ndarray | None = None  # per-pixel OD subtracted (bubble halos), optional

    def __post_init__(self) -> None:
        self.od = np.zeros((self.height, self.width, 3), np.float32)
        self.truth = np.zeros((self.height, self.width), bool)
        self.artifact = np.zeros((self.height, self.width), bool)

    def free(self, y: int, x: int, shape: np.ndarray, margin: int) -> bool:
        h, w = shape.shape
        if y < margin or x < margin or y + h > self.height - margin or x + w > self.width - margin:
            return False
        return not self.truth[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin].any()

    def place_tissue(self, shape: np.ndarray, tex: np.ndarray, rng: np.random.Generator, margin: int = 150) -> bool:
        h, w = shape.shape
        for _ in range(200):
            y, x = int(rng.integers(0, self.height - h + 1)), int(rng.integers(0, self.width - w + 1))
            if self.free(y, x, shape, margin):
                self.od[y : y + h, x : x + w][shape] = tex[shape]
                self.truth[y : y + h, x : x + w] |= shape
                return True
        return False


def paint_tissue(c: Canvas, rng: np.random.Generator, sources: list[str], pale: float = 1.0, fat: bool = False) -> None:
    """Blobs (0.4-1 mm radius) and a needle core, filled with `sources` in turn."""
    shapes = [_blob(rng, rng.uniform(700, 1000)), _core(rng, rng.uniform(2000, 2800), rng.uniform(450, 700))]
    shapes += [_blob(rng, rng.uniform(450, 800)) for _ in range(2)]
    shapes += [_blob(rng, rng.uniform(420, 520)) for _ in range(2)]  # well above the area filter
    for i, shape in enumerate(shapes):
        h, w = shape.shape
        tex = _texture(source(sources[i % len(sources)]), h, w, rng) * pale
        if fat and i == 0:  # one lobule: fat in the middle, tissue rim
            inner = cv2.erode(shape.astype(np.uint8), np.ones((301, 301), np.uint8)).astype(bool)
            tex = np.where(inner[..., None], _fat(rng, h, w), tex)
        c.place_tissue(shape, tex, rng)


# -- artifacts (never on tissue: their pixels are scored as "should not be tissue") ---------------

INKS = {  # natural-log OD of common marker inks on glass (thumbnail colours seen on real slides)
    "blue": (1.75, 1.20, 0.45),
    "green": (1.55, 0.60, 0.95),
    "black": (2.0, 1.95, 1.80),
    "red": (0.25, 1.75, 1.35),
}


def _stamp(c: Canvas, layer: np.ndarray, od: np.ndarray | tuple[float, ...], keep_off_tissue: int = 60) -> None:
    """Add an artifact layer (float 0..1 coverage, level 0) with OD `od`, away from the tissue."""
    near = cv2.dilate(c.truth.astype(np.uint8), np.ones((keep_off_tissue, keep_off_tissue), np.uint8)).astype(bool)
    layer = np.where(near, 0.0, layer).astype(np.float32)
    vec = np.asarray(od, np.float32)
    c.od += layer[..., None] * (vec if vec.ndim == 1 else vec)
    c.artifact |= layer > 0.5


def paint_pen(c: Canvas, rng: np.random.Generator, colours: tuple[str, ...] = tuple(INKS)) -> None:
    """Marker strokes: a circle around a tissue piece, wavy lines and a scribble, streaky density."""
    for colour in colours:
        layer = np.zeros((c.height, c.width), np.uint8)
        width = int(rng.uniform(120, 350))
        kind = rng.integers(3)
        if kind == 0 and c.truth.any():
            ys, xs = np.nonzero(c.truth[::16, ::16])
            i = int(rng.integers(len(ys)))
            cy, cx = int(ys[i] * 16), int(xs[i] * 16)
            cv2.ellipse(layer, (cx, cy), (int(rng.uniform(900, 1500)),) * 2, 0, 0, int(rng.uniform(120, 300)), 1, width)
        else:
            n = 6
            x = np.linspace(rng.uniform(200, 1500), rng.uniform(c.width - 1500, c.width - 200), n)
            y = rng.uniform(300, c.height - 300) + rng.normal(0, 250, n).cumsum()
            pts = np.column_stack([x, np.clip(y, 100, c.height - 100)]).astype(np.int32)
            cv2.polylines(layer, [pts], False, 1, width)
        streak = cv2.GaussianBlur(rng.uniform(0.55, 1.1, (c.height // 32, c.width // 32)).astype(np.float32), (0, 0), 2)
        streak = cv2.resize(streak, (c.width, c.height), interpolation=cv2.INTER_LINEAR)
        soft = cv2.GaussianBlur(layer.astype(np.float32), (0, 0), 6)
        _stamp(c, soft * streak, INKS[colour])


def paint_dust(c: Canvas, rng: np.random.Generator, n: int = 180) -> None:
    """Specks (5-60 µm), a few larger debris particles (up to 200 µm) and fibres."""
    layer = np.zeros((c.height, c.width), np.float32)
    for _ in range(n):
        x, y = int(rng.integers(c.width)), int(rng.integers(c.height))
        r = int(rng.uniform(5, 60) if rng.random() < 0.9 else rng.uniform(80, 200))
        cv2.ellipse(
            layer,
            (x, y),
            (r, max(2, int(r * rng.uniform(0.4, 1)))),
            rng.uniform(0, 180),
            0,
            360,
            float(rng.uniform(0.4, 1.6)),
            -1,
        )
    for _ in range(12):
        pts = np.column_stack([rng.integers(0, c.width), rng.integers(0, c.height)]) + rng.normal(
            0, 250, (5, 2)
        ).cumsum(0)
        cv2.polylines(layer, [pts.astype(np.int32)], False, float(rng.uniform(0.4, 1.2)), int(rng.uniform(3, 9)))
    # dust is grey to brownish; its layer holds the density itself (1 = OD of the vector)
    _stamp(c, layer, (1.0, 1.05, 1.15))


def paint_edges(c: Canvas, rng: np.random.Generator) -> None:
    """A dark slide edge along the top and the left, and a cover-slip edge line near the bottom."""
    layer = np.zeros((c.height, c.width), np.float32)
    top, left = int(rng.uniform(150, 400)), int(rng.uniform(100, 300))
    layer[:top] = 1.0
    layer[:, :left] = 1.0
    layer = cv2.GaussianBlur(layer, (0, 0), 25)
    y = c.height - int(rng.uniform(250, 450))
    line = np.zeros_like(layer)
    cv2.line(line, (0, y), (c.width, y + int(rng.uniform(-80, 80))), 1.0, int(rng.uniform(20, 45)))
    _stamp(c, np.maximum(layer * 2.6, cv2.GaussianBlur(line, (0, 0), 4) * 0.8), (1.0, 1.0, 0.95), keep_off_tissue=1)


def paint_bubbles(c: Canvas, rng: np.random.Generator, n: int = 5) -> None:
    """Air bubbles: a dark refraction ring with a bright inner halo, on the glass."""
    ring = np.zeros((c.height, c.width), np.float32)
    halo = np.zeros_like(ring)
    for _ in range(n):
        r = int(rng.uniform(150, 700))
        for _ in range(50):
            x, y = int(rng.integers(r, c.width - r)), int(rng.integers(r, c.height - r))
            if not c.truth[max(0, y - r - 80) : y + r + 80, max(0, x - r - 80) : x + r + 80].any():
                break
        cv2.circle(ring, (x, y), r, float(rng.uniform(0.6, 1.0)), int(rng.uniform(10, 30)))
        cv2.circle(halo, (x, y), max(1, r - 30), 1.0, 25)
    _stamp(c, cv2.GaussianBlur(ring, (0, 0), 3), (1.0, 1.0, 1.0))
    c.brighten = cv2.GaussianBlur(halo, (0, 0), 8) * 0.05


def paint_label(c: Canvas, rng: np.random.Generator) -> None:
    """A label at the right end: opaque grey paper with printed text lines and a straight edge."""
    layer = np.zeros((c.height, c.width), np.float32)
    x0 = c.width - int(rng.uniform(800, 1100))
    paper = cv2.resize(rng.uniform(1.1, 1.5, (c.height // 64, 20)).astype(np.float32), (c.width - x0, c.height))
    layer[:, x0:] = paper
    for i in range(6):
        y = 600 + i * 450
        cv2.rectangle(layer, (x0 + 120, y), (c.width - 120, y + 120), 3.0, -1)
    _stamp(c, layer, (1.0, 1.0, 1.0), keep_off_tissue=1)


# -- glass, light and the final RGB -----------------------------------------------------------------


def render(
    c: Canvas,
    rng: np.random.Generator,
    glass: tuple[float, float, float] = GLASS,
    uneven: float = 0.0,
    noise: float = 2.0,
    tint_drift: tuple[float, float, float] = (0.0, 0.0, 0.0),
    stripes: float = 0.0,
) -> np.ndarray:
    """RGB uint8 = glass colour x illumination field x exp(-OD) + sensor noise, in row strips."""
    column_gain = np.ones(c.width, np.float32)
    if stripes:
        column_gain = np.repeat(1.0 + rng.uniform(-stripes, stripes, c.width // 1000 + 1), 1000)[: c.width]
        column_gain = column_gain.astype(np.float32)
    h, w = c.height, c.width
    coarse = rng.normal(0, 1, (12, 16)).astype(np.float32)
    mottle = cv2.resize(cv2.GaussianBlur(coarse, (0, 0), 1.5), (w, h), interpolation=cv2.INTER_CUBIC)
    out = np.empty((h, w, 3), np.uint8)
    xs = np.linspace(-1, 1, w, dtype=np.float32)
    g = np.asarray(glass, np.float32)
    for y0 in range(0, h, 512):
        y1 = min(h, y0 + 512)
        ys = np.linspace(-1, 1, h, dtype=np.float32)[y0:y1, None]
        field_ = (
            1.0
            - uneven * (0.55 * (xs[None] ** 2 + ys**2) / 2 + 0.45 * (xs[None] + 1) / 2)
            + 0.25 * uneven * mottle[y0:y1] * 0.1
        )
        od = c.od[y0:y1]
        if c.brighten is not None:
            od = od - c.brighten[y0:y1, :, None]
        rgb = g * field_[..., None] * np.exp(-od)
        if uneven:  # the light's colour drifts a little across the slide too
            rgb[..., 2] *= 1.0 - 0.04 * uneven * (xs[None] + 1)
        if stripes:  # scanner stitching: each 1 mm column of fields a little brighter or darker
            rgb *= column_gain[None, :, None]
        for ch, drift in enumerate(tint_drift):  # the glass's tint changes from left to right
            if drift:
                rgb[..., ch] *= 1.0 + drift * (xs[None] + 1) / 2
        rgb += rng.normal(0, noise, rgb.shape).astype(np.float32)
        out[y0:y1] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # clean | pale | artifacts | demo
    what: str
    paint: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None


def _case(
    sources: list[str],
    pale: float = 1.0,
    fat: bool = False,
    artifacts: tuple[str, ...] = (),
    glass: tuple[float, float, float] = GLASS,
    uneven: float = 0.0,
    noise: float = 2.0,
    pens: tuple[str, ...] = tuple(INKS),
    tint_drift: tuple[float, float, float] = (0.0, 0.0, 0.0),
    stripes: float = 0.0,
) -> Callable[[np.random.Generator], tuple[np.ndarray, ...]]:
    def paint(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = Canvas(*SIZE)
        paint_tissue(c, rng, sources, pale=pale, fat=fat)
        for a in artifacts:
            {
                "pen": lambda: paint_pen(c, rng, pens),
                "dust": lambda: paint_dust(c, rng),
                "edges": lambda: paint_edges(c, rng),
                "bubbles": lambda: paint_bubbles(c, rng),
                "label": lambda: paint_label(c, rng),
            }[a]()
        rgb = render(c, rng, glass=glass, uneven=uneven, noise=noise, tint_drift=tint_drift, stripes=stripes)
        return rgb, c.truth, c.artifact & ~c.truth

    return paint


HE = ["he1000", "cmu", "he500"]
IHC = ["ihc"]
SPECIAL = ["he1000:pas", "cmu:trichrome", "he500:alcian", "cmu:aec", "he1000:giemsa"]
ALL_ART = ("pen", "dust", "edges", "bubbles", "label")

CASES = [
    Case("demo", "demo", "the demo slide (core/demo.py): IHC pieces on glass, 0.5 µm/px"),
    Case("he", "clean", "H&E (he-1000px, CMU trunk, he-500x300) on glass", _case(HE)),
    Case("ihc", "clean", "IHC: DAB + pale hematoxylin stroma", _case(IHC)),
    Case("special", "clean", "PAS, trichrome, alcian blue, AEC, Giemsa (re-stained H&E)", _case(SPECIAL)),
    Case("he_pale", "pale", "H&E at 35 % of its density", _case(HE, pale=0.35)),
    Case("ihc_pale", "pale", "IHC at 35 % of its density", _case(IHC, pale=0.35)),
    Case("special_pale", "pale", "special stains at 35 %", _case(SPECIAL, pale=0.35)),
    Case("he_fat", "pale", "H&E with a fat lobule (synthetic membranes) inside one piece", _case(HE, fat=True)),
    Case(
        "tinted_uneven",
        "pale",
        "H&E + IHC, yellowish glass, 25 % vignetting/gradient, noise",
        _case(HE + IHC, glass=(246, 238, 222), uneven=0.25, noise=5.0),
    ),
    Case(
        "tint_drift",
        "pale",
        "pale (50 %) H&E + IHC, the glass turning yellow to the right (blue -12 %, green -4 %)",
        _case(HE + IHC, pale=0.5, tint_drift=(0.0, -0.04, -0.12)),
    ),
    Case(
        "stitching",
        "pale",
        "pale (40 %) IHC, 1 mm scan stripes ±4 % brighter or darker",
        _case(IHC, pale=0.4, stripes=0.04),
    ),
    Case("dark_glass", "pale", "H&E + IHC on dark glass (old scanner, ~190)", _case(HE + IHC, glass=(188, 190, 194))),
    Case("he_pen", "artifacts", "H&E with blue, green, black and red marker", _case(HE, artifacts=("pen",))),
    Case("ihc_pen", "artifacts", "IHC with marker strokes", _case(IHC, artifacts=("pen",))),
    Case(
        "ihc_pale_pen",
        "artifacts",
        "pale IHC (50 %) with blue marker",
        _case(IHC, pale=0.5, artifacts=("pen",), pens=("blue", "blue", "black")),
    ),
    Case("dust", "artifacts", "H&E + IHC with dust, debris and fibres", _case(HE + IHC, artifacts=("dust",))),
    Case("edges", "artifacts", "H&E with dark slide edges and a cover-slip edge", _case(HE, artifacts=("edges",))),
    Case("bubbles", "artifacts", "IHC with air bubbles", _case(IHC, artifacts=("bubbles",))),
    Case("label", "artifacts", "special stains with a label area", _case(SPECIAL, artifacts=("label",))),
    Case(
        "everything",
        "artifacts",
        "pale H&E + IHC, uneven tinted glass, all artifacts",
        _case(HE + IHC, pale=0.6, artifacts=ALL_ART, glass=(238, 240, 248), uneven=0.2, noise=4.0),
    ),
]


# -- building the slides ---------------------------------------------------------------------------


def write_slide(path: Path, rgb: np.ndarray, mpp: float = MPP0, quality: int = 90) -> None:
    """Pyramidal tiled JPEG TIFF (levels /4, /16, ...) with an Aperio description (MPP, AppMag)."""
    import tifffile

    h, w = rgb.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG Q={quality}"
        f"|AppMag = {10.0 / mpp:g}|MPP = {mpp}"
    )
    levels = [rgb]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(cv2.resize(levels[-1], None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA))
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp) as tw:
        for i, lvl in enumerate(levels):
            tw.write(
                lvl,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                description=desc if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    os.replace(tmp, path)


def case_seed(name: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))


def build_case(case: Case, data_dir: Path) -> Path:
    """Slide + truth (packed bits, level 0) in `data_dir`, built once per case and script version."""
    slide = data_dir / f"{case.name}.svs"
    truth_file = data_dir / f"{case.name}.truth.npz"
    if slide.exists() and truth_file.exists():
        return slide
    data_dir.mkdir(parents=True, exist_ok=True)
    if case.paint is None:  # the demo
        from atlaspatch_assets.core.demo import build_demo_slide, demo_truth_mask

        build_demo_slide(slide)
        truth, artifact = demo_truth_mask(), None
    else:
        rgb, truth, artifact = case.paint(np.random.default_rng(case_seed(case.name)))
        write_slide(slide, rgb)
        del rgb
    arrays = {"truth": np.packbits(truth), "shape": np.array(truth.shape)}
    if artifact is not None and artifact.any():
        arrays["artifact"] = np.packbits(artifact)
    np.savez_compressed(truth_file, **arrays)
    return slide


def load_truth(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.load(data_dir / f"{name}.truth.npz")
    shape = tuple(int(v) for v in z["shape"])
    n = shape[0] * shape[1]
    truth = np.unpackbits(z["truth"])[:n].reshape(shape).astype(bool)
    artifact = np.unpackbits(z["artifact"])[:n].reshape(shape).astype(bool) if "artifact" in z else None
    return truth, artifact


# -- child: segment every case with the importable package, score it -------------------------------


def evaluate(
    data_dir: Path, names: list[str], method: str, sam2_checkpoint: str | None, overlays: Path | None, tag: str
) -> list[dict[str, Any]]:
    try:
        from atlaspatch_assets.core.stages.mask import compute_tissue_mask
    except ImportError:  # --baseline: a package from before the stages moved
        from atlaspatch_assets.core.pipeline import compute_tissue_mask
    from atlaspatch_assets.core.segmentation import SegmentationParams
    from atlaspatch_assets.core.slide import open_slide

    kwargs: dict[str, Any] = {"method": method}
    if method == "sam2":
        kwargs["sam2_checkpoint"] = sam2_checkpoint
    params = SegmentationParams(**kwargs)
    rows = []
    for name in names:
        truth0, art0 = load_truth(data_dir, name)
        t0 = time.perf_counter()
        with open_slide(data_dir / f"{name}.svs") as slide:
            res = compute_tissue_mask(slide, name, params)
        seconds = time.perf_counter() - t0
        mask = res.mask.astype(bool)
        truth = _to_grid(truth0, mask.shape)
        art = _to_grid(art0, mask.shape) & ~truth if art0 is not None else np.zeros_like(mask)
        inter = int((mask & truth).sum())
        denom = int(mask.sum()) + int(truth.sum())
        rows.append(
            {
                "case": name,
                "dice": 1.0 if denom == 0 else 2.0 * inter / denom,
                "artifact_as_tissue": float(mask[art].mean()) if art.any() else None,
                "tissue_pct": 100.0 * float(mask.mean()),
                "truth_pct": 100.0 * float(truth.mean()),
                "seconds": seconds,
                "mask_shape": list(mask.shape),
            }
        )
        if overlays is not None and res.thumbnail is not None:
            overlays.mkdir(parents=True, exist_ok=True)
            img = res.thumbnail.copy()
            img[mask & ~truth] = (0, 200, 255)  # called tissue, is not: cyan
            img[truth & ~mask] = (255, 0, 255)  # missed tissue: magenta
            cv2.imwrite(str(overlays / f"{name}.{tag}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return rows


def _to_grid(fine: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Same rule as atlaspatch_assets.core.segmentation.scoring.to_grid (kept here: the baseline
    package of an older commit has no scoring module)."""
    h, w = shape
    frac = cv2.resize(fine.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return frac >= 0.5


def run_child(
    src: Path | None,
    data_dir: Path,
    names: list[str],
    method: str,
    tag: str,
    sam2_checkpoint: str | None,
    overlays: Path | None,
) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--data-dir",
        str(data_dir),
        "--cases",
        ",".join(names),
        "--method",
        method,
        "--tag",
        tag,
    ]
    if sam2_checkpoint:
        cmd += ["--sam2-checkpoint", sam2_checkpoint]
    if overlays is not None:
        cmd += ["--save-overlays", str(overlays)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src or REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(cmd, cwd=str(src or REPO_ROOT), env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"child {tag} failed (rc={p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# -- report -----------------------------------------------------------------------------------------


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(header), "  ".join("-" * wd for wd in widths), *(fmt(r) for r in rows)])


def goal_of(group: str) -> float:
    return GOAL_ARTIFACTS if group == "artifacts" else GOAL_CLEAN


def report(results: dict[str, list[dict[str, Any]]], order: list[str]) -> tuple[str, bool]:
    groups = {c.name: c.group for c in CASES}
    tags = list(results)
    by = {t: {r["case"]: r for r in rs} for t, rs in results.items()}
    header = ["case", "group", "goal"]
    for t in tags:
        header += [f"Dice {t}", f"art→tissue {t}"]
    header += ["tissue % (truth)"]
    rows, ok_all = [], True
    main = tags[-1]
    for name in order:
        g = groups[name]
        row = [name, g, f"≥{goal_of(g):.2f}"]
        for t in tags:
            r = by[t].get(name)
            if r is None:
                row += ["-", "-"]
                continue
            a = r["artifact_as_tissue"]
            row += [f"{r['dice']:.3f}", "-" if a is None else f"{100 * a:.1f} %"]
        r = by[main][name]
        row.append(f"{r['tissue_pct']:.1f} ({r['truth_pct']:.1f})")
        a = r["artifact_as_tissue"]
        ok = r["dice"] >= goal_of(g) and (a is None or a <= GOAL_ARTIFACT_FRACTION)
        ok_all &= ok
        row[0] = name if ok else f"{name} (MISS)"
        rows.append(row)
    text = fmt_table(rows, header)
    return text, ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data-dir",
        default=str(REPO_ROOT / "bench_data" / "segmentation_quality"),
        help="the painted slides and their truth live here (built once; gitignored)",
    )
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--baseline", metavar="COMMIT", help="also evaluate the package of this commit (before)")
    ap.add_argument("--sam2-checkpoint", help="also evaluate --seg-method sam2 with this local checkpoint")
    ap.add_argument(
        "--save-overlays", metavar="DIR", help="write thumbnails with misses (magenta) and false tissue (cyan)"
    )
    ap.add_argument("--rebuild", action="store_true", help="repaint the slides even when present")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="otsu", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    data_dir = Path(a.data_dir)
    names = [n for n in a.cases.split(",") if n] or [c.name for c in CASES]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {[c.name for c in CASES]}")
    overlays = Path(a.save_overlays) if a.save_overlays else None
    if a.child:
        rows = evaluate(data_dir, names, a.method, a.sam2_checkpoint, overlays, a.tag or a.method)
        print(RESULT_PREFIX + json.dumps(rows), flush=True)
        return 0

    t0 = time.perf_counter()
    for c in CASES:
        if c.name in names:
            if a.rebuild:
                for f in (data_dir / f"{c.name}.svs", data_dir / f"{c.name}.truth.npz"):
                    f.unlink(missing_ok=True)
            build_case(c, data_dir)
    print(f"{len(names)} case slides ready in {data_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)

    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="segq_base_") as tmp:
        if a.baseline:
            src = baseline_tree(a.baseline, Path(tmp))
            results[f"before ({a.baseline})"] = run_child(src, data_dir, names, "otsu", "before", None, overlays)
        if a.sam2_checkpoint:
            results["sam2"] = run_child(None, data_dir, names, "sam2", "sam2", a.sam2_checkpoint, overlays)
        results["after"] = run_child(None, data_dir, names, "otsu", "after", None, overlays)
    text, ok = report(results, names)
    print()
    print("Dice of the stored mask against the painted truth on the mask's grid; art→tissue = share of artifact")
    print(f"cells called tissue (goal ≤ {100 * GOAL_ARTIFACT_FRACTION:.0f} %). Cases:")
    for c in CASES:
        if c.name in names:
            print(f"  {c.name:14s} {c.what}")
    print()
    print(text, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if (a.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
