"""FastPatchReader vs the pipeline reference (Slide.read_region + cv2.INTER_AREA).

Tolerances (measured; libjpeg-turbo in simplejpeg/imagecodecs vs OpenSlide's libjpeg-turbo):
JPEG (Aperio tables + RGB-coded, NDPI restart tiles and DCT-scaled NDPI levels), JPEG 2000 and
deflate/none tiles decode bit-exactly, so patches at integral level positions are identical
(max 0). At fractional level positions (the level downsample does not divide the level-0
coordinate, e.g. Aperio 4.0003 or generic-TIFF 4.016) OpenSlide interpolates bilinearly through
cairo/pixman (7-bit weights, vendor-dependent rounding); our float bilinear differs by at most
3 grey levels, mean <= 0.5 (observed <= 0.31), before the area resize.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from conftest import (
    BOXES_TIFF,
    BROKEN,
    CMU,
    DICOM,
    KIDNEY,
    NDPI,
    PNG,
    SMALL16,
    truncated_copy,
    write_aperio_tiff,
)

from atlaspatch_assets.core.errors import ReadError, SlideOpenError
from atlaspatch_assets.core.fast_reader import FastPatchReader, reference_patch
from atlaspatch_assets.core.geometry import PatchGeometry, compute_geometry
from atlaspatch_assets.core.slide import Slide, open_slide

MAX_DIFF = 3  # bilinear rounding at fractional level positions; 0 elsewhere
MEAN_DIFF = 0.5
MAKE_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_test_slide.py"


def grid_with_edges(width: int, height: int, ps0: int, n: int = 6) -> np.ndarray:
    """An n x n lattice over the slide, plus patches hanging over the right/bottom edges and corner."""
    xs = np.linspace(0, max(0, width - ps0), n).astype(int) | 1  # odd: fractional level positions
    ys = np.linspace(0, max(0, height - ps0), n).astype(int)
    xy = [(x, y) for y in ys for x in xs]
    xy += [(0, 0), (width - ps0 // 2, height // 3), (width // 3, height - ps0 // 3), (width - 5, height - 5)]
    return np.array(xy, np.int64)


def compare(path: Path, mpp: float | None, mag: float, patch: int, **kw: object) -> tuple[FastPatchReader, dict]:
    """Read a grid with FastPatchReader and with the reference; return the reader and diff stats."""
    slide = open_slide(path, mpp_override=mpp)
    g = compute_geometry(slide.info, patch, target_mag=mag)
    xy = grid_with_edges(slide.info.width, slide.info.height, g.patch_size_level0)
    with FastPatchReader(path, g, threads=2, prefetch=1, slide=slide, **kw) as r:
        got = r.read_patches(xy, batch_size=7)
        ref = np.stack([reference_patch(slide, g, x, y) for x, y in xy])
        d = np.abs(got.astype(np.int16) - ref)
        stats = {"max": int(d.max()), "mean": float(d.mean()), "level": g.read_level, "read": g.read_size}
    slide.close()
    assert got.shape == (len(xy), patch, patch, 3) and got.dtype == np.uint8
    return r, stats


REAL_CASES = [
    # (slide, mpp override, target magnifications, patch, expected path prefix)
    (CMU, None, (20, 10, 5), 128, "tiff:jpeg"),
    (NDPI, None, (40, 20, 5, 2.5, 1.25, 0.625), 64, "tiff:jpeg"),  # levels 0,1,3 + virtual 4,5,6
    (BOXES_TIFF, 0.5, (20, 10, 5, 2.5), 32, "tiff:tifffile-8"),
    (DICOM, None, (20, 10), 8, "fallback:openslide"),
    (SMALL16, None, (20, 10), 16, "tiff:jpeg"),
    (KIDNEY, 0.5, (20, 10), 128, "tiff:tifffile-1"),
]


@pytest.mark.parametrize("path,mpp,mags,patch,expected", REAL_CASES, ids=[c[0].name for c in REAL_CASES])
def test_real_slides_match_reference(path: Path, mpp: float | None, mags: tuple, patch: int, expected: str) -> None:
    levels = set()
    for mag in mags:
        r, st = compare(path, mpp, mag, patch)
        levels.add(st["level"])
        assert r.path.startswith(expected), (mag, r.describe())
        assert st["max"] <= MAX_DIFF and st["mean"] <= MEAN_DIFF, (path.name, mag, st, r.path)
    if path == NDPI:
        assert {4, 5, 6} <= levels  # OpenSlide's DCT-scaled NDPI levels are covered


def test_fallback_for_plain_image() -> None:
    r, st = compare(PNG, 0.5, 10, 64)
    assert r.mode == "fallback" and r.reason and st["max"] == 0


def test_integral_positions_are_bit_exact() -> None:
    slide = open_slide(CMU)
    g = compute_geometry(slide.info, 224, step_size=160, target_mag=10)  # read 449 -> area 224
    xs, ys = np.meshgrid(np.arange(0, 1800, g.step_size_level0), np.arange(0, 2500, g.step_size_level0))
    xy = np.stack([xs.ravel(), ys.ravel()], 1)
    with FastPatchReader(CMU, g, slide=slide) as r:
        got = r.read_patches(xy)
    ref = np.stack([reference_patch(slide, g, x, y) for x, y in xy])
    assert np.array_equal(got, ref)


def test_iter_batches_order_prefetch_and_decode_once() -> None:
    slide = open_slide(CMU)
    g = compute_geometry(slide.info, 100, step_size=50, target_mag=20)  # overlapping patches
    xs, ys = np.meshgrid(np.arange(0, 2100, 50), np.arange(0, 2800, 50))
    xy = np.stack([xs.ravel(), ys.ravel()], 1)
    with FastPatchReader(CMU, g, threads=2, prefetch=3, slide=slide) as r:
        seen = []
        for idx, arr in r.iter_batches(xy, batch_size=100):
            assert arr.shape == (len(idx), 100, 100, 3)
            seen.append(idx)
            if len(seen) == 3:
                k = int(idx[5])
                assert np.array_equal(arr[5], reference_patch(slide, g, *xy[k]))
        assert np.array_equal(np.concatenate(seen), np.arange(len(xy)))
        tiles = {((y + dy) // 240, (x + dx) // 240) for x, y in xy for dy in (0, 99) for dx in (0, 99)}
        assert r.stats["tiles_decoded"] == len(tiles)  # each tile decoded exactly once in the pass
        assert r.read_patches(np.zeros((0, 2), int)).shape == (0, 100, 100, 3)


def test_small_cache_stays_correct() -> None:
    slide = open_slide(CMU)
    g = compute_geometry(slide.info, 128, target_mag=20)
    xy = grid_with_edges(slide.info.width, slide.info.height, 128, n=8)
    with FastPatchReader(CMU, g, threads=2, slide=slide, cache_mb=0.2) as r:  # ~1 tile
        got = r.read_patches(xy)
        assert r._cache_nbytes <= 0.2 * 2**20
    ref = np.stack([reference_patch(slide, g, x, y) for x, y in xy])
    assert np.array_equal(got, ref)


def test_threads_one_and_no_prefetch_same_output() -> None:
    slide = open_slide(NDPI)
    g = compute_geometry(slide.info, 64, target_mag=10)
    xy = grid_with_edges(slide.info.width, slide.info.height, g.patch_size_level0)
    with FastPatchReader(NDPI, g, threads=1, prefetch=0, slide=slide) as a:
        one = a.read_patches(xy, batch_size=5)
    with FastPatchReader(NDPI, g, threads=2, prefetch=4, slide=slide) as b:
        two = b.read_patches(xy, batch_size=64)
    assert np.array_equal(one, two)


# -- Aperio JPEG 2000 -----------------------------------------------------------------------------


def write_aperio_j2k(path: Path, rgb: np.ndarray, compression: int | str) -> Path:
    """SVS-like tiled TIFF with JPEG 2000 tiles and an Aperio description (MPP 0.5, 20x)."""
    h, w = rgb.shape[:2]
    desc = f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] (256x256) J2K/KDU Q=70|AppMag = 20|MPP = 0.5"
    data, args = rgb, {"level": 80}
    if compression == 33003:  # Aperio's YCbCr flavour: the codestream holds YCbCr, no colour transform
        data = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]].copy()
        args = {"level": 80, "mct": False}
    tifffile.imwrite(
        path,
        data,
        tile=(256, 256),
        photometric="rgb",
        compression=compression,
        compressionargs=args,
        description=desc,
        metadata=None,
    )
    return path


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    with openslide.OpenSlide(str(CMU)) as s:
        return np.asarray(s.read_region((300, 200), 0, (1100, 900)).convert("RGB"))


@pytest.mark.parametrize("compression", [33005, 33003])
def test_aperio_jpeg2000(tmp_path: Path, he_rgb: np.ndarray, compression: int) -> None:
    path = write_aperio_j2k(tmp_path / f"j2k_{compression}.svs", he_rgb, compression)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
    assert tifffile.TiffFile(path).pages[0].compression == compression
    for mag in (20, 10):
        r, st = compare(path, None, mag, 128)
        assert r.path.startswith("tiff:jpeg2k"), r.describe()
        assert st["max"] <= 1 and st["mean"] <= 0.01, st


def test_generic_jpeg2000_tiff(tmp_path: Path, he_rgb: np.ndarray) -> None:
    """tifffile's compression='jpeg2000' (34712) is not an Aperio code: OpenSlide refuses it."""
    path = write_aperio_j2k(tmp_path / "j2k_generic.svs", he_rgb, "jpeg2000")
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    r, st = compare(path, None, 20, 128)  # opened by tiffslide; read through tifffile's codec
    assert r.path.startswith("tiff:tifffile-34712"), r.describe()
    assert st["max"] == 0


# -- 40x multi-level JPEG SVS: 20x patches, exact and DCT-scaled --------------------------------------


@pytest.fixture(scope="module")
def slide40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("svs40x") / "t40.svs"
    cmd = [sys.executable, str(MAKE_SLIDE), str(out), "--width", "4000", "--height", "3000", "--mag", "40"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def tissue_grid(slide: Slide, g: PatchGeometry, n: int = 150) -> np.ndarray:
    """Grid patches with some tissue (thumbnail saturation), row-major."""
    thumb, dx, dy = slide.read_thumbnail(8.0)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1] > 25
    ps0, st0 = g.patch_size_level0, g.step_size_level0
    xy = [
        (x, y)
        for y in range(0, slide.info.height - ps0 + 1, st0)
        for x in range(0, slide.info.width - ps0 + 1, st0)
        if sat[int(y / dy) : int((y + ps0) / dy) + 1, int(x / dx) : int((x + ps0) / dx) + 1].mean() > 0.1
    ]
    return np.array(xy[:n], np.int64)


@pytest.mark.parametrize("mpp", [None, 0.25], ids=["native-mpp", "mpp-0.25"])
def test_40x_slide_20x_patches(slide40x: Path, mpp: float | None, capsys: pytest.CaptureFixture) -> None:
    slide = open_slide(slide40x, mpp_override=mpp)
    assert slide.info.level_count >= 2
    g = compute_geometry(slide.info, 256, step_size=128, target_mag=20)  # 50 % overlap
    assert g.read_level == 0 and abs(g.read_size - 512) <= 1  # 0.2495 µm/px -> 513
    xy = tissue_grid(slide, g)
    assert len(xy) >= 20
    ref = np.stack([reference_patch(slide, g, x, y) for x, y in xy])
    with FastPatchReader(slide40x, g, threads=2, slide=slide) as r:
        exact = r.read_patches(xy)
        assert r.path == "tiff:jpeg:area"
    assert np.array_equal(exact, ref)
    with FastPatchReader(slide40x, g, threads=2, slide=slide, scaled_decode=True) as r:
        scaled = r.read_patches(xy)
        assert r.path == "tiff:jpeg:dct/2", r.describe()
    d = np.abs(scaled.astype(np.int16) - ref)
    with capsys.disabled():
        print(
            f"\n[scaled decode vs area resize] read_size {g.read_size}, {len(xy)} tissue patches: "
            f"max {d.max()}, mean {d.mean():.3f}, p99 {np.percentile(d, 99):.0f}"
        )
    # DCT 1/2 vs area on tissue: mean ~1.3 at read_size 512; 513 adds a <= half-pixel snap and a
    # 0.2 % scale difference (mean ~4.5).
    assert d.mean() <= (2.0 if g.read_size == 512 else 8.0)
    assert np.percentile(d, 99) <= (16 if g.read_size == 512 else 64)


def test_scaled_decode_not_applicable_is_recorded() -> None:
    slide = open_slide(CMU)
    g = compute_geometry(slide.info, 128, target_mag=20)  # read_size == patch_size
    with FastPatchReader(CMU, g, slide=slide, scaled_decode=True) as r:
        assert r.dct == 1 and r.resize == "none" and r.scaled_reason
    g = compute_geometry(slide.info, 128, target_mag=10)
    with FastPatchReader(CMU, g, slide=slide, scaled_decode=True) as r:
        assert r.path == "tiff:jpeg:dct/2" and r.describe()["dct_scale"] == 2


# -- errors ------------------------------------------------------------------------------------------


def test_corrupt_slide_raises_read_error() -> None:
    path = BROKEN / "unreadable.svs"
    with pytest.raises(SlideOpenError):
        open_slide(path)  # the probe decode fails at open
    slide = open_slide(path, probe=False)
    g = compute_geometry(slide.info, 16, target_mag=20)
    with pytest.raises(ReadError):  # start-up self-check: the slide's own read fails
        FastPatchReader(path, g)
    with FastPatchReader(path, g, self_check=False) as r, pytest.raises(ReadError, match="decode"):
        assert r.mode == "tiff"
        r.read_patches(np.array([[0, 0]]))


def test_truncated_slide_raises_read_error(tmp_path: Path, he_rgb: np.ndarray) -> None:
    full = write_aperio_tiff(tmp_path / "full.svs", np.ascontiguousarray(he_rgb[:768, :1024]), downsamples=())
    r, st = compare(full, None, 20, 128)  # tifffile-written JPEG/RGB slide, intact
    assert r.path == "tiff:jpeg:none" and st["max"] == 0
    path = truncated_copy(full, tmp_path / "cut.svs", 0.6)  # tiles of the last rows are cut off
    slide = open_slide(path, probe=False)
    g = compute_geometry(slide.info, 128, target_mag=20)
    with FastPatchReader(path, g, slide=slide, self_check=False) as r:
        assert r.mode == "tiff"
        assert r.read_patches(np.array([[0, 0]])).shape == (1, 128, 128, 3)
        with pytest.raises(ReadError, match="truncated"):
            r.read_patches(np.array([[0, 0], [896, 640]]))


# -- single-level TIFF read by the bounded tifffile page backend ---------------------------------------


def test_one_strip_tiff_through_tifffile_backend(tmp_path: Path, he_rgb: np.ndarray) -> None:
    """A 72 MB single-strip plain TIFF (tiffslide declines it): the fast path (whole strip in its
    cache) and the fallback (the backend's row reads) both equal the reference read."""
    rgb = np.ascontiguousarray(np.tile(he_rgb, (5, 6, 1))[:4000, :6000])
    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=4000, metadata=None)
    slide = open_slide(path, mpp_override=0.5)
    assert slide.backend == "tifffile"
    corner = slide.read_region((5990, 3990), 0, (20, 20))  # hangs over the bottom-right corner
    np.testing.assert_array_equal(corner[:10, :10], rgb[3990:, 5990:])
    assert (corner[10:] == 255).all() and (corner[:, 10:] == 255).all()
    g = compute_geometry(slide.info, 128, target_mag=20)
    xy = grid_with_edges(slide.info.width, slide.info.height, g.patch_size_level0)
    ref = np.stack([reference_patch(slide, g, x, y) for x, y in xy])
    for cache_mb, expected in ((256.0, "fallback:tifffile"), (512.0, "tiff:tifffile-1")):
        with FastPatchReader(path, g, slide=slide, cache_mb=cache_mb) as r:
            got = r.read_patches(xy)
            assert r.path.startswith(expected), r.describe()
        np.testing.assert_array_equal(got, ref)
    slide.close()
