"""The default classical segmentation against known masks: the demo slide (its painted truth) and
the demo's IHC tissue made pale, put on uneven, tinted or dark glass, with pen, dust and edges;
plus the real slides (H&E, plain IHC with dust) and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CMU, JPEG, KIDNEY

from atlaspatch_assets.core.demo import DEMO_MPP, build_demo_slide, demo_canvas, demo_truth_mask
from atlaspatch_assets.core.segmentation import SegmentationParams, segment_tissue
from atlaspatch_assets.core.segmentation.scoring import called_tissue, dice, to_grid
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages.mask import compute_tissue_mask

WORK_MPP = 2.0  # the painted variants are made at 2 µm/px, then read at the mask's 8 µm/px
MASK_MPP = 8.0


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_slide(tmp_path_factory.mktemp("demo") / "demo.svs")


@pytest.fixture(scope="module")
def demo_od() -> tuple[np.ndarray, np.ndarray]:
    """The demo's glass-relative optical density at 2 µm/px (h, w, 3) and its truth (level 0)."""
    canvas = demo_canvas()
    f = DEMO_MPP / WORK_MPP
    small = cv2.resize(canvas, None, fx=f, fy=f, interpolation=cv2.INTER_AREA).astype(np.float32)
    od = np.maximum(np.log(242.0 / np.maximum(small, 1.0)), 0.0)
    return od, demo_truth_mask()


def _render(od: np.ndarray, glass: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.asarray(glass, np.float32) * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)


def _segment(rgb_2um: np.ndarray) -> np.ndarray:
    """Thumbnail at the mask's resolution (area interpolation, as Slide.read_thumbnail), then the mask."""
    k = MASK_MPP / WORK_MPP
    h, w = round(rgb_2um.shape[0] / k), round(rgb_2um.shape[1] / k)
    thumb = cv2.resize(rgb_2um, (w, h), interpolation=cv2.INTER_AREA)
    return segment_tissue(thumb, MASK_MPP, SegmentationParams()).mask.astype(bool)


def _stroke(shape: tuple[int, int], pts: list[tuple[int, int]], width: int) -> np.ndarray:
    layer = np.zeros(shape, np.uint8)
    cv2.polylines(layer, [np.array(pts, np.int32)], False, 1, width)
    return cv2.GaussianBlur(layer.astype(np.float32), (0, 0), 1.5)


def test_demo_slide_dice_against_its_painted_mask(demo_slide: Path) -> None:
    with open_slide(demo_slide) as slide:
        result = compute_tissue_mask(slide, "demo", SegmentationParams())
    truth = to_grid(demo_truth_mask(), result.mask.shape)
    assert truth.mean() == pytest.approx(0.089, abs=0.01)  # ~9 % of the slide is tissue
    assert dice(result.mask, truth) >= 0.95
    assert len(result.polygons) == 4  # the four IHC pieces, none missed


@pytest.mark.parametrize("pale", [1.0, 0.35])
def test_pale_ihc_on_uneven_tinted_glass(demo_od: tuple[np.ndarray, np.ndarray], pale: float) -> None:
    od, truth0 = demo_od
    h, w = od.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 - 0.2 * (xx / w) - 0.08 * ((yy / h - 0.5) ** 2)  # 20 % gradient + a little vignetting
    glass = np.array([246.0, 238.0, 222.0], np.float32) * light[..., None]  # yellowish mountant ...
    glass[..., 2] *= 1.0 - 0.1 * (yy / h)  # ... that yellows further down the slide
    mask = _segment(_render(od * pale, glass))
    assert dice(mask, to_grid(truth0, mask.shape)) >= 0.95


def test_dark_glass_of_an_old_scanner(demo_od: tuple[np.ndarray, np.ndarray]) -> None:
    od, truth0 = demo_od
    mask = _segment(_render(od, (186.0, 188.0, 192.0)))
    assert dice(mask, to_grid(truth0, mask.shape)) >= 0.95


def test_pen_dust_and_edges_are_not_tissue(demo_od: tuple[np.ndarray, np.ndarray]) -> None:
    od, truth0 = demo_od
    od = od.copy()
    h, w = od.shape[:2]
    tissue = cv2.resize(truth0.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0
    near = cv2.dilate(tissue.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
    artifact = np.zeros((h, w), np.float32)
    inks = {  # marker OD on glass: blue, green, red, black
        (1.75, 1.2, 0.45): [(60, 900), (500, 820), (900, 960), (1500, 860)],
        (1.55, 0.6, 0.95): [(80, 120), (700, 60), (1450, 150)],
        (0.25, 1.75, 1.35): [(1000, 420), (1100, 640), (1000, 780)],
        (2.0, 1.95, 1.8): [(300, 480), (560, 560)],
    }
    for vec, pts in inks.items():
        layer = np.where(near, 0.0, _stroke((h, w), pts, 40))
        od += layer[..., None] * np.array(vec, np.float32)
        artifact = np.maximum(artifact, layer)
    rng = np.random.default_rng(0)
    dust = np.zeros((h, w), np.float32)
    for _ in range(150):  # grey-brown specks, 4-40 µm
        x, y = int(rng.integers(w)), int(rng.integers(h))
        cv2.circle(dust, (x, y), int(rng.integers(2, 20)), float(rng.uniform(0.5, 1.5)), -1)
    dust = np.where(near, 0.0, dust)
    od += dust[..., None] * np.array([1.0, 1.05, 1.15], np.float32)
    edge = np.zeros((h, w), np.float32)
    edge[:60] = 2.5  # a dark slide edge along the top
    od += edge[..., None]
    artifact = np.maximum(artifact, np.maximum(dust > 0, edge > 0).astype(np.float32))
    mask = _segment(_render(od, (242.0, 242.0, 242.0)))
    truth = to_grid(truth0, mask.shape)
    art = to_grid(artifact > 0.5, mask.shape) & ~truth
    assert art.mean() > 0.05  # the strokes, specks and the edge are there
    assert dice(mask, truth) >= 0.90
    assert called_tissue(mask, art) <= 0.05


def test_cmu_he_clearly_stained_in_clear_glass_out() -> None:
    """The real H&E slide: stained pixels are in the mask, clean glass far from tissue is not."""
    with open_slide(CMU) as slide:
        result = compute_tissue_mask(slide, "cmu", SegmentationParams())
        thumb = result.thumbnail
    assert thumb is not None
    mask = result.mask.astype(bool)
    od = np.log(245.0 / np.maximum(thumb.astype(np.float32), 1.0)).max(axis=2)
    stained = cv2.erode((od > 0.4).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    glass = cv2.dilate((od > 0.05).astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
    assert stained.sum() > 1000 and glass.sum() > 1000
    assert called_tissue(mask, stained) >= 0.97
    assert called_tissue(mask, glass) <= 0.01


def test_kidney_ihc_dust_and_smudge_are_not_tissue() -> None:
    """The plain IHC TIFF (no MPP, segmented at an assumed 2 µm/px): one tissue piece, however small
    the area filter; the grey smudge and the dust specks on the glass stay out."""
    with open_slide(KIDNEY) as slide:
        img = slide.read_region((0, 0), 0, (slide.info.width, slide.info.height))
    tm = segment_tissue(img, 2.0, SegmentationParams(mask_mpp=2.0, tissue_thresh=1e-4))
    assert len(tm.polygons) == 1
    x0, y0, x1, y1 = tm.polygons[0].bounds
    piece = img[int(y0) : int(y1), int(x0) : int(x1)]
    assert np.log(245.0 / np.maximum(piece.astype(np.float32), 1.0)).max(axis=2).mean() > 0.2  # stained
    assert tm.tissue_fraction < 0.01


@pytest.mark.parametrize(
    "name, thumb, empty",
    [
        ("all glass", np.full((200, 300, 3), 241, np.uint8), True),
        ("all white", np.full((200, 300, 3), 255, np.uint8), True),
        ("almost black", np.full((200, 300, 3), 4, np.uint8), True),
        ("flat grey", np.full((200, 300, 3), 128, np.uint8), True),
        ("flat pink", np.full((200, 300, 3), (220, 150, 200), np.uint8), False),
        ("one pixel", np.full((1, 1, 3), 200, np.uint8), True),
    ],
)
def test_bad_input_gives_a_mask(name: str, thumb: np.ndarray, empty: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="atlaspatch"):
        tm = segment_tissue(thumb, 8.0, SegmentationParams())
    assert tm.mask.shape == thumb.shape[:2] and tm.mask.dtype == np.uint8, name
    assert (tm.tissue_fraction == 0.0) is empty, name
    assert any("no tissue found" in r.getMessage() for r in caplog.records) is empty, name


def test_all_tissue_slide_warns_and_is_tissue(caplog: pytest.LogCaptureFixture) -> None:
    """No glass anywhere (the H&E image, all tissue): measured against a standard white, with a warning."""
    img = cv2.cvtColor(cv2.imread(str(JPEG)), cv2.COLOR_BGR2RGB)
    thumb = cv2.resize(img, (250, 150), interpolation=cv2.INTER_AREA)
    with caplog.at_level(logging.WARNING, logger="atlaspatch"):
        tm = segment_tissue(thumb, 8.0, SegmentationParams(tissue_thresh=0.001))
    assert tm.tissue_fraction > 0.9
    assert any("no glass" in r.getMessage() for r in caplog.records)
