"""Geometry (physical units → level-0 footprint, read level) and the stored patch grid.

Expected values are derived here from OpenSlide metadata and from the documented rules, and the
stored HDF5 is re-read with h5py + OpenSlide only (the way CLAM/TRIDENT code reads it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest
from conftest import CMU, NDPI

from atlaspatch_assets import __version__
from atlaspatch_assets.core.errors import GeometryError, MissingMppError
from atlaspatch_assets.core.geometry import compute_geometry
from atlaspatch_assets.core.patches import read_patch
from atlaspatch_assets.core.segmentation import SegmentationParams
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages.coords import CoordsParams, compute_patch_coords, save_patch_coords
from atlaspatch_assets.core.stages.mask import compute_tissue_mask, save_tissue_mask
from atlaspatch_assets.core.store import RunLayout
from atlaspatch_assets.core.tiling import lattice

PATCH = 256
MIN_TISSUE = 0.5

COORDS_ATTRS = (
    "patch_size",
    "patch_level",
    "downsample",
    "level_dim",
    "name",
    "patch_size_level0",
    "target_magnification",
    "level0_magnification",
    "overlap",
)
FILE_ATTRS = (
    "patch_size",
    "wsi_path",
    "num_patches",
    "level0_magnification",
    "target_magnification",
    "patch_size_level0",
    "mpp",
    "target_mpp",
    "step_size",
    "level0_width",
    "level0_height",
    "slide_id",
    "recipe_hash",
    "software_version",
)


def _ref_mpp(path: Path) -> float:
    with openslide.OpenSlide(str(path)) as s:
        return float(s.properties[openslide.PROPERTY_NAME_MPP_X])


def _ref_level(path: Path, downsample: float) -> tuple[int, float, tuple[int, int]]:
    """Coarsest level whose downsample is <= `downsample` (small tolerance for vendor rounding)."""
    with openslide.OpenSlide(str(path)) as s:
        dss = list(s.level_downsamples)
        level = max(i for i, d in enumerate(dss) if d <= downsample * 1.01)
        return level, dss[level], tuple(s.level_dimensions[level])


# -- compute_geometry ---------------------------------------------------------------------------


def test_cmu_20x_256() -> None:
    mpp = _ref_mpp(CMU)
    with open_slide(CMU) as slide:
        g = compute_geometry(slide.info, PATCH, target_mag=20)
    assert g.target_mpp == pytest.approx(0.5)
    assert g.patch_size_level0 == round(PATCH * 0.5 / mpp) == 257
    assert g.step_size_level0 == g.patch_size_level0
    assert g.read_level == 0 and g.read_downsample == 1.0
    assert g.read_size == g.patch_size_level0
    assert g.level0_magnification == pytest.approx(10 / mpp, abs=1e-3)
    assert g.overlap == 0


@pytest.mark.parametrize(("mag", "expected_level"), [(20, 1), (10, 2)])
def test_ndpi_read_level(mag: float, expected_level: int) -> None:
    mpp = _ref_mpp(NDPI)
    need = (10.0 / mag) / mpp  # 20x: 0.5 / 0.2282 ≈ 2.19
    level, lds, _ = _ref_level(NDPI, need)
    assert level == expected_level
    with open_slide(NDPI) as slide:
        g = compute_geometry(slide.info, PATCH, target_mag=mag)
    ps0 = round(PATCH * (10.0 / mag) / mpp)
    assert g.patch_size_level0 == ps0
    assert g.read_level == level
    assert g.read_downsample == pytest.approx(lds)
    assert abs(g.read_size - ps0 / lds) <= 0.5
    assert g.read_size >= PATCH  # never upsampled when resized to the patch size


def test_finer_than_native_is_an_error() -> None:
    with open_slide(CMU) as slide:
        with pytest.raises(GeometryError) as ei:
            compute_geometry(slide.info, PATCH, target_mag=40)
        msg = str(ei.value)
        assert "\n" not in msg
        assert "native" in msg.lower()
        assert re.search(r"\b20(\.0+)?x", msg), msg  # CMU is natively 20x (10 / 0.499)
        with pytest.raises(GeometryError):
            compute_geometry(slide.info, PATCH, target_mpp=0.499 * 0.94)


def test_within_five_percent_is_allowed() -> None:
    mpp = _ref_mpp(CMU)
    with open_slide(CMU) as slide:
        g = compute_geometry(slide.info, PATCH, target_mpp=0.48)
    assert g.read_level == 0
    assert g.patch_size_level0 == round(PATCH * 0.48 / mpp)
    assert g.target_magnification == pytest.approx(10 / 0.48, abs=1e-3)


def test_step_size_and_overlap() -> None:
    mpp = _ref_mpp(CMU)
    with open_slide(CMU) as slide:
        g = compute_geometry(slide.info, PATCH, step_size=128, target_mag=10)
    assert g.patch_size_level0 == round(PATCH * 1.0 / mpp)
    assert g.step_size_level0 == round(128 * 1.0 / mpp)
    assert g.overlap == 128
    layout = RunLayout.create("/out", PATCH, 128, target_mag=10)
    assert layout.root.name == "10x_256px_128px_overlap"


def test_missing_mpp_is_an_error(tmp_path: Path) -> None:
    from conftest import PNG

    from atlaspatch_assets.cli.options import cli_ref
    from atlaspatch_assets.core.params import render_refs
    from atlaspatch_assets.defs.adapter import dagster_ref

    with open_slide(PNG) as slide, pytest.raises(MissingMppError) as ei:
        compute_geometry(slide.info, PATCH, target_mag=20)
    import atlaspatch_assets.cli.slides  # noqa: F401  (defines the flags)

    # the hint names the fix where it is shown: a CLI flag, a Dagster resource field
    assert "--mpp-csv" in render_refs(ei.value.one_line(), cli_ref)
    assert "resource slide_source.mpp_csv" in render_refs(ei.value.one_line(), dagster_ref)


# -- lattice ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "h", "size", "step"), [(2220, 2967, 257, 257), (1000, 700, 256, 100), (300, 310, 300, 7)]
)
def test_lattice(w: int, h: int, size: int, step: int) -> None:
    grid = lattice(w, h, size, step)
    expected = {(x, y) for y in range(0, h - size + 1, step) for x in range(0, w - size + 1, step)}
    assert grid.dtype == np.int32 and grid.shape == (len(expected), 2)
    assert {tuple(map(int, c)) for c in grid} == expected
    assert (0, 0) in expected
    assert (grid[:, 0] + size <= w).all() and (grid[:, 1] + size <= h).all()
    assert (grid % step == 0).all()


def test_lattice_slide_smaller_than_patch() -> None:
    assert lattice(16, 16, 257, 257).shape == (0, 2)


# -- full pipeline through the core functions, re-read independently ------------------------------


@dataclass
class Run:
    path: Path
    slide_id: str
    h5: Path
    params: CoordsParams


def _run_pipeline(src: Path, out: Path, slide_id: str, params: CoordsParams, mag: float = 20) -> Run:
    layout = RunLayout.create(out, PATCH, target_mag=mag)
    with open_slide(src) as slide:
        mask = compute_tissue_mask(slide, slide_id, SegmentationParams())
        save_tissue_mask(layout, mask)
        coords = compute_patch_coords(slide, slide_id, layout, mask, params)
        save_patch_coords(layout, coords)
    return Run(src, slide_id, layout.store(slide_id).path, params)


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("geo-cmu")
    return _run_pipeline(CMU, out, "CMU-1-Small-Region", CoordsParams(min_tissue_fraction=MIN_TISSUE))


@pytest.fixture(scope="module")
def ndpi_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("geo-ndpi")
    return _run_pipeline(NDPI, out, "ndpi", CoordsParams(min_tissue_fraction=MIN_TISSUE))


def _reference_grid(
    mask: np.ndarray, dx: float, dy: float, width: int, height: int, ps0: int, step0: int, min_frac: float
) -> tuple[list[tuple[int, int]], list[float]]:
    """The documented rule, in plain Python: lattice from (0, 0), mask box per patch, mean, keep."""
    mh, mw = mask.shape
    coords: list[tuple[int, int]] = []
    fracs: list[float] = []
    y = 0
    while y + ps0 <= height:
        x = 0
        while x + ps0 <= width:
            x0 = min(max(round(x / dx), 0), mw - 1)
            y0 = min(max(round(y / dy), 0), mh - 1)
            x1 = min(max(max(x0 + 1, round((x + ps0) / dx)), 1), mw)
            y1 = min(max(max(y0 + 1, round((y + ps0) / dy)), 1), mh)
            total = 0
            for my in range(y0, y1):
                for mx in range(x0, x1):
                    total += int(mask[my, mx])
            frac = total / ((x1 - x0) * (y1 - y0))
            if frac >= min_frac:
                coords.append((x, y))
                fracs.append(frac)
            x += step0
        y += step0
    return coords, fracs


@pytest.mark.parametrize("which", ["cmu", "ndpi"])
def test_stored_grid_equals_independent_reference(which: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(f"{which}_run")
    with openslide.OpenSlide(str(run.path)) as ref:
        width, height = ref.dimensions
        mpp = float(ref.properties[openslide.PROPERTY_NAME_MPP_X])
    ps0 = round(PATCH * 0.5 / mpp)
    with h5py.File(run.h5, "r") as f:
        mask = f["tissue/mask"][()]
        dx, dy = (float(v) for v in f["tissue/mask"].attrs["downsample"])
        coords = f["coords"][()]
        frac = f["tissue_fraction"][()]
        assert int(f.attrs["patch_size_level0"]) == ps0
        assert int(f.attrs["step_size_level0"]) == ps0
    # The mask is a thumbnail at ~8 µm/px covering the whole slide.
    assert set(np.unique(mask)) <= {0, 1}
    assert dx * mpp == pytest.approx(8.0, rel=0.03) and dy * mpp == pytest.approx(8.0, rel=0.03)
    assert abs(mask.shape[1] * dx - width) < 1e-6 * width + 1 and abs(mask.shape[0] * dy - height) < 1e-6 * height + 1

    ref_coords, ref_frac = _reference_grid(mask, dx, dy, width, height, ps0, ps0, run.params.min_tissue_fraction)
    assert len(ref_coords) > 0
    assert coords.dtype == np.int32 and coords.shape == (len(ref_coords), 2)
    assert [tuple(map(int, c)) for c in coords] == ref_coords
    assert frac.dtype == np.float32 and frac.shape == (len(ref_coords),)
    np.testing.assert_allclose(frac, np.asarray(ref_frac), rtol=0, atol=1e-6)


def test_storage_contract_attributes(cmu_run: Run) -> None:
    ref = openslide.OpenSlide(str(CMU))
    mpp = float(ref.properties[openslide.PROPERTY_NAME_MPP_X])
    ps0 = round(PATCH * 0.5 / mpp)
    with h5py.File(cmu_run.h5, "r") as f:
        c = f["coords"]
        missing = [a for a in COORDS_ATTRS if a not in c.attrs]
        assert not missing, f"coords attrs missing: {missing}"
        missing = [a for a in FILE_ATTRS if a not in f.attrs]
        assert not missing, f"file attrs missing: {missing}"
        for a in ("downsample", "method", "parameters"):
            assert a in f["tissue/mask"].attrs

        n = c.shape[0]
        level = int(c.attrs["patch_level"])
        assert level == 0
        assert int(c.attrs["patch_size"]) == ps0  # read size at patch_level
        assert tuple(np.asarray(c.attrs["downsample"], float).ravel()[:2]) == pytest.approx(
            (ref.level_downsamples[level],) * 2
        )
        assert tuple(int(v) for v in c.attrs["level_dim"]) == tuple(ref.level_dimensions[level])
        assert _s(c.attrs["name"]) == cmu_run.slide_id
        assert int(c.attrs["patch_size_level0"]) == ps0
        assert float(c.attrs["target_magnification"]) == pytest.approx(20.0)
        assert float(c.attrs["level0_magnification"]) == pytest.approx(10 / mpp, abs=1e-3)
        assert int(c.attrs["overlap"]) == 0

        a = f.attrs
        assert int(a["patch_size"]) == PATCH
        assert _s(a["wsi_path"]) == str(CMU)
        assert int(a["num_patches"]) == n > 0
        assert float(a["level0_magnification"]) == pytest.approx(10 / mpp, abs=1e-3)
        assert float(a["target_magnification"]) == pytest.approx(20.0)
        assert int(a["patch_size_level0"]) == ps0
        assert float(a["mpp"]) == pytest.approx(mpp)
        assert float(a["target_mpp"]) == pytest.approx(0.5)
        assert int(a["step_size"]) == PATCH
        assert (int(a["level0_width"]), int(a["level0_height"])) == ref.dimensions
        assert _s(a["slide_id"]) == cmu_run.slide_id
        assert len(_s(a["recipe_hash"])) >= 8
        assert _s(a["software_version"]) == __version__
        recipe = json.loads(_s(a["recipe"]))
        assert recipe["min_tissue_fraction"] == MIN_TISSUE

        ext = f["coords_ext"][()]
        assert ext.dtype == np.int32 and ext.shape == (n, 5)
        np.testing.assert_array_equal(ext[:, :2], c[()])
        assert (ext[:, 2] == ps0).all() and (ext[:, 3] == ps0).all() and (ext[:, 4] == level).all()
        tf = f["tissue_fraction"]
        assert tf.dtype == np.float32 and tf.shape == (n,)
        assert ((tf[()] >= MIN_TISSUE) & (tf[()] <= 1)).all()
    ref.close()


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _clam_read(path: Path, h5: Path, picks: int = 6) -> tuple[np.ndarray, list[np.ndarray], int, int, int]:
    """How CLAM/TRIDENT read patches: only h5py + OpenSlide + cv2."""
    with h5py.File(h5, "r") as f:
        coords = f["coords"][()]
        level = int(f["coords"].attrs["patch_level"])
        size = int(f["coords"].attrs["patch_size"])
        target = int(f.attrs["patch_size"])
    idx = np.unique(np.linspace(0, len(coords) - 1, num=min(picks, len(coords))).astype(int))
    out = []
    with openslide.OpenSlide(str(path)) as wsi:
        for i in idx:
            img = wsi.read_region(tuple(int(v) for v in coords[i]), level, (size, size)).convert("RGB")
            out.append(cv2.resize(np.asarray(img), (target, target), interpolation=cv2.INTER_AREA))
    return coords[idx], out, level, size, target


@pytest.mark.parametrize(("which", "expected_level"), [("cmu", 0), ("ndpi", 1)])
def test_clam_style_reread_equals_read_patch(which: str, expected_level: int, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(f"{which}_run")
    coords, patches, level, size, target = _clam_read(run.path, run.h5)
    assert level == expected_level
    assert target == PATCH and size != PATCH  # the reader resizes in both cases
    assert len(patches) >= 3
    with open_slide(run.path) as slide:
        g = compute_geometry(slide.info, PATCH, target_mag=20)
        assert (g.read_level, g.read_size) == (level, size)
        for (x, y), want in zip(coords, patches, strict=True):
            got = read_patch(slide, g, int(x), int(y))
            assert got.shape == (PATCH, PATCH, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, want)


# -- content filter (fast_mode=False) -------------------------------------------------------------


def _fractions_white_black(patch: np.ndarray, white_thresh: int, black_thresh: int) -> tuple[float, float]:
    """The seed rule from first principles: HSV S/V (OpenCV 8-bit scale) and BT.601 luma."""
    rgb = patch.astype(np.float64)
    v = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    s = np.where(v > 0, 255.0 * (v - mn) / np.maximum(v, 1), 0.0)
    white = (np.round(s) < white_thresh) & (v >= 200)
    gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    black = np.round(gray) < black_thresh
    return float(white.mean()), float(black.mean())


def test_no_fast_mode_drops_white_or_black_patches() -> None:
    white_t, black_t = 15, 50
    with open_slide(CMU) as slide:
        layout = RunLayout.create("/unused", PATCH, target_mag=20)
        mask = compute_tissue_mask(slide, "cmu", SegmentationParams())
        fast = compute_patch_coords(slide, "cmu", layout, mask, CoordsParams(min_tissue_fraction=0))
        slow = compute_patch_coords(
            slide,
            "cmu",
            layout,
            mask,
            CoordsParams(min_tissue_fraction=0, fast_mode=False, white_thresh=white_t, black_thresh=black_t),
        )
    fast_set = {tuple(map(int, c)) for c in fast.coords}
    slow_set = {tuple(map(int, c)) for c in slow.coords}
    assert slow_set <= fast_set
    dropped = sorted(fast_set - slow_set)
    assert dropped, "expected edge patches of CMU to be mostly glass"
    assert slow.filtered_background == len(dropped)
    # Fractions kept alongside the surviving coordinates stay aligned with them.
    fast_frac = {tuple(map(int, c)): float(f) for c, f in zip(fast.coords, fast.tissue_fraction, strict=True)}
    for c, f in zip(slow.coords, slow.tissue_fraction, strict=True):
        assert fast_frac[tuple(map(int, c))] == pytest.approx(float(f))

    g = fast.geometry
    margin = 0.01  # rounding of OpenCV's fixed-point HSV/gray at the thresholds
    with openslide.OpenSlide(str(CMU)) as wsi:

        def pixels(x: int, y: int) -> np.ndarray:
            img = np.asarray(wsi.read_region((x, y), g.read_level, (g.read_size, g.read_size)).convert("RGB"))
            return cv2.resize(img, (PATCH, PATCH), interpolation=cv2.INTER_AREA)

        for x, y in dropped:
            white, black = _fractions_white_black(pixels(x, y), white_t, black_t)
            assert max(white, black) >= 0.7 - margin, (x, y, white, black)
        for x, y in sorted(slow_set):
            white, black = _fractions_white_black(pixels(x, y), white_t, black_t)
            assert max(white, black) < 0.7 + margin, (x, y, white, black)
