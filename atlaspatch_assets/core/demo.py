"""The demo slide: a small pyramidal 20x TIFF built from scikit-image's bundled IHC image.

Everything comes from installed packages: no download, no data in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

DEMO_MPP = 0.5  # 20x
TILE = 256


def build_demo_slide(path: str | Path, width: int = 6144, height: int = 4096, seed: int = 0) -> Path:
    """Tissue islands (flips/rotations of the IHC image, upscaled 2×) on white glass, with an
    Aperio-style description (MPP, AppMag) so OpenSlide reads its physical resolution."""
    import tifffile
    from skimage import data

    path = Path(path)
    src = cv2.resize(data.immunohistochemistry(), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    canvas = np.full((height, width, 3), 242, np.uint8)  # glass is not pure white
    yy, xx = np.mgrid[0:1024, 0:1024]
    r = np.hypot(yy - 512, xx - 512)
    for cy, cx in [(1100, 1300), (2900, 3000), (1300, 4700), (3000, 5200)]:
        piece = np.rot90(src, int(rng.integers(4)))
        piece = piece[:, ::-1] if rng.random() < 0.5 else piece
        blob = r < 420 + 60 * np.sin(np.arctan2(yy - 512, xx - 512) * 3 + rng.random() * 6)
        y0, x0 = cy - 512, cx - 512
        region = canvas[y0 : y0 + 1024, x0 : x0 + 1024]
        region[blob] = piece[blob]
    levels = [canvas]
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
