"""Brightfield vs fluorescence segmentation on the real slides (Aperio H&E, Hamamatsu DAPI)."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import CMU, NDPI

from atlaspatch_assets.core.segmentation import SegmentationParams, segment_tissue
from atlaspatch_assets.core.segmentation.modality import detect_modality
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages.mask import compute_tissue_mask, save_tissue_mask
from atlaspatch_assets.core.store import RunLayout


def _thumb(path: Path, mpp: float = 8.0) -> tuple[np.ndarray, float]:
    with open_slide(path) as slide:
        thumb, dx, dy = slide.read_thumbnail(mpp)
        return thumb, slide.info.mpp * (dx + dy) / 2


def test_modality_is_detected_from_the_background() -> None:
    assert detect_modality(_thumb(NDPI)[0]) == "fluorescence"
    assert detect_modality(_thumb(CMU)[0]) == "brightfield"


@pytest.mark.parametrize("mpp", [8.0, 2.0])
def test_dapi_mask_covers_the_nuclei_and_not_the_black_background(mpp: float) -> None:
    thumb, thumb_mpp = _thumb(NDPI, mpp)
    mask = segment_tissue(thumb, thumb_mpp, SegmentationParams(mask_mpp=mpp)).mask.astype(bool)
    signal = thumb.max(axis=2)
    nuclei = signal > 60  # bright DAPI signal
    # background: no signal anywhere within ~100 µm
    k = max(3, int(round(100 / thumb_mpp)) | 1)
    empty = cv2.dilate(signal, np.ones((k, k), np.uint8)) < 12
    assert nuclei.any() and empty.any()
    assert mask[nuclei].mean() > 0.9, f"nuclei inside the mask: {mask[nuclei].mean():.2f}"
    assert mask[empty].mean() < 0.1, f"empty background inside the mask: {mask[empty].mean():.2f}"
    assert 0.5 < mask.mean() < 0.95
    # the brightfield (saturation) method on the same slide calls everything tissue
    as_brightfield = segment_tissue(thumb, thumb_mpp, SegmentationParams(mask_mpp=mpp, modality="brightfield"))
    assert as_brightfield.tissue_fraction > 0.97


def test_brightfield_slides_are_unchanged_by_auto() -> None:
    thumb, thumb_mpp = _thumb(CMU)
    auto = segment_tissue(thumb, thumb_mpp, SegmentationParams())
    forced = segment_tissue(thumb, thumb_mpp, SegmentationParams(modality="brightfield"))
    np.testing.assert_array_equal(auto.mask, forced.mask)
    with pytest.raises(ValueError, match="modality"):
        segment_tissue(thumb, thumb_mpp, SegmentationParams(modality="infrared"))


def test_stored_mask_records_the_modality_and_the_recipe_the_request(tmp_path: Path) -> None:
    layout = RunLayout.create(tmp_path, 256, target_mag=20)
    with open_slide(NDPI) as slide:
        result = compute_tissue_mask(slide, "ndpi", SegmentationParams())
    save_tissue_mask(layout, result)
    with h5py.File(layout.store("ndpi").path) as f:
        attrs = dict(f["tissue/mask"].attrs)
    assert attrs["modality"] == "fluorescence"  # what was detected
    assert result.params["modality"] == "auto"  # the recipe keeps what was asked: stable skip-existing


def test_no_fast_mode_keeps_dapi_tissue_patches(tmp_path: Path) -> None:
    """The brightfield white/black filter would drop DAPI tissue (black between nuclei): skipped."""
    from atlaspatch_assets.core.stages.coords import CoordsParams, compute_patch_coords

    layout = RunLayout.create(tmp_path, 256, target_mag=20)
    with open_slide(NDPI) as slide:
        mask = compute_tissue_mask(slide, "ndpi", SegmentationParams())
        fast = compute_patch_coords(slide, "ndpi", layout, mask, CoordsParams(fast_mode=True))
        slow = compute_patch_coords(slide, "ndpi", layout, mask, CoordsParams(fast_mode=False))
    assert len(fast.coords) > 0
    np.testing.assert_array_equal(slow.coords, fast.coords)
    assert any("fluorescence" in w for w in slow.warnings)
