"""Scoring a tissue mask against a known one (benchmarks and tests): both on the mask's grid."""

from __future__ import annotations

import cv2
import numpy as np


def to_grid(truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A fine bool mask on a coarser (h, w) grid: a cell is set when at least half of its area is.

    Area interpolation, the way the thumbnail itself is read, so both describe the same cells.
    """
    h, w = shape
    if truth.shape == (h, w):
        return truth.astype(bool)
    frac = cv2.resize(truth.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return frac >= 0.5


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|); 1.0 when both are empty."""
    a, b = mask.astype(bool), truth.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def called_tissue(mask: np.ndarray, region: np.ndarray) -> float:
    """Fraction of `region`'s pixels the mask calls tissue (NaN when the region is empty)."""
    r = region.astype(bool)
    n = int(r.sum())
    return float("nan") if n == 0 else float(mask.astype(bool)[r].mean())
