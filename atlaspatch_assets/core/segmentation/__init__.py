"""Tissue segmentation methods behind one registry: name → function(thumbnail, params) → mask."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from .base import SegmentationParams, TissueMask, mask_to_polygons

SegmentFn = Callable[[np.ndarray, float, SegmentationParams], np.ndarray]


def _otsu(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    from .otsu import segment_otsu

    return segment_otsu(thumb, thumb_mpp, params)


def _sam2(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    from .sam2 import segment_sam2

    return segment_sam2(thumb, thumb_mpp, params)


SEGMENTERS: dict[str, SegmentFn] = {"otsu": _otsu, "sam2": _sam2}

__all__ = ["SEGMENTERS", "SegmentationParams", "TissueMask", "mask_to_polygons", "segment_tissue"]


def segment_tissue(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> TissueMask:
    """Run the chosen method, then filter regions/holes by area and return mask + polygons."""
    from ..errors import SegmentationError

    fn = SEGMENTERS.get(params.method)
    if fn is None:
        raise SegmentationError(f"unknown segmentation method {params.method!r}; choose {sorted(SEGMENTERS)}")
    raw = fn(thumb, thumb_mpp, params)
    tm = TissueMask.from_raw(raw.astype(bool), thumb_mpp, params)
    if not tm.polygons:
        logging.getLogger("atlaspatch").warning(
            "tissue mask: no tissue found on the %dx%d thumbnail (%s)", thumb.shape[1], thumb.shape[0], params.method
        )
    return tm
