"""Patch lattice over the slide, tissue fraction per patch, and the optional content filter."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .errors import GeometryError
from .geometry import PatchGeometry

INT32_MAX = 2**31 - 1  # coordinates are stored as int32 (ARCHITECTURE.md, "Geometry")
DEFAULT_MIN_TISSUE_FRACTION = 0.5  # like CLAM's "center in contour" rule, but measured on area
CONTENT_MAJORITY = 0.7  # a patch is white/black when >= 70 % of its pixels are


@dataclass
class Tiling:
    coords: np.ndarray  # int32 (N, 2) level-0 top-left (x, y)
    tissue_fraction: np.ndarray  # float32 (N,)
    grid_size: int  # lattice positions considered (before filtering)


def lattice(width: int, height: int, size0: int, step0: int) -> np.ndarray:
    """Slide-global lattice anchored at (0, 0): every patch lies fully inside the slide.

    A slide wider or taller than int32 level-0 coordinates is refused (never wrapped around)."""
    if max(width, height) > INT32_MAX:
        raise GeometryError(
            f"slide of {width}x{height} px exceeds the int32 level-0 coordinates of the store (max {INT32_MAX})"
        )
    xs = np.arange(0, width - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, height - size0 + 1, step0, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int32)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int32)


def mask_boxes(coords: np.ndarray, size0: int, dx: float, dy: float, shape: tuple[int, int]) -> np.ndarray:
    """Mask-pixel box [x0, x1) × [y0, y1) covered by each patch (at least one pixel)."""
    h, w = shape
    x0 = np.clip(np.round(coords[:, 0] / dx), 0, w - 1).astype(np.int64)
    y0 = np.clip(np.round(coords[:, 1] / dy), 0, h - 1).astype(np.int64)
    x1 = np.clip(np.maximum(x0 + 1, np.round((coords[:, 0] + size0) / dx)), 1, w).astype(np.int64)
    y1 = np.clip(np.maximum(y0 + 1, np.round((coords[:, 1] + size0) / dy)), 1, h).astype(np.int64)
    return np.stack([x0, y0, x1, y1], axis=1)


def tissue_fractions(mask: np.ndarray, dx: float, dy: float, coords: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of tissue pixels of the mask inside each patch footprint (integral image)."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    integral = cv2.integral(mask.astype(np.uint8))  # (h+1, w+1), int32
    b = mask_boxes(coords, size0, dx, dy, mask.shape)
    s = (
        integral[b[:, 3], b[:, 2]]
        - integral[b[:, 1], b[:, 2]]
        - integral[b[:, 3], b[:, 0]]
        + integral[b[:, 1], b[:, 0]]
    )
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return (s / np.maximum(area, 1)).astype(np.float32)


def tile(
    mask: np.ndarray,
    dx: float,
    dy: float,
    width: int,
    height: int,
    geometry: PatchGeometry,
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
) -> Tiling:
    grid = lattice(width, height, geometry.patch_size_level0, geometry.step_size_level0)
    frac = tissue_fractions(mask, dx, dy, grid, geometry.patch_size_level0)
    keep = frac >= min_tissue_fraction
    return Tiling(coords=grid[keep], tissue_fraction=frac[keep], grid_size=len(grid))


def is_background(patch: np.ndarray, white_thresh: int, black_thresh: int) -> bool:
    """Seed's content filter: >= 70 % white (S < white_thresh and V >= 200) or black (gray < black)."""
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)
    white = np.mean((hsv[..., 1] < white_thresh) & (hsv[..., 2] >= 200))
    if white >= CONTENT_MAJORITY:
        return True
    gray = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    return bool(np.mean(gray < black_thresh) >= CONTENT_MAJORITY)
