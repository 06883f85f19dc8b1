"""Opening real slides: metadata equals what OpenSlide/PIL/tifffile say; MPP; broken inputs."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from conftest import BOXES_TIFF, BROKEN, CMU, DICOM, JPEG, KIDNEY, NDPI, PNG, SMALL16, truncated_copy
from PIL import Image

from atlaspatch_assets.cli.options import cli_ref
from atlaspatch_assets.core.discovery import discover
from atlaspatch_assets.core.errors import ReadError, SlideOpenError, SlideTooLargeError, UsageError
from atlaspatch_assets.core.mpp import load_mpp_csv
from atlaspatch_assets.core.params import render_refs
from atlaspatch_assets.core.slide import BACKENDS, SUPPORTED_EXTENSIONS, SlideBackend, open_slide
from atlaspatch_assets.core.slides import backends_for

OPENSLIDE_SLIDES = [CMU, NDPI, SMALL16, BOXES_TIFF, DICOM]


def _rgb(region: Image.Image) -> np.ndarray:
    """OpenSlide RGBA → RGB composited onto white (independent of the library's helper)."""
    a = np.asarray(region).astype(np.float64)
    alpha = a[..., 3:4] / 255.0
    return np.round(a[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


# -- backends -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "backend"),
    [
        (CMU, "openslide"),
        (NDPI, "openslide"),
        (DICOM, "openslide"),
        (KIDNEY, "tiffslide"),
        (PNG, "image"),
        (JPEG, "image"),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_first_claiming_backend_that_reads_the_file_wins(path: Path, backend: str) -> None:
    """Registry order: OpenSlide, tiffslide, tifffile page, image; each tried only on what it claims."""
    assert [b.name for b in BACKENDS] == ["openslide", "tiffslide", "tifffile", "image"]
    claimed = [b.name for b in backends_for(path)]
    assert backend in claimed
    with open_slide(path) as slide:
        assert slide.backend == slide.info.backend == backend
        assert isinstance(slide.reader, SlideBackend)
        # every claiming backend before the winner really fails on this file
        for b in backends_for(path)[: claimed.index(backend)]:
            with pytest.raises(Exception):  # noqa: B017 -- any library error: the next one is tried
                b.open(str(path)).close()


def test_extensions_come_from_the_registry() -> None:
    assert set(SUPPORTED_EXTENSIONS) == {e for b in BACKENDS for e in b.extensions}
    assert {".qptiff", ".ome.tif", ".ome.tiff", ".svs", ".dcm", ".png"} <= set(SUPPORTED_EXTENSIONS)
    assert [b.name for b in backends_for("x.OME.TIFF")] == ["tiffslide", "tifffile"]  # not OpenSlide
    assert [b.name for b in backends_for("x.tiff")] == ["openslide", "tiffslide", "tifffile", "image"]
    assert backends_for("x.czi") == [] and backends_for("x.txt") == []


# -- metadata equals the reference readers ------------------------------------------------------


@pytest.mark.parametrize("path", OPENSLIDE_SLIDES, ids=lambda p: p.name)
def test_levels_equal_openslide(path: Path) -> None:
    ref = openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        info = slide.info
        assert (info.width, info.height) == ref.dimensions
        assert info.level_count == ref.level_count
        assert info.level_dimensions == tuple(tuple(d) for d in ref.level_dimensions)
        assert info.level_downsamples == pytest.approx(tuple(ref.level_downsamples), rel=1e-9)
        assert info.vendor == ref.properties.get(openslide.PROPERTY_NAME_VENDOR)
    ref.close()


@pytest.mark.parametrize("path", [PNG, JPEG], ids=lambda p: p.name)
def test_plain_image_dims_equal_pil(path: Path) -> None:
    with Image.open(path) as im:
        w, h = im.size
    with open_slide(path) as slide:
        info = slide.info
        assert (info.width, info.height) == (w, h)
        assert info.level_count == 1
        assert info.level_dimensions == ((w, h),)
        assert info.level_downsamples == (1.0,)


def test_plain_tiff_dims_equal_tifffile() -> None:
    with tifffile.TiffFile(KIDNEY) as tf:
        shape = tf.series[0].levels[0].shape  # (h, w, 3)
        n_levels = len(tf.series[0].levels)
    with open_slide(KIDNEY) as slide:
        assert (slide.info.height, slide.info.width) == shape[:2]
        assert slide.info.level_count == n_levels


def test_pixels_equal_openslide() -> None:
    ref = openslide.OpenSlide(str(CMU))
    want = _rgb(ref.read_region((300, 500), 0, (97, 61)))
    with open_slide(CMU) as slide:
        got = slide.read_region((300, 500), 0, (97, 61))
    assert got.dtype == np.uint8 and got.shape == (61, 97, 3)
    np.testing.assert_array_equal(got, want)


# -- MPP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "vendor", "expected"),
    [
        (CMU, "aperio", 0.499),
        (SMALL16, "aperio", 0.499),
        (DICOM, "dicom", 0.499),
        (NDPI, "hamamatsu", 0.2282),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_mpp_of_real_slides(path: Path, vendor: str, expected: float) -> None:
    with open_slide(path) as slide:
        info = slide.info
    assert info.vendor == vendor
    assert info.mpp == pytest.approx(expected, abs=1e-4)
    assert info.mpp_problem is None
    assert info.magnification == pytest.approx(10.0 / info.mpp, abs=1e-3)


def test_ndpi_mpp_matches_tiff_resolution_tag() -> None:
    """Hamamatsu stores pixels per centimetre: mpp = 1e4 / XResolution, independently of OpenSlide."""
    with tifffile.TiffFile(NDPI) as tf:
        num, den = tf.pages[0].tags["XResolution"].value
        assert tf.pages[0].tags["ResolutionUnit"].value == 3  # centimetre
    expected = 1e4 / (num / den)
    with open_slide(NDPI) as slide:
        assert slide.info.mpp == pytest.approx(expected, rel=1e-5)
        assert slide.info.magnification == pytest.approx(10.0 / expected, abs=2e-3)


def test_implausible_resolution_tag_is_rejected() -> None:
    with tifffile.TiffFile(BOXES_TIFF) as tf:
        num, den = tf.pages[0].tags["XResolution"].value
        unit = tf.pages[0].tags["ResolutionUnit"].value
    assert unit == 3  # centimetre: the tag is "real" but says ~352 µm/px
    assert 1e4 / (num / den) > 20
    with open_slide(BOXES_TIFF) as slide:
        info = slide.info
    assert info.mpp is None
    assert info.magnification is None
    assert info.mpp_problem and "--mpp-csv" in render_refs(info.mpp_problem, cli_ref)
    assert "\n" not in info.mpp_problem


@pytest.mark.parametrize("path", [KIDNEY, PNG, JPEG], ids=lambda p: p.name)
def test_no_mpp_names_mpp_csv_and_override_wins(path: Path) -> None:
    with open_slide(path) as slide:
        assert slide.info.mpp is None
        assert slide.info.mpp_problem and "--mpp-csv" in render_refs(slide.info.mpp_problem, cli_ref)
        with pytest.raises(ReadError):
            slide.read_thumbnail(8.0)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.info.mpp == 0.5
        assert slide.info.mpp_source == "user"
        assert slide.info.mpp_problem is None
        assert slide.info.magnification == pytest.approx(20.0)


def test_override_beats_slide_metadata() -> None:
    with open_slide(CMU, mpp_override=0.25) as slide:
        assert slide.info.mpp == 0.25
        assert slide.info.mpp_source == "user"
        assert slide.info.magnification == pytest.approx(40.0)


# -- broken inputs ------------------------------------------------------------------------------


def _assert_one_line_failure(path: Path) -> None:
    try:
        slide = open_slide(path)
    except (SlideOpenError, ReadError) as e:
        assert "\n" not in str(e) and "\n" not in e.reason
        assert e.reason
        return
    # Opening may succeed on a partial file; then reading its pixels must fail cleanly.
    with slide, pytest.raises(ReadError) as ei:
        slide.read_thumbnail(8.0)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("path", sorted(BROKEN.iterdir()), ids=lambda p: p.name)
def test_broken_shared_files(path: Path) -> None:
    with pytest.raises((SlideOpenError, ReadError)) as ei:
        open_slide(path)
    assert "\n" not in str(ei.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(SlideOpenError) as ei:
        open_slide(p)
    assert "\n" not in str(ei.value)


def test_text_file_named_svs(tmp_path: Path) -> None:
    p = tmp_path / "x.svs"
    p.write_text("this is not a slide\nsecond line\n")
    with pytest.raises(SlideOpenError) as ei:
        open_slide(p)
    assert "\n" not in str(ei.value)


def test_text_file_named_svs_reason_quotes_no_content(tmp_path: Path) -> None:
    p = tmp_path / "notes.svs"
    p.write_text("SECRET-PATIENT-NAME Jane Doe\nline two\n")
    with pytest.raises(SlideOpenError) as ei:
        open_slide(p)
    assert "SECRET" not in str(ei.value) and "Jane" not in str(ei.value)
    assert ei.value.reason.startswith("cannot open slide: not a slide or image file")


def test_tiff_header_then_text_quotes_no_content(tmp_path: Path) -> None:
    """A TIFF signature gets past the sniff: the libraries' own messages must not leak bytes."""
    p = tmp_path / "fake.tiff"
    p.write_bytes(b"II*\x00" + b"SECRET-PATIENT-NAME Jane Doe " * 40)
    with pytest.raises(SlideOpenError) as ei:
        open_slide(p)
    assert "SECRET" not in str(ei.value) and "Jane" not in str(ei.value)
    assert "\n" not in str(ei.value)


def test_shared_not_an_image_reason_quotes_no_header() -> None:
    path = BROKEN / "not-an-image.svs"
    head = path.read_bytes()[:4].decode("latin-1")
    with pytest.raises(SlideOpenError) as ei:
        open_slide(path)
    assert head not in str(ei.value)


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "gone.svs"
    link.symlink_to(tmp_path / "missing-target.svs")
    with pytest.raises(SlideOpenError, match="dangling symlink"):
        open_slide(link)


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    with pytest.raises(SlideOpenError, match="cannot look up"):
        open_slide(tmp_path / "a.svs")


def test_directory_named_like_a_slide(tmp_path: Path) -> None:
    (tmp_path / "x.svs").mkdir()
    with pytest.raises(SlideOpenError, match="is a directory"):
        open_slide(tmp_path / "x.svs")


def test_fifo_named_like_a_slide_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.svs")  # opening a FIFO for reading would wait for a writer
    with pytest.raises(SlideOpenError, match="not a regular file"):
        open_slide(tmp_path / "pipe.svs")


def test_file_deleted_after_discovery(tmp_path: Path) -> None:
    shutil.copyfile(CMU, tmp_path / "later-deleted.svs")
    slides, _ = discover([tmp_path])
    assert [s.name for s in slides] == ["later-deleted"]
    (tmp_path / "later-deleted.svs").unlink()
    with pytest.raises(SlideOpenError, match="file not found") as ei:
        open_slide(slides[0].path)
    assert "\n" not in str(ei.value)


_OPEN_AS_USER = """
import json, sys
from atlaspatch_assets.core.discovery import discover
from atlaspatch_assets.core.discovery import discover
from atlaspatch_assets.core.errors import SlideError
from atlaspatch_assets.core.slide import BACKENDS, SUPPORTED_EXTENSIONS, SlideBackend, open_slide
from atlaspatch_assets.core.slides import backends_for
slides, problems = discover([sys.argv[1]])
out = {"discovered": [s.path for s in slides]}
try:
    open_slide(sys.argv[2]).close()
    out["opened"] = True
except SlideError as e:
    out["error"] = type(e).__name__
    out["reason"] = e.reason
except BaseException as e:
    out["raw"] = type(e).__name__
print(json.dumps(out))
"""


def _unprivileged() -> list[str] | None:
    """argv prefix running a command as a user without read permission on root's 0o000 files."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None
    if setpriv is None:
        return None
    return [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


def test_unreadable_file_fails_alone_with_permission_denied() -> None:
    """As root permission bits do not apply: the check runs as `nobody` (setpriv); skipped only
    when no such user/tool exists."""
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root and no unprivileged user (nobody + setpriv) to test permissions with")
    root = Path(tempfile.mkdtemp(prefix="atlaspatch-perm-"))
    try:
        root.chmod(0o755)  # the unprivileged user may list the folder ...
        secret = root / "locked.svs"
        shutil.copyfile(CMU, secret)
        secret.chmod(0o000)  # ... but not read the slide
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*prefix, sys.executable, "-c", _OPEN_AS_USER, str(root), str(secret)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert out["discovered"] == [str(secret)]  # listed: it fails alone, later
    assert out.get("error") == "SlideOpenError", out
    assert out["reason"].startswith("permission denied") and "\n" not in out["reason"]


def test_truncated_svs(tmp_path: Path) -> None:
    _assert_one_line_failure(truncated_copy(CMU, tmp_path / "CMU-truncated.svs", 0.6))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError):
        open_slide(tmp_path / "nope.svs")


# -- thumbnail ----------------------------------------------------------------------------------


def test_ndpi_thumbnail_uses_coarse_level() -> None:
    ref = openslide.OpenSlide(str(NDPI))
    W, H = ref.dimensions
    mpp = float(ref.properties[openslide.PROPERTY_NAME_MPP_X])
    want_ds = 8.0 / mpp
    # Coarsest level whose downsample does not exceed the wanted one.
    level = max(i for i, d in enumerate(ref.level_downsamples) if d <= want_ds)
    assert ref.level_downsamples[level] > 1  # a real pyramid level, not level 0

    with open_slide(NDPI) as slide:
        thumb, dx, dy = slide.read_thumbnail(8.0)
    th, tw = thumb.shape[:2]
    assert abs(tw - W * mpp / 8.0) <= 1 and abs(th - H * mpp / 8.0) <= 1
    assert dx == pytest.approx(W / tw) and dy == pytest.approx(H / th)
    assert dx * mpp == pytest.approx(8.0, rel=0.02)

    lw, lh = ref.level_dimensions[level]
    full_level = _rgb(ref.read_region((0, 0), level, (lw, lh)))
    expected = cv2.resize(full_level, (tw, th), interpolation=cv2.INTER_AREA)
    diff = np.abs(thumb.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99) <= 4


# -- --mpp-csv ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target_mpp", "strip_rows"),
    [(NDPI, 8.0, 16), (CMU, 2.0, 512), (CMU, 1.0, 100)],
    ids=["ndpi-8um-strips16", "cmu-2um-strips512", "cmu-1um-strips100"],
)
def test_thumbnail_in_strips_equals_one_pass_resize(path: Path, target_mpp: float, strip_rows: int) -> None:
    """Reading in strips only bounds memory: the result must not depend on the strip size.

    Reference: the whole chosen level read by OpenSlide and area-downscaled in one pass.
    """
    ref = openslide.OpenSlide(str(path))
    mpp = float(ref.properties[openslide.PROPERTY_NAME_MPP_X])
    level = max(i for i, d in enumerate(ref.level_downsamples) if d <= target_mpp / mpp)
    lw, lh = ref.level_dimensions[level]
    full_level = _rgb(ref.read_region((0, 0), level, (lw, lh)))
    ref.close()
    with open_slide(path) as slide:
        thumb, _, _ = slide.read_thumbnail(target_mpp, strip_bytes=strip_rows * lw * 4)
    th, tw = thumb.shape[:2]
    assert lh > strip_rows  # really read in several strips
    expected = cv2.resize(full_level, (tw, th), interpolation=cv2.INTER_AREA)
    diff = np.abs(thumb.astype(np.int16) - expected.astype(np.int16))
    # An exact strip-wise box filter differs from the one-pass resize by rounding only (<= 1).
    assert diff.mean() < 0.5, f"mean |diff| {diff.mean():.2f}"
    assert np.percentile(diff, 99.9) <= 3, f"99.9th pct |diff| {np.percentile(diff, 99.9):.0f}"


def test_mpp_csv_matches_stems(tmp_path: Path) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_text(
        "wsi,mpp\n"
        "/data/slides/he-1000px.png,0.5\n"
        "kidney-ihc-plain.tif,0.25\n"
        "C:\\scans\\case 7.svs,1.0\n"
        "dicom-series-folder,0.499\n"
    )
    got = load_mpp_csv(csv)
    assert got == {"he-1000px": 0.5, "kidney-ihc-plain": 0.25, "case 7": 1.0, "dicom-series-folder": 0.499}
    with open_slide(PNG, mpp_override=got[PNG.stem]) as slide:
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == "user"


def test_mpp_csv_extra_columns_and_bom(tmp_path: Path) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_bytes("\ufeffcase,WSI,MPP\n1,a.svs,0.25\n".encode())
    assert load_mpp_csv(csv) == {"a": 0.25}


@pytest.mark.parametrize("value", ["abc", "0", "-0.5", "100", "nan", ""])
def test_mpp_csv_bad_values(tmp_path: Path, value: str) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"wsi,mpp\ngood.svs,0.5\nbad.svs,{value}\n")
    with pytest.raises(UsageError) as ei:
        load_mpp_csv(csv)
    assert "\n" not in str(ei.value)


def test_mpp_csv_missing_columns_or_file(tmp_path: Path) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,resolution\na.svs,0.5\n")
    with pytest.raises(UsageError):
        load_mpp_csv(csv)
    with pytest.raises(UsageError):
        load_mpp_csv(tmp_path / "missing.csv")


# -- big single-level images: bounded memory or a clear refusal ---------------------------------

BIG_W, BIG_H, BLOCK = 20000, 15000, 400  # 858 MiB of RGB; constant 400 px blocks


def _block_colour(bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Colour of block (bx, by): a function the test knows without decoding the image."""
    return np.stack([(bx * 37) % 256, (by * 53) % 256, ((bx + by) * 11) % 256], axis=-1).astype(np.uint8)


def _expected_region(x: int, y: int, w: int, h: int) -> np.ndarray:
    bx, by = np.meshgrid(np.arange(x, x + w) // BLOCK, np.arange(y, y + h) // BLOCK)
    return _block_colour(bx, by)


def _fill_blocks(out: np.ndarray, y0: int) -> None:
    """Rows y0.. of the block image (the rows of `out` lie in one or two block rows)."""
    for r0 in range(0, out.shape[0]):
        by = (y0 + r0) // BLOCK
        if r0 == 0 or (y0 + r0) % BLOCK == 0:
            bx = np.arange(-(-out.shape[1] // BLOCK))
            line = np.repeat(_block_colour(bx, np.full_like(bx, by)), BLOCK, axis=0)[: out.shape[1]]
            n = min(out.shape[0] - r0, BLOCK - (y0 + r0) % BLOCK)
            out[r0 : r0 + n] = line


@pytest.fixture(scope="module")
def big_raw_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20000x15000 uncompressed RGB TIFF stored as ONE strip (what tiffslide decodes whole)."""
    path = tmp_path_factory.mktemp("big") / "big-raw.tif"
    m = tifffile.memmap(path, shape=(BIG_H, BIG_W, 3), dtype=np.uint8, photometric="rgb")
    for y0 in range(0, BIG_H, BLOCK):
        _fill_blocks(m[y0 : y0 + BLOCK], y0)
    m.flush()
    del m
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages[0].dataoffsets) == 1 and tf.pages[0].compression == 1  # really one strip
    return path


@pytest.fixture(scope="module")
def big_strips_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20000x15000 deflate TIFF in 64-row strips, written strip by strip."""
    import imagecodecs

    path = tmp_path_factory.mktemp("big") / "big-strips.tif"
    strip = np.empty((64, BIG_W, 3), np.uint8)

    def strips():
        for y0 in range(0, BIG_H, 64):
            h = min(64, BIG_H - y0)
            _fill_blocks(strip[:h], y0)
            yield imagecodecs.zlib_encode(strip[:h].tobytes())

    tifffile.imwrite(
        path, strips(), shape=(BIG_H, BIG_W, 3), dtype=np.uint8, rowsperstrip=64,
        photometric="rgb", compression="zlib", metadata=None,
    )  # fmt: skip
    return path


def _thumbnail_matches_blocks(thumb: np.ndarray, dx: float, dy: float) -> None:
    """Thumbnail pixels well inside a block must be exactly that block's colour."""
    th, tw = thumb.shape[:2]
    cx, cy = (np.arange(tw) + 0.5) * dx, (np.arange(th) + 0.5) * dy  # level-0 centres
    inner_x = np.abs(cx % BLOCK - BLOCK / 2) < BLOCK / 2 - 2 * dx
    inner_y = np.abs(cy % BLOCK - BLOCK / 2) < BLOCK / 2 - 2 * dy
    bx, by = np.meshgrid(cx // BLOCK, cy // BLOCK)
    want = _block_colour(bx.astype(int), by.astype(int))
    mask = inner_y[:, None] & inner_x[None, :]
    assert mask.mean() > 0.6  # (1 - 4 * 16 / 400) ** 2 of the pixels are well inside a block
    np.testing.assert_array_equal(thumb[mask], want[mask])


@pytest.mark.parametrize("which", ["big_raw_tiff", "big_strips_tiff"])
def test_big_single_level_tiff_in_bounded_memory(which: str, request: pytest.FixtureRequest) -> None:
    """Open, read a region and the 8 µm/px thumbnail of an 858 MiB level: what Python/numpy
    allocate (tracemalloc; file pages, mmap and C-library buffers are not counted) stays under
    64 MiB, so the level is never materialised; the pixels are the known block colours."""
    path = request.getfixturevalue(which)
    tracemalloc.start()
    try:
        with open_slide(path, mpp_override=0.5) as slide:
            assert (slide.info.width, slide.info.height, slide.info.level_count) == (BIG_W, BIG_H, 1)
            assert slide.backend == ("tifffile" if which == "big_raw_tiff" else "tiffslide")
            region = slide.read_region((7890, 11950), 0, (300, 200))  # crosses block edges
            thumb, dx, dy = slide.read_thumbnail(8.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(region, _expected_region(7890, 11950, 300, 200))
    assert thumb.shape == (round(BIG_H / 16), round(BIG_W / 16), 3)
    _thumbnail_matches_blocks(thumb, dx, dy)
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"


def test_one_strip_tiff_is_declined_by_tiffslide(big_raw_tiff: Path) -> None:
    """Why the tifffile page backend exists: tiffslide would decode the 858 MiB strip per read."""
    from atlaspatch_assets.core.slides import TiffSlideBackend

    with pytest.raises(ValueError, match="858 MiB"):
        TiffSlideBackend.open(str(big_raw_tiff))


def test_huge_compressed_strip_is_refused_with_size_and_limit(tmp_path: Path) -> None:
    """One deflate strip of 858 MiB cannot be decoded piecewise: refused, naming size and limit."""
    import zlib

    path = tmp_path / "one-deflate-strip.tif"
    row_block = np.full((500, BIG_W, 3), 200, np.uint8).tobytes()

    def one_strip():
        c = zlib.compressobj(1)
        yield b"".join([c.compress(row_block) for _ in range(BIG_H // 500)] + [c.flush()])

    tifffile.imwrite(
        path, one_strip(), shape=(BIG_H, BIG_W, 3), dtype=np.uint8, rowsperstrip=BIG_H,
        photometric="rgb", compression="zlib", metadata=None,
    )  # fmt: skip
    with pytest.raises(SlideTooLargeError) as ei:
        open_slide(path)
    assert "20000x15000" in ei.value.reason and "858 MiB" in ei.value.reason and "512 MiB limit" in ei.value.reason
    assert isinstance(ei.value, SlideOpenError) and "\n" not in str(ei.value)


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header declares w x h RGB (and whose data is a few bytes): decoding it whole
    would need w*h*3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def test_huge_png_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "huge.png", 40000, 40000)
    tracemalloc.start()
    try:
        with pytest.raises(SlideTooLargeError) as ei:
            open_slide(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "40000x40000" in ei.value.reason and "4.5 GiB" in ei.value.reason and "512 MiB limit" in ei.value.reason
    assert peak < 16 * 2**20  # refused from the header: nothing was decoded
