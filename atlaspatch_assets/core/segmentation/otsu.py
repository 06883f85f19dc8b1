"""Classical tissue detection: HSV saturation → median blur → Otsu → morphological close."""

from __future__ import annotations

import cv2
import numpy as np

from .base import SegmentationParams


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def segment_otsu(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail; kernel sizes are physical (µm)."""
    if thumb.size == 0:
        return np.zeros(thumb.shape[:2], bool)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
    blurred = cv2.medianBlur(sat, min(_odd(params.median_blur_um / thumb_mpp), 255))
    if int(blurred.max()) - int(blurred.min()) < 2:
        # Flat saturation: either all glass or all tissue; Otsu is meaningless there.
        return blurred >= max(params.sat_floor * 3, 25)
    thr, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu can split tissue itself (pale vs. strongly stained) when the slide has little glass;
    # the ceiling keeps pale tissue, the floor keeps glass noise out.
    mask = (blurred > min(max(thr, params.sat_floor), params.sat_ceiling)).astype(np.uint8)
    k = _odd(params.close_um / thumb_mpp)
    if k > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return mask.astype(bool)
