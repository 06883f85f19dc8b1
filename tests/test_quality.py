"""Patch quality flags on real pixels: ink share on a pen-marked demo slide, focus on CMU with half
of it blurred, the keep mask, the parameters' recipe."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import APERIO_DESC, CMU, NDPI, write_aperio_tiff

from atlaspatch_assets.core.demo import demo_canvas, demo_truth_mask
from atlaspatch_assets.core.errors import UsageError
from atlaspatch_assets.core.params import check_params
from atlaspatch_assets.core.quality import (
    QualityParams,
    artifact_mask,
    focus_scores,
    ink_fractions,
    patch_quality,
)
from atlaspatch_assets.core.segmentation import SegmentationParams
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages.coords import CoordsParams, compute_patch_coords
from atlaspatch_assets.core.stages.mask import compute_tissue_mask
from atlaspatch_assets.core.store import RunLayout
from atlaspatch_assets.core.tiling import lattice

SIZE0 = 512  # 256 px at 20x on these 0.5 µm/px slides


@pytest.fixture(scope="module")
def pen_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The demo slide with a blue and a green marker stroke on the glass; returns (path, stroke mask)."""
    rgb = demo_canvas()
    h, w = rgb.shape[:2]
    stroke = np.zeros((h, w), np.uint8)
    cv2.polylines(stroke, [np.array([(200, 3650), (2500, 3450), (5900, 3700)], np.int32)], False, 1, 1000)
    cv2.polylines(stroke, [np.array([(2300, 300), (3600, 1500)], np.int32)], False, 2, 900)
    stroke[cv2.dilate(demo_truth_mask().astype(np.uint8), np.ones((101, 101), np.uint8)) > 0] = 0
    od = np.zeros((h, w, 3), np.float32)
    od[stroke == 1] = (1.7, 1.15, 0.45)  # blue marker
    od[stroke == 2] = (1.5, 0.6, 0.95)  # green marker
    marked = np.clip(rgb.astype(np.float32) * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
    path = write_aperio_tiff(tmp_path_factory.mktemp("pen") / "pen.svs", marked)
    return path, stroke > 0


@pytest.fixture(scope="module")
def half_blurred_cmu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU with its lower half out of focus (Gaussian blur, σ = 4 µm)."""
    with open_slide(CMU) as slide:
        rgb = slide.read_region((0, 0), 0, (slide.info.width, slide.info.height))
    half = rgb.shape[0] // 2
    rgb[half:] = cv2.GaussianBlur(rgb[half:], (0, 0), 4.0 / 0.5)
    return _write_pyramid(tmp_path_factory.mktemp("blur") / "cmu-half-blurred.svs", rgb)


def _write_pyramid(path: Path, rgb: np.ndarray) -> Path:
    """Aperio-like TIFF (0.5 µm/px) whose levels /4 and /16 are area-downsampled, as scanners do."""
    import tifffile

    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate((1, 4, 16)):
            level = rgb if ds == 1 else cv2.resize(rgb, (w // ds, h // ds), interpolation=cv2.INTER_AREA)
            desc = (
                APERIO_DESC.format(w=w, h=h) if i == 0 else f"Aperio Image Library v1.0\n{w}x{h} -> {w // ds}x{h // ds}"
            )
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb", description=desc, metadata=None)
    return path


def test_params_off_by_default_and_in_the_recipe_when_on() -> None:
    off = QualityParams()
    assert not off.enabled and off.recipe() == {}
    stored = QualityParams(patch_quality=True).recipe()
    assert stored["patch_quality"] and "max_ink_fraction" not in stored and not stored["remove_artifacts"]
    dropping = QualityParams(remove_artifacts=True, max_ink_fraction=0.2, min_focus=0.1)
    assert dropping.enabled
    assert dropping.recipe() == {
        "patch_quality": True,
        "focus_mpp": 2.0,
        "remove_artifacts": True,
        "max_ink_fraction": 0.2,
        "min_focus": 0.1,
    }
    with pytest.raises(UsageError, match="max_ink_fraction"):
        check_params(QualityParams(max_ink_fraction=1.5))


def test_ink_fraction_of_patches_on_and_off_the_strokes(pen_slide: tuple[Path, np.ndarray]) -> None:
    path, stroke = pen_slide
    with open_slide(path) as slide:
        thumb, dx, dy = slide.read_thumbnail(8.0)
        thumb_mpp = slide.info.mpp * (dx + dy) / 2
        grid = lattice(slide.info.width, slide.info.height, SIZE0, SIZE0)
    ink = ink_fractions(artifact_mask(thumb, thumb_mpp), dx, dy, grid, SIZE0)
    cover = np.array([stroke[y : y + SIZE0, x : x + SIZE0].mean() for x, y in grid])
    tissue = np.array([demo_truth_mask()[y : y + SIZE0, x : x + SIZE0].mean() for x, y in grid])
    on_ink, clear = cover >= 0.9, (cover == 0) & (tissue > 0.5)
    assert on_ink.sum() >= 10 and clear.sum() >= 4
    assert ink.dtype == np.float32 and ink.shape == (len(grid),)
    assert ink[on_ink].min() >= 0.7
    assert ink[clear].max() <= 0.05


def test_focus_tells_the_blurred_half(half_blurred_cmu: Path) -> None:
    layout = RunLayout.create(half_blurred_cmu.parent / "out", 256, target_mag=20)
    with open_slide(half_blurred_cmu) as slide:
        mask = compute_tissue_mask(slide, "cmu", SegmentationParams())
        coords = compute_patch_coords(slide, "cmu", layout, mask, CoordsParams()).coords
        focus, level = focus_scores(slide, coords, SIZE0, focus_mpp=2.0, workers=2)
        half = slide.info.height // 2
    assert level == 1  # the 2 µm/px level (downsample 4) is read, not level 0
    sharp, blurred = coords[:, 1] + SIZE0 <= half, coords[:, 1] >= half
    assert sharp.sum() >= 5 and blurred.sum() >= 5
    assert np.median(focus[sharp]) > 10 * np.median(focus[blurred])
    threshold = QualityParams().min_focus
    assert (focus[sharp] >= threshold).mean() >= 0.9
    assert (focus[blurred] < threshold).mean() >= 0.9


def test_patch_quality_keeps_and_drops(pen_slide: tuple[Path, np.ndarray]) -> None:
    path, _ = pen_slide
    with open_slide(path) as slide:
        thumb, dx, dy = slide.read_thumbnail(8.0)
        artifact = artifact_mask(thumb, slide.info.mpp * (dx + dy) / 2)
        grid = lattice(slide.info.width, slide.info.height, SIZE0, SIZE0)
        off = patch_quality(slide, grid, SIZE0, artifact, dx, dy, QualityParams(patch_quality=True))
        on = patch_quality(
            slide, grid, SIZE0, artifact, dx, dy, QualityParams(remove_artifacts=True, quality_workers=3)
        )
        one_thread, _ = focus_scores(slide, grid, SIZE0, workers=1)
    assert off.keep.all() and off.removed_ink == off.removed_focus == 0
    np.testing.assert_array_equal(on.focus, one_thread)  # threads change nothing
    np.testing.assert_array_equal(on.ink_fraction, off.ink_fraction)
    assert on.removed_ink == int((on.ink_fraction > 0.1).sum()) > 0
    assert not on.keep[on.ink_fraction > 0.1].any()
    # glass patches are flat: they fail the focus rule (tissue patches are kept by it)
    assert on.removed_focus > 0 and on.keep.sum() == len(grid) - on.removed_ink - on.removed_focus


def test_fluorescence_has_no_artifact_rules() -> None:
    with open_slide(NDPI) as slide:
        thumb, dx, dy = slide.read_thumbnail(8.0)
    assert not artifact_mask(thumb, 8.0).any()
