"""Brightfield or fluorescence, from the thumbnail: the background is glass (bright) or dark."""

from __future__ import annotations

import cv2
import numpy as np

MODALITIES = ("auto", "brightfield", "fluorescence")
DARK_BACKGROUND = 60  # median of the per-pixel max channel below this: a dark (fluorescence) background


def detect_modality(thumb: np.ndarray) -> str:
    """'fluorescence' when most of the slide is dark, else 'brightfield'.

    Brightfield slides are mostly glass (≈ 240) or stained tissue (rarely below 100 in every
    channel); fluorescence slides are mostly black background with bright signal.
    """
    if thumb.size == 0:
        return "brightfield"
    return "fluorescence" if _median_brightest(thumb) < DARK_BACKGROUND else "brightfield"


def _median_brightest(thumb: np.ndarray) -> float:
    """np.median of the per-pixel max channel, from a histogram when uint8 (fast on big thumbnails)."""
    if thumb.ndim == 3:
        planes = cv2.split(np.ascontiguousarray(thumb))
        brightest = planes[0]
        for p in planes[1:]:
            brightest = cv2.max(brightest, p)
    else:
        brightest = thumb
    if brightest.dtype != np.uint8:
        return float(np.median(brightest))
    counts = np.cumsum(cv2.calcHist([brightest], [0], None, [256], [0, 256]).ravel().astype(np.int64))
    n = int(counts[-1])
    lo = int(np.searchsorted(counts, (n - 1) // 2 + 1))  # the two middle order statistics
    hi = int(np.searchsorted(counts, n // 2 + 1))
    return (lo + hi) / 2.0


def resolve_modality(thumb: np.ndarray, requested: str) -> str:
    if requested not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {requested!r}")
    return detect_modality(thumb) if requested == "auto" else requested
