"""Patch quality flags without weights (what TRIDENT's artifact removal gives): ink share, focus.

* `ink_fraction`: share of a patch's footprint that the classical segmenter sets aside as marker
  ink or colourless matter (black ink, dust, dark edges, bubble rims; see
  `segmentation/artifacts.py`), measured on the mask's grid with the boxes of
  `tiling.tissue_fractions` (the same cells `tissue_fraction` counts). Cheap: one thumbnail pass.
* `focus`: var(Laplacian) / (var(grey) + 25) of the patch's grey level read at `focus_mpp`
  (~2 µm/px) from the coarsest pyramid level that is at least as fine. Contrast-normalized, so
  pale and dark tissue score alike. Measured on CMU-1 (H&E), the demo's IHC and the DAPI slide:
  sharp tissue 0.3-5 (5th percentile >= 0.29), a defocus of σ = 2 µm 0.02-0.5, σ = 4 µm
  0.01-0.08, glass ~0.002; the default `min_focus` 0.1 drops strong defocus and keeps a 3x margin
  under the softest sharp tissue. One small read per patch, threads, bounded memory.

Proposed store layout (datasets beside `tissue_fraction`, same row order as `coords`, written by
the patch-coordinates stage when `QualityParams.enabled`):

  ink_fraction  float32 (N,)   attrs: parameters (QualityParams.recipe(), JSON), definition
  focus         float32 (N,)   attrs: parameters, focus_mpp, read_level (level the score was read
                               from), definition
  file attrs:   quality_removed_ink, quality_removed_focus (patches dropped by each rule, int)

Off by default: nothing is computed, stored or dropped and `recipe()` is empty, so existing
recipes keep their hash. `--patch-quality` computes and stores both; `--remove-artifacts` also
drops patches with `ink_fraction > max_ink_fraction` or `focus < min_focus` (recorded in the recipe).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np

from .params import param
from .tiling import tissue_fractions

if TYPE_CHECKING:
    from .segmentation import SegmentationParams
    from .slide import Slide

FOCUS_EPS = 25.0  # grey variance added to the denominator: flat patches do not divide by ~0
MIN_FOCUS_SIDE = 16  # px: a patch is never scored on fewer pixels than this per side


@dataclass(frozen=True)
class QualityParams:
    """Per-patch quality flags of the patch_coords stage (ink share, focus) and the drop rule."""

    SECTION: ClassVar[str] = "patch_coords"

    patch_quality: bool = param(False, "Compute and store ink_fraction and focus per patch")
    remove_artifacts: bool = param(
        False, "Drop patches with ink above --max-ink-fraction or focus below --min-focus (implies --patch-quality)"
    )
    max_ink_fraction: float = param(
        0.1, "With --remove-artifacts: drop patches with more ink/debris than this share (0-1)", ge=0, le=1
    )
    min_focus: float = param(
        0.1, "With --remove-artifacts: drop patches whose focus score is below this (0 keeps all)", ge=0
    )
    focus_mpp: float = param(2.0, "Resolution the focus score is measured at (µm/px)", gt=0, cli="")
    quality_workers: int = param(2, "Threads reading patches for the focus score", ge=1, recipe=False, cli="")

    @property
    def enabled(self) -> bool:
        return self.patch_quality or self.remove_artifacts

    def recipe(self) -> dict[str, Any]:
        """Empty when off; else what changes the stored flags (and the thresholds when dropping)."""
        if not self.enabled:
            return {}
        d: dict[str, Any] = {"patch_quality": True, "focus_mpp": self.focus_mpp, "remove_artifacts": False}
        if self.remove_artifacts:
            d.update(remove_artifacts=True, max_ink_fraction=self.max_ink_fraction, min_focus=self.min_focus)
        return d


@dataclass
class PatchQuality:
    ink_fraction: np.ndarray  # float32 (N,)
    focus: np.ndarray  # float32 (N,)
    keep: np.ndarray  # bool (N,): all True unless remove_artifacts
    removed_ink: int
    removed_focus: int  # dropped for focus only (not already dropped for ink)
    focus_level: int  # pyramid level the focus was read from


def artifact_mask(thumb: np.ndarray, thumb_mpp: float, seg: SegmentationParams | None = None) -> np.ndarray:
    """Bool mask (thumbnail grid) of ink and colourless matter, by the segmenter's own rules.

    Fluorescence thumbnails have no such rules: all False.
    """
    from .segmentation import SegmentationParams
    from .segmentation.modality import resolve_modality
    from .segmentation.otsu import brightfield_layers

    seg = seg or SegmentationParams()
    if thumb.size == 0 or resolve_modality(thumb, seg.modality) == "fluorescence":
        return np.zeros(thumb.shape[:2], bool)
    lay = brightfield_layers(thumb if thumb.ndim == 3 else np.dstack([thumb] * 3), thumb_mpp, seg)
    return lay.ink | lay.neutral


def ink_fractions(ink: np.ndarray, dx: float, dy: float, coords: np.ndarray, size0: int) -> np.ndarray:
    """float32 (N,) share of each patch's footprint (mask-grid box, as tissue_fractions) under ink."""
    return tissue_fractions(ink, dx, dy, np.asarray(coords).reshape(-1, 2), size0)


def focus_score(rgb: np.ndarray) -> float:
    """var(Laplacian) / (var(grey) + FOCUS_EPS) of an RGB uint8 patch (contrast-normalized)."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)
    return float(lap.var() / (grey.var() + FOCUS_EPS))


def focus_geometry(slide: Slide, size0: int, focus_mpp: float) -> tuple[int, int, int]:
    """(read level, read size at that level, scored size) for patches of `size0` level-0 px."""
    mpp = slide.info.mpp or focus_mpp
    want_ds = max(1.0, focus_mpp / mpp)
    level = slide.best_level_for_downsample(want_ds)
    read = max(1, round(size0 / slide.info.level_downsamples[level]))
    out = max(MIN_FOCUS_SIDE, round(size0 / want_ds))
    return level, read, min(out, read)


def focus_scores(
    slide: Slide, coords: np.ndarray, size0: int, focus_mpp: float = 2.0, workers: int = 2
) -> tuple[np.ndarray, int]:
    """float32 (N,) focus of each patch (level-0 top-left coords) and the level read from.

    Thread-safe: each task reads its own region (`Slide.read_region`) and keeps nothing shared.
    """
    coords = np.asarray(coords).reshape(-1, 2)
    level, read, out = focus_geometry(slide, size0, focus_mpp)

    def one(xy: np.ndarray) -> float:
        box = slide.read_region((int(xy[0]), int(xy[1])), level, (read, read))
        if read != out:
            box = cv2.resize(box, (out, out), interpolation=cv2.INTER_AREA)
        return focus_score(box)

    if len(coords) == 0:
        return np.zeros(0, np.float32), level
    if workers <= 1:
        return np.array([one(c) for c in coords], np.float32), level
    with ThreadPoolExecutor(workers) as pool:
        return np.fromiter(pool.map(one, coords, chunksize=64), np.float32, len(coords)), level


def patch_quality(
    slide: Slide,
    coords: np.ndarray,
    size0: int,
    artifact: np.ndarray,
    dx: float,
    dy: float,
    params: QualityParams,
) -> PatchQuality:
    """Ink share and focus of every patch, and which to keep (all unless `remove_artifacts`).

    `artifact` is the `artifact_mask` of the mask's thumbnail; (dx, dy) its downsample.
    """
    coords = np.asarray(coords).reshape(-1, 2)
    ink = ink_fractions(artifact, dx, dy, coords, size0)
    focus, level = focus_scores(slide, coords, size0, params.focus_mpp, params.quality_workers)
    keep = np.ones(len(coords), bool)
    removed_ink = removed_focus = 0
    if params.remove_artifacts:
        bad_ink = ink > params.max_ink_fraction
        bad_focus = (focus < params.min_focus) & ~bad_ink
        removed_ink, removed_focus = int(bad_ink.sum()), int(bad_focus.sum())
        keep = ~(bad_ink | bad_focus)
    return PatchQuality(ink, focus, keep, removed_ink, removed_focus, level)
