"""Classical tissue detection: HSV saturation → median blur → Otsu → morphological close.

Fluorescence slides (dark background, detected or given as `modality`) use the brightest
channel instead of saturation: tissue is where the signal is, above Otsu's threshold.
"""

from __future__ import annotations

import cv2
import numpy as np

from .base import SegmentationParams
from .modality import resolve_modality

FLUORESCENCE_FLOOR = 8  # brightest-channel value below which a fluorescence pixel is background


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def segment_otsu(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail; kernel sizes are physical (µm)."""
    if thumb.size == 0:
        return np.zeros(thumb.shape[:2], bool)
    if resolve_modality(thumb, params.modality) == "fluorescence":
        return _close(_fluorescence(thumb, thumb_mpp, params), thumb_mpp, params)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
    blurred = cv2.medianBlur(sat, min(_odd(params.median_blur_um / thumb_mpp), 255))
    if int(blurred.max()) - int(blurred.min()) < 2:
        # Flat saturation: either all glass or all tissue; Otsu is meaningless there.
        return blurred >= max(params.sat_floor * 3, 25)
    thr, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu can split tissue itself (pale vs. strongly stained) when the slide has little glass;
    # the ceiling keeps pale tissue, the floor keeps glass noise out.
    mask = (blurred > min(max(thr, params.sat_floor), params.sat_ceiling)).astype(np.uint8)
    return _close(mask, thumb_mpp, params)


def _fluorescence(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    """Signal density (brightest channel, box mean over `median_blur_um`) above Otsu's threshold
    in log space, never below FLUORESCENCE_FLOOR.

    A mean, not a median: in nuclear stains (DAPI) tissue is sparse bright dots on black, and
    their local density, not the typical pixel, tells tissue from background. The log spreads
    the dim tissue signal away from the near-zero background before Otsu.
    """
    signal = (thumb.max(axis=2) if thumb.ndim == 3 else thumb).astype(np.float32)
    k = min(_odd(params.median_blur_um / thumb_mpp), 255)
    density = cv2.blur(signal, (k, k))
    scale = np.log1p(255.0)
    log8 = np.clip(np.log1p(density) / scale * 255.0, 0, 255).astype(np.uint8)
    if int(log8.max()) - int(log8.min()) < 2:
        return (density > FLUORESCENCE_FLOOR).astype(np.uint8)
    t, _ = cv2.threshold(log8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(np.expm1(t / 255.0 * scale)), FLUORESCENCE_FLOOR)
    return (density > threshold).astype(np.uint8)


def _close(mask: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    k = _odd(params.close_um / thumb_mpp)
    mask = mask.astype(np.uint8)
    if k > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return mask.astype(bool)
