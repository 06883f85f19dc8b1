"""Fuzzing with hypothesis: the geometry for any MPP / magnification / patch / step / slide size
(coordinates inside the slide, counts consistent, no division by zero, no int32 overflow), random
masks → coordinates (every kept patch has the documented tissue fraction), and slide ids for any
file name (safe partition keys, paths inside the run folder)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from atlaspatch_assets.core.discovery import SlideFile, assign_ids, safe_key
from atlaspatch_assets.core.errors import GeometryError, UsageError
from atlaspatch_assets.core.geometry import UPSAMPLE_TOLERANCE, PatchGeometry, compute_geometry
from atlaspatch_assets.core.slide import SlideInfo
from atlaspatch_assets.core.stages.preflight import lattice_positions
from atlaspatch_assets.core.store import RunLayout
from atlaspatch_assets.core.tiling import lattice, tile

from .test_security import SAFE_KEY

INT32_MAX = 2**31 - 1
MAX_BUILT = 200_000  # lattices up to this many positions are built and checked point by point
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@st.composite
def slide_infos(draw: Any) -> SlideInfo:
    width = draw(st.one_of(st.integers(1, 300_000), st.integers(1, 2**33)))
    height = draw(st.one_of(st.integers(1, 300_000), st.integers(1, 2**33)))
    factors = draw(st.lists(st.floats(1.5, 4.5), max_size=6))
    downsamples = [1.0]
    for f in factors:
        downsamples.append(downsamples[-1] * f)
    dims = tuple((max(1, int(width / d)), max(1, int(height / d))) for d in downsamples)
    mpp = draw(st.floats(0.05, 20.0))
    return SlideInfo("fuzz.svs", "fuzz", None, width, height, len(dims), dims, tuple(downsamples), mpp, "user", None)


targets = st.one_of(
    st.tuples(st.floats(0.1, 200.0), st.none()),  # --target-mag
    st.tuples(st.none(), st.floats(0.05, 100.0)),  # --target-mpp
)


def _info(width: int, height: int, mpp: float) -> SlideInfo:
    return SlideInfo("x.svs", "fuzz", None, width, height, 1, ((width, height),), (1.0,), mpp, "user", None)


@FUZZ
@given(info=slide_infos(), patch=st.integers(1, 4096), step=st.one_of(st.none(), st.integers(1, 4096)), t=targets)
@example(info=_info(3_000_000_000, 9_000_000, 0.05), patch=4096, step=None, t=(None, 100.0))  # x beyond int32
@example(info=_info(1, 1, 20.0), patch=1, step=1, t=(0.1, None))  # a 1-pixel slide
def test_geometry_for_any_resolution_patch_and_step(info: SlideInfo, patch: int, step: int | None, t: Any) -> None:
    mag, mpp = t
    try:
        g = compute_geometry(info, patch, step, target_mag=mag, target_mpp=mpp)
    except GeometryError as e:  # the one refusal: a target finer than native (never upsample)
        t_mpp = mpp if mpp is not None else 10.0 / mag
        assert t_mpp < info.mpp * (1 - UPSAMPLE_TOLERANCE), e
        _count("geometry refused: finer than native")
        return
    assert g.patch_size_level0 >= 1 and g.step_size_level0 >= 1 and g.read_size >= 1
    assert 0 <= g.read_level < info.level_count
    assert g.read_downsample == info.level_downsamples[g.read_level]
    assert g.read_level == 0 or g.read_downsample <= g.target_mpp / info.mpp * 1.01  # never upsampled
    assert math.isclose(g.patch_size_level0, patch * g.target_mpp / info.mpp, rel_tol=0.01, abs_tol=1)
    layout = RunLayout.create("/out", patch, step, target_mag=mag, target_mpp=mpp)
    nx = max(0, (info.width - g.patch_size_level0) // g.step_size_level0 + 1)
    ny = max(0, (info.height - g.patch_size_level0) // g.step_size_level0 + 1)
    assert lattice_positions(info, layout) == nx * ny
    if nx * ny > MAX_BUILT:
        _count("geometry: lattice too big to build (count checked)")
        return
    try:
        grid = lattice(info.width, info.height, g.patch_size_level0, g.step_size_level0)
    except GeometryError as e:  # coordinates that do not fit int32 are refused, never wrapped
        assert max(info.width, info.height) > INT32_MAX, e
        _count("geometry refused: beyond int32 coordinates")
        return
    assert grid.dtype == np.int32 and grid.shape == (nx * ny, 2)
    if len(grid):
        assert grid.min() >= 0
        assert (grid[:, 0] + g.patch_size_level0 <= info.width).all()
        assert (grid[:, 1] + g.patch_size_level0 <= info.height).all()
        assert grid[-1, 0] + g.patch_size_level0 + g.step_size_level0 > info.width  # none missing at the edge
    _count("geometry: lattice built and checked")


@st.composite
def masks_and_geometry(draw: Any) -> tuple[np.ndarray, float, float, int, int, int, int, float]:
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mask = draw(arrays(np.uint8, (h, w), elements=st.integers(0, 1)))
    dx, dy = draw(st.floats(1.0, 64.0)), draw(st.floats(1.0, 64.0))
    width = max(1, int(w * dx) + draw(st.integers(-int(dx), int(dx))))
    height = max(1, int(h * dy) + draw(st.integers(-int(dy), int(dy))))
    size0 = draw(st.integers(1, max(1, min(width, height) * 2)))
    step0 = draw(st.integers(1, max(1, size0 * 2)))
    nx, ny = max(0, (width - size0) // step0 + 1), max(0, (height - size0) // step0 + 1)
    assume(nx * ny <= 4000)  # checked point by point below
    # thresholds as users type them (a positive one below float32 resolution would keep empty patches)
    return mask, dx, dy, width, height, size0, step0, draw(st.integers(0, 1000)) / 1000


def _geometry(size0: int, step0: int) -> PatchGeometry:
    return PatchGeometry(size0, step0, 0.5, 20.0, 0.5, 20.0, size0, step0, 0, 1.0, size0)


@FUZZ
@given(case=masks_and_geometry())
def test_random_masks_to_coordinates(case: Any) -> None:
    mask, dx, dy, width, height, size0, step0, min_frac = case
    t = tile(mask, dx, dy, width, height, _geometry(size0, step0), min_frac)
    grid = lattice(width, height, size0, step0)
    assert t.grid_size == len(grid)
    assert t.coords.dtype == np.int32 and t.coords.shape[1] == 2 and len(t.coords) == len(t.tissue_fraction)
    assert set(map(tuple, t.coords)) <= set(map(tuple, grid))
    if len(t.coords):
        assert (t.coords[:, 0] + size0 <= width).all() and (t.coords[:, 1] + size0 <= height).all()
    assert ((t.tissue_fraction >= min_frac) & (t.tissue_fraction <= 1)).all()
    # the documented box: [round(x/dx), max(x0+1, round((x+size0)/dx))) clipped to the mask, same for y
    h, w = mask.shape
    expected = {}
    for x, y in grid:
        x0 = min(max(round(x / dx), 0), w - 1)
        y0 = min(max(round(y / dy), 0), h - 1)
        x1 = min(max(x0 + 1, round((x + size0) / dx)), w)
        y1 = min(max(y0 + 1, round((y + size0) / dy)), h)
        expected[(int(x), int(y))] = float(mask[y0:y1, x0:x1].mean())
    kept = {(int(x), int(y)) for x, y in t.coords}
    assert {k for k, f in expected.items() if f >= min_frac + 1e-6} <= kept  # float32 fractions: ±1e-6
    assert not {k for k, f in expected.items() if f < min_frac - 1e-6} & kept
    for (x, y), f in zip(map(tuple, t.coords), t.tissue_fraction, strict=True):
        assert abs(expected[(int(x), int(y))] - f) < 1e-5
    if not mask.any():
        assert len(t.coords) == 0 or min_frac == 0
    _count("masks: tiled and checked")


@FUZZ
@given(names=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=8))
def test_slide_ids_for_any_name_are_safe_keys_inside_the_run_folder(names: list[str]) -> None:
    names = [n for n in names if "/" not in n and "\x00" not in n]
    assume(names)
    for n in names:
        k = safe_key(n)
        assert SAFE_KEY.match(k) and ".." not in k and len(k) <= 100, (n, k)
        assert not any(c in k for c in "|,[]/")
    slides = [SlideFile(f"/in/{i}/{n}.svs", n) for i, n in enumerate(names)]
    ids = assign_ids(slides)
    assert len(ids) == len(slides)  # distinct files never share a key
    layout = RunLayout.create("/out", 256, target_mag=20)
    root = Path("/out").resolve()
    for sid in ids:
        assert SAFE_KEY.match(sid) and ".." not in sid and len(sid) <= 100, sid
        for p in (layout.store(sid).path, layout.geojson_path(sid), layout.images_dir(sid), layout.visualization(sid)):
            assert p.resolve().is_relative_to(root) and p.resolve().parent.name != ".."
    _count("names: slide ids checked")


def test_fuzz_counts(report: Any) -> None:
    """The counts of the fuzz runs above (hypothesis example counts per outcome)."""
    if not COUNTS:  # run alone: nothing to report
        return
    for k, v in sorted(COUNTS.items()):
        report.add("fuzzing", k, v)
    assert COUNTS.get("geometry: lattice built and checked", 0) > 0
    assert COUNTS.get("masks: tiled and checked", 0) > 0


def test_usage_errors_for_impossible_options() -> None:
    """Zero or negative sizes and targets are usage errors, never a division by zero."""
    info = _info(1000, 1000, 0.5)
    for kw in ({"patch_size": 0}, {"patch_size": 256, "step_size": -1}, {"patch_size": 256, "target_mag": 0}):
        try:
            compute_geometry(info, **({"target_mag": 20} | kw))
        except UsageError:
            continue
        raise AssertionError(f"{kw} accepted")
