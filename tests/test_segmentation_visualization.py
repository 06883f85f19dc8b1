"""Quality-control pictures: size (max_side, never upscaled), the overlay base read from a slide,
and lines that stay visible on dark (fluorescence) slides."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import CMU, NDPI, SMALL16

from atlaspatch_assets.core.segmentation import SegmentationParams
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages.coords import CoordsParams, compute_patch_coords
from atlaspatch_assets.core.stages.mask import compute_tissue_mask
from atlaspatch_assets.core.store import RunLayout
from atlaspatch_assets.core.visualization import (
    DEFAULT_MAX_SIDE,
    contour_overlay,
    grid_overlay,
    is_dark,
    jpeg_bytes,
    markdown_image,
    mask_overlay,
    png_bytes,
    read_overlay_base,
)


@pytest.fixture(scope="module")
def ndpi_run(tmp_path_factory: pytest.TempPathFactory):
    layout = RunLayout.create(tmp_path_factory.mktemp("vis"), 256, target_mag=20)
    with open_slide(NDPI) as slide:
        mask = compute_tissue_mask(slide, "ndpi", SegmentationParams())
        coords = compute_patch_coords(slide, "ndpi", layout, mask, CoordsParams())
        base = read_overlay_base(slide, 1200)
    return mask, coords, base


def test_overlay_base_size_and_level_never_finer_than_level0() -> None:
    with open_slide(CMU) as slide:  # 2220 x 2967, a single level
        big = read_overlay_base(slide, DEFAULT_MAX_SIDE)
        huge = read_overlay_base(slide, 10_000)
        w, h = slide.info.width, slide.info.height
    assert max(big.rgb.shape[:2]) == DEFAULT_MAX_SIDE
    assert big.downsample[0] == pytest.approx(h / DEFAULT_MAX_SIDE, rel=0.01)
    assert huge.rgb.shape[:2] == (h, w) and huge.downsample == (1.0, 1.0)  # level 0 at most


def test_overlays_fit_max_side_and_never_upscale(ndpi_run) -> None:
    mask, coords, base = ndpi_run
    thumb = mask.thumbnail
    assert thumb is not None and max(thumb.shape[:2]) < 500
    for img in (
        mask_overlay(thumb, mask.mask),
        contour_overlay(thumb, mask.polygons),
        grid_overlay(thumb, coords.coords, coords.geometry.patch_size_level0, *mask.downsample),
    ):
        assert img.shape == thumb.shape  # the default max_side (2000) does not blow the thumbnail up
    for img in (base.mask(mask.mask, 800), base.contours(mask.polygons, mask.downsample, 800)):
        assert max(img.shape[:2]) == 800
    with open_slide(SMALL16) as slide:  # 16 x 16 px: stays 16 x 16
        assert read_overlay_base(slide).rgb.shape[:2] == (16, 16)


def test_grid_and_contours_are_bright_on_a_dark_slide(ndpi_run) -> None:
    mask, coords, base = ndpi_run
    assert is_dark(base.rgb)
    grid = base.grid(coords.coords, coords.geometry.patch_size_level0)
    drawn = np.any(grid != base.rgb, axis=2)
    assert drawn.mean() > 0.005
    grey = cv2.cvtColor(grid, cv2.COLOR_RGB2GRAY)
    background = cv2.cvtColor(base.rgb, cv2.COLOR_RGB2GRAY)
    assert grey[drawn].mean() > 150 > 4 * np.median(background)  # light lines on a dark slide
    # the grid lands where the patches are: each patch's top-left corner is on a drawn line
    x, y = coords.coords[len(coords.coords) // 2]
    px, py = round(x / base.downsample[0]), round(y / base.downsample[1])
    assert drawn[max(0, py - 1) : py + 2, max(0, px - 1) : px + 2].any()
    contours = base.contours(mask.polygons, mask.downsample).astype(int)
    bright_green = (contours[..., 1] > 200) & (contours[..., 0] < 160)
    assert bright_green.sum() > 500 and not (base.rgb[..., 1] > 200).any()  # the outline, not the slide


def test_lines_are_dark_on_a_brightfield_slide() -> None:
    with open_slide(CMU) as slide:
        mask = compute_tissue_mask(slide, "cmu", SegmentationParams())
        base = read_overlay_base(slide, 1000)
    assert not is_dark(base.rgb)
    img = base.contours(mask.polygons, mask.downsample).astype(int)
    dark_green = (img[..., 1] > 100) & (img[..., 0] < 60) & (img[..., 2] < 60)  # the outline's colour
    assert dark_green.sum() > 500
    assert not ((base.rgb[..., 1] > 100) & (base.rgb[..., 0] < 60) & (base.rgb[..., 2] < 60)).any()


def test_encoders_and_markdown() -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[10:20, 10:30] = (255, 0, 0)
    png, jpg = png_bytes(rgb), jpeg_bytes(rgb)
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    assert jpg[:2] == b"\xff\xd8"
    assert markdown_image(png).startswith("![preview](data:image/png;base64,")
    assert markdown_image(jpg, "grid").startswith("![grid](data:image/jpeg;base64,")
