"""Mask post-processing shared by all methods: area filters in physical units, polygons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
from shapely.geometry import MultiPolygon, Polygon

from ..params import param, recipe_of

REFERENCE_AREA_PX = 1024 * 1024  # --tissue-thresh is a fraction of this many mask pixels


@dataclass(frozen=True)
class SegmentationParams:
    """How the tissue mask is computed (the segmentation part of the tissue_mask stage)."""

    SECTION: ClassVar[str] = "tissue_mask"

    method: str = param(
        "otsu",
        "Tissue segmentation: otsu (classical, any stain, ink/debris rules, no weights) or sam2 (local checkpoint)",
        choices=("otsu", "sam2"),
        cli="seg-method",
    )
    # Min tissue region area as a fraction of the thumbnail, as in the seed, but the thumbnail
    # counts as at most 1024×1024 px at `mask_mpp`: on large slides the limit stays physical
    # (0.01 at 8 µm/px ≈ 0.67 mm²) instead of growing with the slide and erasing small biopsies.
    tissue_thresh: float = param(0.01, "Minimum tissue region area, fraction of the thumbnail (0-1)", ge=0, le=1)
    min_hole_area_um2: float = param(20_000.0, "Holes smaller than this (µm²) are filled", ge=0, cli="")
    mask_mpp: float = param(8.0, "Thumbnail resolution the mask is computed on (µm/px)", gt=0, cli="")
    median_blur_um: float = param(56.0, "fluorescence: signal density window (µm)", ge=0, cli="")
    close_um: float = param(32.0, "otsu: morphological closing kernel (µm)", ge=0, cli="")
    min_density: float = param(
        0.03, "otsu: least optical density above the glass that can be tissue (natural log)", ge=0, le=3, cli=""
    )
    neutral_ratio: float = param(
        0.2,
        "otsu: colourless matter (chroma/density below this: edges, dust, black ink) is not tissue; 0 keeps it",
        ge=0,
        le=1,
        cli="",
    )
    ink: bool = param(True, "otsu: marker ink (blue, green, red hue rules) is not tissue", cli="")
    modality: str = param(
        "auto",
        "Stain modality for otsu: fluorescence = dark background (auto-detected)",
        choices=("auto", "brightfield", "fluorescence"),
    )
    sam2_checkpoint: str | None = param(None, "Local SAM2.1 hiera-tiny checkpoint (.pt) for sam2; never downloaded")
    sam2_config: str = param("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2: model config inside the sam2 package", cli="")
    sam2_thumbnail: int = param(1024, "sam2: side of the square input (px)", gt=0, cli="")
    device: str = "cpu"  # not a parameter of its own: the stage sets it from the compute settings

    def recipe(self) -> dict:
        """Parameters that change the mask (the other method's parameters excluded)."""
        d = recipe_of(self)
        if self.method != "sam2":
            for k in ("sam2_checkpoint", "sam2_config", "sam2_thumbnail"):
                d.pop(k)
        else:
            for k in ("median_blur_um", "close_um", "min_density", "neutral_ratio", "ink", "modality"):
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
    """Outer contours with their holes (OpenCV CCOMP hierarchy); a region is kept when its area
    without its holes is at least `min_area_px`; holes smaller than `min_hole_px` are filled."""
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
            hole_area = cv2.contourArea(hc)
            if hole_area >= min_hole_px and len(hc) >= 3:
                holes.append(hc[:, 0, :].astype(float))
                area -= hole_area
            j = hier[j][0]
        # the area that counts is what remains without the kept holes: a thin ring (bubble rim,
        # a circle drawn around tissue) encloses a large area but covers little
        if area < max(min_area_px, 1.0):
            continue
        poly = Polygon(c[:, 0, :].astype(float), holes)
        if not poly.is_valid:
            poly = poly.buffer(0)
        if isinstance(poly, MultiPolygon):  # a contour touching itself: keep the parts, not slivers
            polys.extend(g for g in poly.geoms if g.area >= max(4.0, 0.01 * poly.area))
        elif not poly.is_empty:
            polys.append(poly)
    return polys
