"""Mask post-processing shared by all methods: area filters in physical units, polygons."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from shapely.geometry import MultiPolygon, Polygon

REFERENCE_AREA_PX = 1024 * 1024  # --tissue-thresh is a fraction of this many mask pixels


@dataclass(frozen=True)
class SegmentationParams:
    method: str = "otsu"  # "otsu" (classical, no weights) or "sam2"
    # Min tissue region area as a fraction of the thumbnail, as in the seed, but the thumbnail
    # counts as at most 1024×1024 px at `mask_mpp`: on large slides the limit stays physical
    # (0.01 at 8 µm/px ≈ 0.67 mm²) instead of growing with the slide and erasing small biopsies.
    tissue_thresh: float = 0.01
    min_hole_area_um2: float = 20_000.0  # holes smaller than this are filled (0.02 mm²)
    mask_mpp: float = 8.0  # physical resolution of the thumbnail the mask is computed on
    median_blur_um: float = 56.0  # otsu: median filter size (physical)
    close_um: float = 32.0  # otsu: morphological closing kernel (physical)
    sat_floor: int = 12  # otsu: saturation below this is never tissue (glass/white)
    sat_ceiling: int = 30  # otsu: saturation above this is always tissue
    modality: str = "auto"  # otsu: brightfield / fluorescence (dark background), auto-detected
    sam2_checkpoint: str | None = None  # sam2: local .pt checkpoint (required)
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    sam2_thumbnail: int = 1024  # sam2: side of the square input
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def recipe(self) -> dict:
        """Parameters that change the mask (device/checkpoint path excluded where irrelevant)."""
        d = asdict(self)
        d.pop("device")
        d.pop("extra")
        if self.method != "sam2":
            for k in ("sam2_checkpoint", "sam2_config", "sam2_thumbnail"):
                d.pop(k)
        else:
            for k in ("median_blur_um", "close_um", "sat_floor", "sat_ceiling", "modality"):
                d.pop(k)
        return d


@dataclass
class TissueMask:
    """Binary tissue mask (uint8 0/1) at thumbnail resolution, plus its polygons (thumbnail px)."""

    mask: np.ndarray
    polygons: list[Polygon]
    thumb_mpp: float

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @classmethod
    def from_raw(cls, raw: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> TissueMask:
        px_um2 = thumb_mpp * thumb_mpp
        reference_px = min(raw.size, REFERENCE_AREA_PX * (params.mask_mpp / thumb_mpp) ** 2)
        min_tissue_px = params.tissue_thresh * reference_px
        min_hole_px = params.min_hole_area_um2 / px_um2
        polys = mask_to_polygons(raw, min_tissue_px, min_hole_px)
        mask = np.zeros(raw.shape, np.uint8)
        for p in polys:
            ext = np.round(np.asarray(p.exterior.coords)).astype(np.int32)
            cv2.fillPoly(mask, [ext], 1)
            for hole in p.interiors:
                cv2.fillPoly(mask, [np.round(np.asarray(hole.coords)).astype(np.int32)], 0)
        return cls(mask=mask, polygons=polys, thumb_mpp=thumb_mpp)


def mask_to_polygons(mask: np.ndarray, min_area_px: float, min_hole_px: float) -> list[Polygon]:
    """Outer contours with their holes (OpenCV CCOMP hierarchy), filtered by area in pixels."""
    m = mask.astype(np.uint8)
    if not m.any():
        return []
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]
    polys: list[Polygon] = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:  # a hole; handled with its parent
            continue
        area = cv2.contourArea(c)
        if area < max(min_area_px, 1.0) or len(c) < 3:
            continue
        holes = []
        j = hier[i][2]
        while j != -1:
            hc = contours[j]
            if cv2.contourArea(hc) >= min_hole_px and len(hc) >= 3:
                holes.append(hc[:, 0, :].astype(float))
            j = hier[j][0]
        poly = Polygon(c[:, 0, :].astype(float), holes)
        if not poly.is_valid:
            poly = poly.buffer(0)
        if isinstance(poly, MultiPolygon):
            polys.extend(g for g in poly.geoms if g.area > 0)
        elif not poly.is_empty:
            polys.append(poly)
    return polys
