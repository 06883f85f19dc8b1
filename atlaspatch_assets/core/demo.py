"""The demo slide: IHC tissue islands on glass, and its exact tissue mask (what was drawn).

Everything comes from installed packages (scikit-image's bundled IHC image): no download, no data
in the repository. `demo_truth_mask` replays the same layout as `build_demo_slide`, so tests and
benchmarks can score a segmentation of the demo against the mask that was painted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DEMO_MPP = 0.5  # 20x
DEMO_WIDTH, DEMO_HEIGHT = 6144, 4096
DEMO_GLASS = 242  # glass is not pure white
TILE = 256
PIECE = 1024  # side of one tissue piece at level 0 (the 512 px IHC image upscaled 2x)
CENTERS = ((1100, 1300), (2900, 3000), (1300, 4700), (3000, 5200))  # (y, x) of the pieces


@dataclass(frozen=True)
class _Piece:
    y0: int
    x0: int
    rot90: int
    flip: bool
    blob: np.ndarray  # bool (PIECE, PIECE): where the piece is painted


def _pieces(seed: int) -> Iterator[_Piece]:
    """The random layout, in the order the generator draws it (so slide and mask always agree)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:PIECE, 0:PIECE]
    c = PIECE // 2
    r = np.hypot(yy - c, xx - c)
    theta = np.arctan2(yy - c, xx - c)
    for cy, cx in CENTERS:
        rot = int(rng.integers(4))
        flip = bool(rng.random() < 0.5)
        blob = r < 420 + 60 * np.sin(theta * 3 + rng.random() * 6)
        yield _Piece(cy - c, cx - c, rot, flip, blob)


def _paint(canvas: np.ndarray, p: _Piece, values: np.ndarray | bool) -> None:
    """canvas[blob] = values[blob] for the piece's blob, clipped to the canvas (all sides)."""
    h, w = canvas.shape[:2]
    y0, x0 = max(p.y0, 0), max(p.x0, 0)
    y1, x1 = min(p.y0 + PIECE, h), min(p.x0 + PIECE, w)
    if y1 <= y0 or x1 <= x0:
        return
    sl = (slice(y0 - p.y0, y1 - p.y0), slice(x0 - p.x0, x1 - p.x0))
    blob = p.blob[sl]
    region = canvas[y0:y1, x0:x1]
    region[blob] = values if isinstance(values, bool) else values[sl][blob]


def demo_truth_mask(width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT, seed: int = 0) -> np.ndarray:
    """Bool (height, width) level-0 mask of the tissue `build_demo_slide` paints with these arguments."""
    truth = np.zeros((height, width), bool)
    for p in _pieces(seed):
        _paint(truth, p, True)
    return truth


def demo_canvas(width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT, seed: int = 0) -> np.ndarray:
    """The demo's level-0 RGB: flips/rotations of the IHC image (upscaled 2x) on glass."""
    from skimage import data

    src = cv2.resize(data.immunohistochemistry(), (PIECE, PIECE), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((height, width, 3), DEMO_GLASS, np.uint8)
    for p in _pieces(seed):
        piece = np.rot90(src, p.rot90)
        _paint(canvas, p, piece[:, ::-1] if p.flip else piece)
    return canvas


def build_demo_slide(path: str | Path, width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT, seed: int = 0) -> Path:
    """Pyramidal 20x TIFF of `demo_canvas` with an Aperio-style description (MPP, AppMag), so
    OpenSlide reads its physical resolution. Written to a temporary name, then renamed."""
    import tifffile

    path = Path(path)
    levels = [demo_canvas(width, height, seed)]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(cv2.resize(levels[-1], None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA))
    desc = (
        f"Aperio Image Library v12.0.0\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG Q=90"
        f"|AppMag = 20|MPP = {DEMO_MPP}|Filename = atlaspatch-demo"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        for i, lvl in enumerate(levels):
            tw.write(
                lvl,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                description=desc if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    os.replace(tmp, path)
    return path
