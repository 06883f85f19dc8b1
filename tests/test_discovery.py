"""Discovery on real files: nothing skipped silently, DICOM series by UID, inbox agrees."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from conftest import CMU, DICOM, SLIDES

from atlaspatch_assets.core.discovery import Discovery, Ignored, dicom_series_uid, discover
from atlaspatch_assets.core.errors import SlideOpenError
from atlaspatch_assets.core.inbox import scan_inbox
from atlaspatch_assets.core.slide import open_slide

DICOM_DIR = DICOM.parent


def _reasons(d: Discovery) -> dict[str, str]:
    return {Path(i.path).name: i.reason for i in d.ignored}


def _second_series(dst: Path, prefix: str = "b_") -> str:
    """Copy the shared 2-file DICOM series into `dst` under a new SeriesInstanceUID; return it."""
    uid = ""
    for src in sorted(DICOM_DIR.glob("*.dcm")):
        ds = pydicom.dcmread(src)
        uid = ds.SeriesInstanceUID + ".99"
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".99"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / f"{prefix}{src.name}")
    return uid


def test_result_still_unpacks_to_slides_and_problems() -> None:
    result = discover([CMU, SLIDES / "nope"])
    slides, problems = result
    assert slides is result.slides and problems is result.problems
    assert result[0] is slides and len(result) == 2
    assert [s.name for s in slides] == ["CMU-1-Small-Region"]
    assert problems == [f"{SLIDES / 'nope'}: no such file or directory"]


def test_shared_tree_every_file_is_accounted_for() -> None:
    """Each file under shared/slides is a slide, a DICOM series member, a problem or ignored."""
    result = discover([SLIDES], recursive=True)
    by_name = {s.name: s for s in result.slides}
    assert by_name["dicom-boxes"].path == str(DICOM_DIR / "boxes_0.dcm")  # the 2-file series: one slide
    assert not [s for s in result.slides if Path(s.path).parent == DICOM_DIR and s.name != "dicom-boxes"]
    accounted = {s.path for s in result.slides} | {i.path for i in result.ignored}
    accounted |= {str(p) for p in DICOM_DIR.iterdir()}
    accounted |= {p.split(": ", 1)[0] for p in result.problems}
    for dirpath, _, files in os.walk(SLIDES):
        for f in files:
            assert os.path.join(dirpath, f) in accounted, f


def test_ignored_entries_have_reasons(tmp_path: Path) -> None:
    shutil.copyfile(CMU, tmp_path / "a.svs")
    (tmp_path / ".hidden.svs").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "README").write_text("x")
    (tmp_path / "dangling.svs").symlink_to(tmp_path / "missing.svs")
    (tmp_path / "alias.svs").symlink_to(tmp_path / "a.svs")
    os.mkfifo(tmp_path / "pipe.svs")
    (tmp_path / "folder.svs").mkdir()
    shutil.copyfile(CMU, tmp_path / "folder.svs" / "inner.svs")
    (tmp_path / "sub").mkdir()

    flat = discover([tmp_path])
    assert [s.name for s in flat.slides] == ["a", "dangling"]  # a slide link whose target is gone fails alone
    why = _reasons(flat)
    assert why[".hidden.svs"].startswith("hidden")
    assert why["notes.txt"] == "unknown extension '.txt'"
    assert why["README"] == "no file extension"
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    assert _reasons(discover([tmp_path]))["dangling.txt"].startswith("dangling symlink")
    with pytest.raises(SlideOpenError, match="dangling symlink"):
        open_slide(tmp_path / "dangling.svs")
    assert why["alias.svs"] == f"same file as {tmp_path / 'a.svs'}"  # a symlink to a.svs
    assert why["pipe.svs"].startswith("not a regular file")
    assert why["folder.svs"] == why["sub"] == "folder not searched (not recursive)"
    assert all(isinstance(i, Ignored) and "\n" not in i.reason for i in flat.ignored)
    assert flat.problems == []

    deep = discover([tmp_path], recursive=True)
    assert sorted(s.name for s in deep.slides) == ["a", "dangling", "inner"]
    assert _reasons(deep)["folder.svs"].startswith("a folder named like a slide file")


def test_each_bad_entry_fails_alone_at_open(tmp_path: Path) -> None:
    """Slides that discovery returns but that break later raise one-line SlideOpenErrors."""
    shutil.copyfile(CMU, tmp_path / "good.svs")
    (tmp_path / "text.svs").write_text("not a slide\n")
    shutil.copyfile(CMU, tmp_path / "vanishing.svs")
    slides, problems = discover([tmp_path])
    assert [s.name for s in slides] == ["good", "text", "vanishing"] and problems == []
    (tmp_path / "vanishing.svs").unlink()
    outcomes = {}
    for s in slides:
        try:
            open_slide(s.path).close()
            outcomes[s.name] = "ok"
        except SlideOpenError as e:
            outcomes[s.name] = e.reason
    assert outcomes["good"] == "ok"
    assert outcomes["text"].startswith("cannot open slide: not a slide or image file")
    assert outcomes["vanishing"].startswith("file not found")


def test_czi_is_reported_unsupported(tmp_path: Path) -> None:
    (tmp_path / "scan.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    result = discover([tmp_path])
    assert result.slides == []
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{tmp_path / 'scan.czi'}: unsupported: .czi")
    assert discover([tmp_path / "scan.czi"]).problems == result.problems  # given directly, too
    scan = scan_inbox([tmp_path])
    assert scan.candidates == [] and scan.problems[0][1].startswith("unsupported: .czi")
    with pytest.raises(SlideOpenError, match="unsupported: .czi"):
        open_slide(tmp_path / "scan.czi")


def test_explicit_file_with_unknown_extension_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "slide.xyz").write_bytes(b"x")
    assert discover([tmp_path / "slide.xyz"]).problems == [f"{tmp_path / 'slide.xyz'}: unknown extension '.xyz'"]


# -- OME-TIFF / QPTIFF -----------------------------------------------------------------------------


def _tissue() -> np.ndarray:
    with open_slide(CMU) as s:
        return s.read_region((200, 300), 0, (768, 512))


def write_ome(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """Pyramidal OME-TIFF (SubIFDs), lossless, with a physical pixel size."""
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tw.write(rgb, subifds=2, resolution=(1e4 / mpp, 1e4 / mpp), metadata=meta, **opts)
        for ds in (2, 4):
            tw.write(np.ascontiguousarray(rgb[::ds, ::ds]), subfiletype=1, **opts)


def write_qptiff(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """PerkinElmer QPTIFF layout: full resolution, a stripped thumbnail, then reduced levels."""
    xml = "<PerkinElmer-QPI-ImageDescription><ImageType>{}</ImageType></PerkinElmer-QPI-ImageDescription>"
    opts = {"photometric": "rgb", "software": "PerkinElmer-QPI", "metadata": None}
    tiled = {"tile": (256, 256), "compression": "zlib", **opts}
    with tifffile.TiffWriter(path) as tw:
        res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tw.write(rgb, description=xml.format("FullResolution"), **res, **tiled)
        tw.write(np.ascontiguousarray(rgb[::8, ::8]), description=xml.format("Thumbnail"), **opts)
        for ds in (2, 4):
            tw.write(np.ascontiguousarray(rgb[::ds, ::ds]), description=xml.format("ReducedResolution"), **tiled)


@pytest.mark.parametrize("name", ["case.ome.tiff", "case.ome.tif", "case.qptiff"])
def test_ome_tiff_and_qptiff_are_found_and_read_with_their_pyramid(tmp_path: Path, name: str) -> None:
    rgb = _tissue()
    path = tmp_path / name
    (write_qptiff if name.endswith("qptiff") else write_ome)(path, rgb, 0.25)
    slides, problems = discover([tmp_path])
    assert [s.path for s in slides] == [str(path)] and problems == []
    with tifffile.TiffFile(path) as tf:
        levels = [lv.shape[:2] for lv in tf.series[0].levels]
    with open_slide(path) as slide:
        assert slide.backend == "tiffslide"  # OpenSlide would see one level only
        assert [(h, w) for w, h in slide.info.level_dimensions] == levels and len(levels) == 3
        assert slide.info.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (768, 512)), rgb)
        np.testing.assert_array_equal(slide.read_region((0, 0), 2, (192, 128)), rgb[::4, ::4])


# -- DICOM series ----------------------------------------------------------------------------------


def test_two_dicom_series_in_one_folder_are_two_slides(tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    for f in DICOM_DIR.glob("*.dcm"):
        shutil.copyfile(f, folder / f"a_{f.name}")
    uid_b = _second_series(folder)
    uid_a = dicom_series_uid(DICOM)
    assert uid_a and uid_a != uid_b

    slides, problems = discover([tmp_path], recursive=True)
    assert problems == []
    assert len(slides) == 2 and len({s.name for s in slides}) == 2
    assert all(s.name.startswith("scans-") for s in slides)
    for s in slides:  # each slide opens its own series (OpenSlide finds the other file by UID)
        with open_slide(s.path) as slide:
            assert slide.info.properties["dicom.SeriesInstanceUID"] == dicom_series_uid(s.path)
    assert {dicom_series_uid(s.path) for s in slides} == {uid_a, uid_b}

    scan = scan_inbox([tmp_path])  # the inbox groups the same way, under the same names
    assert sorted((c.name, c.path) for c in scan.candidates) == sorted((s.name, s.path) for s in slides)
    assert all(len(c.members) == 2 for c in scan.candidates)


def test_shared_series_stays_one_slide_and_a_broken_dcm_fails_alone(tmp_path: Path) -> None:
    folder = tmp_path / "dicom-boxes"
    shutil.copytree(DICOM_DIR, folder, copy_function=shutil.copyfile)
    (folder / "zz_broken.dcm").write_text("not dicom")
    slides, _ = discover([tmp_path], recursive=True)
    assert [(s.name, Path(s.path).name) for s in slides] == [
        ("dicom-boxes", "boxes_0.dcm"),
        ("zz_broken", "zz_broken.dcm"),
    ]
    with open_slide(slides[0].path) as slide:
        assert slide.info.vendor == "dicom"
    with pytest.raises(SlideOpenError):
        open_slide(slides[1].path)
    scan = scan_inbox([tmp_path])
    keys = {c.name: c.key for c in scan.candidates}
    assert keys == {"dicom-boxes": str(folder), "zz_broken": str(folder / "zz_broken.dcm")}


def test_discovery_and_inbox_agree_on_a_mixed_tree(tmp_path: Path) -> None:
    shutil.copytree(SLIDES / "real", tmp_path / "real", copy_function=shutil.copyfile)
    write_ome(tmp_path / "real" / "o.ome.tif", _tissue(), 0.5)
    (tmp_path / "real" / "x.czi").write_bytes(b"ZISRAWFILE")
    slides, problems = discover([tmp_path], recursive=True)
    scan = scan_inbox([tmp_path])
    assert sorted((s.name, s.path) for s in slides) == sorted((c.name, c.path) for c in scan.candidates)
    assert [p.split(": ", 1)[0] for p in problems] == [path for path, _ in scan.problems]
