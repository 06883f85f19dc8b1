"""Exports (slide2vec, TRIDENT, CLAM) of stores built by the real pipeline, read back with each project's loaders."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import write_aperio_tiff

from atlaspatch_assets.cli import main
from atlaspatch_assets.cli.export import export_command
from atlaspatch_assets.core import exports
from atlaspatch_assets.core.exports import ExportUsageError, export, resolve_run_dir
from atlaspatch_assets.core.store import DatasetWrite
from atlaspatch_assets.core.store.h5 import H5SlideStore as SlideStore

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
ENC = "mobilenet_v2"
GOOD, BLANK, NOFEAT = "CMU-1-Small-Region", "blank", "CMU-nofeat"
RUN = "20x_224px_0px_overlap"
GEO = ["--patch-size", "224", "--target-mag", "20"]


@dataclass
class Built:
    output: Path
    run: Path

    def store(self, sid: str) -> SlideStore:
        return SlideStore(self.run / "patches" / f"{sid}.h5")

    def read(self, sid: str, name: str) -> np.ndarray:
        return self.store(sid).read(name)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """CMU (49 patches, mobilenet_v2 features), a blank slide (0 patches), a slide without features."""
    root = tmp_path_factory.mktemp("exports")
    blank = write_aperio_tiff(root / "blank.svs", np.full((2048, 2048, 3), 255, np.uint8), downsamples=())
    nofeat = root / f"{NOFEAT}.svs"
    shutil.copyfile(CMU, nofeat)
    out = root / "out"
    runner = CliRunner()
    r = runner.invoke(main, ["process", str(CMU), str(blank), "-o", str(out), "--feature-extractors", ENC, *GEO])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["segment-and-get-coords", str(nofeat), "-o", str(out), *GEO])
    assert r.exit_code == 0, r.output
    b = Built(out, out / RUN)
    feats = b.read(GOOD, f"features/{ENC}")
    assert feats.shape == (49, 1280) and b.read(BLANK, "coords").shape == (0, 2)
    assert not b.store(NOFEAT).has(f"features/{ENC}") and len(b.read(NOFEAT, "coords")) == 49
    # slide_features/<encoder> and patient_features/ are not computed by the pipeline yet: write them per contract
    geo = {"patch_size": 224, "target_mpp": 0.5}
    b.store(GOOD).write(
        {"slide_features/mean": DatasetWrite(feats.mean(0), {"encoder": "mean", "patch_encoder": ENC, "geometry": geo})}
    )
    pdir = b.run / "patient_features" / "mean"
    pdir.mkdir(parents=True)
    with h5py.File(pdir / "case-1.h5", "w") as f:
        f.create_dataset("features", data=feats.mean(0))
        f.attrs["case_id"] = "case-1"
        f.attrs["slide_ids"] = json.dumps([GOOD, BLANK])
        f.attrs["encoder"] = "mean"
    return b


def _all_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def _no_temps(d: Path) -> None:
    assert not [p for p in d.rglob(".*") if p.is_file()], "temporary files left behind"


# -- slide2vec -----------------------------------------------------------------------------------


def test_slide2vec_layout_reads_back(built: Built, tmp_path: Path) -> None:
    dest = tmp_path / "s2v"
    rep = export(built.output, "slide2vec", dest, ENC, slide_encoder="mean")
    st = rep.by_slide()
    assert rep.run_dir == built.run.resolve()
    assert st[GOOD].status == "done" and st[GOOD].num_patches == 49 and st[GOOD].dim == 1280
    blank = st[BLANK]  # 0 patches: its empty files, and skipped with the reason
    assert blank.status == "skipped" and "0 patches" in blank.error and "no tissue" in blank.error
    assert blank.num_patches == 0 and blank.dim == 1280 and len(blank.files) == 4
    err = st[NOFEAT].error
    assert st[NOFEAT].status == "failed" and f"features/{ENC} missing" in err
    assert f"atlaspatch process {built.output.parent / NOFEAT}.svs" in err  # the command to run, for that slide
    assert f"--feature-extractors {ENC}" in err and "--patch-size 224" in err and "--target-mag 20" in err
    assert not rep.ok

    feats = built.read(GOOD, f"features/{ENC}")
    coords = built.read(GOOD, "coords")
    frac = built.read(GOOD, "tissue_fraction")

    t = torch.load(dest / "tile_embeddings" / f"{GOOD}.pt", map_location="cpu", weights_only=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == feats.shape
    assert np.array_equal(t.numpy(), feats)

    with np.load(dest / "tiles" / f"{GOOD}.coordinates.npz", allow_pickle=False) as z:
        assert set(z.files) == {"x", "y", "tile_index", "tissue_fractions"}
        assert z["x"].dtype == np.int64 and z["y"].dtype == np.int64
        assert z["tile_index"].dtype == np.int32 and z["tissue_fractions"].dtype == np.float32
        assert np.array_equal(z["x"], coords[:, 0]) and np.array_equal(z["y"], coords[:, 1])
        assert np.array_equal(z["tile_index"], np.arange(49)) and np.array_equal(z["tissue_fractions"], frac)

    tmeta = json.loads((dest / "tile_embeddings" / f"{GOOD}.meta.json").read_text())
    documented = {
        "sample_id",
        "artifact_type",
        "backend",
        "coordinates_meta_path",
        "coordinates_npz_path",
        "encoder_level",
        "encoder_name",
        "feature_dim",
        "format",
        "image_path",
        "mask_path",
        "num_tiles",
        "tile_size_lv0",
    }
    assert documented <= set(tmeta)
    assert tmeta["sample_id"] == GOOD and tmeta["artifact_type"] == "tile_embeddings"
    assert tmeta["encoder_name"] == ENC and tmeta["encoder_level"] == "tile" and tmeta["format"] == "pt"
    assert tmeta["feature_dim"] == 1280 and tmeta["num_tiles"] == 49 and tmeta["tile_size_lv0"] == 224
    assert tmeta["image_path"] == str(CMU)
    assert Path(tmeta["coordinates_npz_path"]) == dest / "tiles" / f"{GOOD}.coordinates.npz"
    prov = tmeta["provenance"]
    fattrs = built.store(GOOD).dataset_attrs(f"features/{ENC}")
    assert prov["software_version"] and prov["weights_sha256"] == fattrs["weights_sha256"] != ""
    assert prov["mpp"] == pytest.approx(0.499) and prov["geometry"]["patch_size_level0"] == 224
    assert prov["encoder"]["model_id"] == fattrs["model_id"]

    cmeta = json.loads((dest / "tiles" / f"{GOOD}.coordinates.meta.json").read_text())
    assert set(cmeta) == {"provenance", "slide", "tiling", "segmentation", "filtering", "artifact"}
    assert {"sample_id", "image_path", "mask_path", "backend", "requested_backend"} <= set(cmeta["provenance"])
    assert cmeta["slide"]["dimensions"] == [2220, 2967] and cmeta["slide"]["base_spacing_um"] == pytest.approx(0.499)
    assert cmeta["slide"]["level_downsamples"] == [1.0]
    tiling = cmeta["tiling"]
    assert tiling["requested_tile_size_px"] == 224 and tiling["requested_spacing_um"] == pytest.approx(0.5)
    assert tiling["effective_tile_size_px"] == 224 and tiling["tile_size_lv0"] == 224 and tiling["n_tiles"] == 49
    assert cmeta["segmentation"]["tissue_method"] == "otsu" and cmeta["segmentation"]["parameters"]["mask_mpp"] == 8.0
    assert cmeta["filtering"]["min_tissue_fraction"] == 0.5
    assert cmeta["artifact"]["coordinate_space"] == "level_0" and cmeta["artifact"]["tile_order"] == "row_major"
    assert cmeta["artifact"]["arrays"]["x"] == {"dtype": "int64", "shape": [49]}

    s = torch.load(dest / "slide_embeddings" / f"{GOOD}.pt", map_location="cpu", weights_only=True)
    assert s.dtype == torch.float32 and tuple(s.shape) == (1280,)
    assert np.allclose(s.numpy(), feats.mean(0))
    smeta = json.loads((dest / "slide_embeddings" / f"{GOOD}.meta.json").read_text())
    s_documented = {"sample_id", "artifact_type", "encoder_level", "encoder_name", "feature_dim", "format"}
    assert s_documented | {"image_path"} <= set(smeta)
    assert smeta["encoder_name"] == "mean" and smeta["encoder_level"] == "slide" and smeta["tile_encoder"] == ENC

    p = torch.load(dest / "patient_embeddings" / "case-1.pt", map_location="cpu", weights_only=True)
    assert tuple(p.shape) == (1280,) and p.dtype == torch.float32
    pmeta = json.loads((dest / "patient_embeddings" / "case-1.meta.json").read_text())
    assert pmeta["patient_id"] == "case-1" and pmeta["artifact_type"] == "patient_embeddings"
    assert pmeta["encoder_name"] == "mean" and pmeta["encoder_level"] == "patient" and pmeta["format"] == "pt"
    assert pmeta["feature_dim"] == 1280 and pmeta["num_slides"] == 2

    text = (dest / "process_list.csv").read_text()
    assert text.splitlines()[0] == "sample_id,status,error"
    rows = {r["sample_id"]: r for r in csv.DictReader(text.splitlines())}
    assert rows[GOOD]["status"] == "done" and rows[GOOD]["error"] == ""
    assert rows[BLANK]["status"] == "skipped" and "0 patches" in rows[BLANK]["error"]
    assert rows[NOFEAT]["status"] == "failed" and f"features/{ENC}" in rows[NOFEAT]["error"]

    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    assert cfg["output_dir"] == str(dest) and cfg["model"]["name"] == "mean"
    assert cfg["export"]["layout"] == "slide2vec" and cfg["export"]["encoder"] == ENC
    assert cfg["tiling"]["params"]["requested_tile_size_px"] == 224

    # the empty slide's files hold 0 rows (no slide embedding: none is stored for it)
    t0 = torch.load(dest / "tile_embeddings" / f"{BLANK}.pt", map_location="cpu", weights_only=True)
    assert t0.dtype == torch.float32 and tuple(t0.shape) == (0, 1280)
    with np.load(dest / "tiles" / f"{BLANK}.coordinates.npz", allow_pickle=False) as z:
        assert {k: (z[k].dtype, z[k].shape) for k in z.files} == {
            "x": (np.int64, (0,)),
            "y": (np.int64, (0,)),
            "tile_index": (np.int32, (0,)),
            "tissue_fractions": (np.float32, (0,)),
        }
    bmeta = json.loads((dest / "tile_embeddings" / f"{BLANK}.meta.json").read_text())
    assert bmeta["num_tiles"] == 0 and bmeta["feature_dim"] == 1280 and bmeta["tile_size_lv0"] == 224
    bcmeta = json.loads((dest / "tiles" / f"{BLANK}.coordinates.meta.json").read_text())
    assert bcmeta["tiling"]["n_tiles"] == 0 and bcmeta["artifact"]["tile_embeddings_shape"] == [0, 1280]
    assert not (dest / "slide_embeddings" / f"{BLANK}.pt").exists()

    # nothing for the failed slide, anywhere
    names = [f.name for f in _all_files(dest)]
    assert not [n for n in names if n.startswith(NOFEAT)]
    _no_temps(dest)


def test_slide2vec_skips_unchanged_and_force_rewrites(built: Built, tmp_path: Path) -> None:
    dest = tmp_path / "s2v"
    first = export(built.run, "slide2vec", dest, ENC, slides=[GOOD])
    assert first.by_slide()[GOOD].status == "done" and first.ok
    pt = dest / "tile_embeddings" / f"{GOOD}.pt"
    mtime = pt.stat().st_mtime_ns
    again = export(built.run, "slide2vec", dest, ENC, slides=[GOOD])
    assert again.by_slide()[GOOD].status == "skipped" and pt.stat().st_mtime_ns == mtime
    forced = export(built.run, "slide2vec", dest, ENC, slides=[GOOD], force=True)
    assert forced.by_slide()[GOOD].status == "done" and pt.stat().st_mtime_ns != mtime
    # a later export of another slide keeps the rows of the earlier ones
    empty = export(built.run, "slide2vec", dest, ENC, slides=[BLANK])
    assert empty.by_slide()[BLANK].status == "skipped" and empty.ok
    rows = {r["sample_id"]: r["status"] for r in csv.DictReader((dest / "process_list.csv").open())}
    assert rows == {GOOD: "done", BLANK: "skipped"}
    # the empty slide's files are not rewritten either while unchanged
    pt0 = dest / "tile_embeddings" / f"{BLANK}.pt"
    mtime0 = pt0.stat().st_mtime_ns
    assert export(built.run, "slide2vec", dest, ENC, slides=[BLANK]).by_slide()[BLANK].status == "skipped"
    assert pt0.stat().st_mtime_ns == mtime0


def test_failed_write_leaves_nothing(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error mid-slide (after the .npz temp) leaves no file and no temp of that slide."""

    def boom(fh: object, arrays: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exports, "save_npz", boom)
    dest = tmp_path / "s2v"
    rep = export(built.run, "slide2vec", dest, ENC, slides=[GOOD])
    st = rep.by_slide()[GOOD]
    assert st.status == "failed" and "No space left" in st.error and st.files == []
    assert not (dest / "tile_embeddings").exists() or not list((dest / "tile_embeddings").iterdir())
    assert [f.name for f in _all_files(dest)] == ["config.yaml", "process_list.csv"]
    _no_temps(dest)


def test_stale_and_mismatched_inputs_fail_per_slide(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.run, out / RUN, ignore=shutil.ignore_patterns("exports"))
    run = out / RUN
    good = SlideStore(run / "patches" / f"{GOOD}.h5")
    feats = good.read(f"features/{ENC}")[0]
    good.write({f"features/{ENC}": DatasetWrite(feats[:-1], {"encoder": ENC})})  # one row short
    other = run / "patches" / "other.h5"
    shutil.copyfile(built.run / "patches" / f"{GOOD}.h5", other)
    SlideStore(other).write({"slide_features/mean": DatasetWrite(feats.mean(0), {"patch_encoder": "uni_v1"})})
    rep = export(out, "trident", tmp_path / "t", ENC, slide_encoder="mean", slides=[GOOD, "other"])
    st = rep.by_slide()
    assert st[GOOD].status == "failed" and "48" in st[GOOD].error and "stale" in st[GOOD].error
    assert st["other"].status == "failed" and "features/uni_v1" in st["other"].error
    assert not _all_files(tmp_path / "t")


def test_empty_slide_without_features_takes_the_registry_dim(built: Built, tmp_path: Path) -> None:
    """0 patches and no features stored: empty (0, D) files with D of the encoder registry; unknown encoder → failed."""
    out = tmp_path / "out"
    shutil.copytree(built.run, out / RUN, ignore=shutil.ignore_patterns("exports"))
    run = out / RUN
    SlideStore(run / "patches" / f"{BLANK}.h5").write({}, delete=[f"features/{ENC}"])
    dest = tmp_path / "c"
    rep = export(out, "clam", dest, ENC, slides=[GOOD, BLANK])
    st = rep.by_slide()[BLANK]
    assert rep.ok and st.status == "skipped" and st.dim == 1280 and "0 patches" in st.error
    with h5py.File(dest / "h5_files" / f"{BLANK}.h5", "r") as f:
        assert f["features"].shape == (0, 1280) and f["features"].dtype == np.float32
        assert f["coords"].shape == (0, 2) and int(f["coords"].attrs["patch_size"]) == 224

    feats = built.read(GOOD, f"features/{ENC}")
    SlideStore(run / "patches" / f"{GOOD}.h5").write(
        {"features/my_model": DatasetWrite(feats, {"encoder": "my_model"})}
    )
    rep = export(out, "trident", tmp_path / "t", "my_model", slides=[GOOD, BLANK])
    st = rep.by_slide()
    assert st[GOOD].status == "done" and st[BLANK].status == "failed" and "dimension is unknown" in st[BLANK].error
    assert not (tmp_path / "t" / "features_my_model" / f"{BLANK}.h5").exists()


# -- TRIDENT and CLAM ----------------------------------------------------------------------------


def test_trident_layout_reads_back(built: Built, tmp_path: Path) -> None:
    dest = tmp_path / "trident"
    rep = export(built.output, "trident", dest, ENC, slide_encoder="mean", slides=[GOOD, BLANK])
    st = rep.by_slide()
    assert st[GOOD].status == "done" and st[BLANK].status == "skipped" and "0 patches" in st[BLANK].error
    feats, coords = built.read(GOOD, f"features/{ENC}"), built.read(GOOD, "coords")
    with h5py.File(dest / f"features_{ENC}" / f"{BLANK}.h5", "r") as f:  # 0 patches: empty, with TRIDENT's attrs
        assert f["features"].shape == (0, 1280) and f["coords"].shape == (0, 2)
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["name"] == BLANK
        assert f["coords"].attrs["target_magnification"] == 20
    with h5py.File(dest / f"features_{ENC}" / f"{GOOD}.h5", "r") as f:  # as TRIDENT's readers do
        assert np.array_equal(f["features"][:], feats) and f["features"].dtype == np.float32
        assert np.array_equal(f["coords"][:], coords)
        a = dict(f["coords"].attrs)
        assert a["patch_size"] == 224 and a["patch_size_level0"] == 224 and a["overlap"] == 0
        assert a["target_magnification"] == 20 and a["level0_magnification"] == pytest.approx(20.04)
        assert a["name"] == GOOD
        # TRIDENT's patcher: patch size at level 0 from the magnifications
        assert round(a["patch_size"] * a["level0_magnification"] / a["target_magnification"]) == 224
    with h5py.File(dest / "slide_features_mean" / f"{GOOD}.h5", "r") as f:
        assert f["features"].shape == (1280,) and np.allclose(f["features"][:], feats.mean(0))
    files = sorted(str(p.relative_to(dest)) for p in _all_files(dest))
    assert files == [f"features_{ENC}/{GOOD}.h5", f"features_{ENC}/{BLANK}.h5", f"slide_features_mean/{GOOD}.h5"]
    _no_temps(dest)


def test_clam_layout_reads_back(built: Built, tmp_path: Path) -> None:
    dest = tmp_path / "clam"
    rep = export(built.run / "patches", "clam", dest, ENC)
    st = rep.by_slide()
    assert st[GOOD].status == "done" and st[BLANK].status == "skipped" and [s.slide_id for s in rep.failed] == [NOFEAT]
    feats, coords = built.read(GOOD, f"features/{ENC}"), built.read(GOOD, "coords")
    with h5py.File(dest / "h5_files" / f"{GOOD}.h5", "r") as f:
        assert np.array_equal(f["features"][:], feats) and np.array_equal(f["coords"][:], coords)
        assert int(f["coords"].attrs["patch_level"]) == 0 and int(f["coords"].attrs["patch_size"]) == 224
    t = torch.load(dest / "pt_files" / f"{GOOD}.pt", weights_only=True)  # CLAM's dataset loader
    assert t.dtype == torch.float32 and np.array_equal(t.numpy(), feats)
    assert sorted(p.name for p in _all_files(dest)) == [f"{GOOD}.h5", f"{GOOD}.pt", f"{BLANK}.h5", f"{BLANK}.pt"]
    assert tuple(torch.load(dest / "pt_files" / f"{BLANK}.pt", weights_only=True).shape) == (0, 1280)
    with pytest.raises(ExportUsageError, match="CLAM"):
        export(built.run, "clam", dest, ENC, slide_encoder="mean")


# -- run folder resolution and usage errors ------------------------------------------------------


def test_resolve_run_dir_and_usage_errors(built: Built, tmp_path: Path) -> None:
    run = built.run.resolve()
    assert resolve_run_dir(built.output)[0] == run
    assert resolve_run_dir(built.run)[0] == run and resolve_run_dir(built.run / "patches")[0] == run
    with pytest.raises(ExportUsageError, match="no such folder"):
        resolve_run_dir(tmp_path / "missing")
    with pytest.raises(ExportUsageError, match="no run folder"):
        resolve_run_dir(tmp_path)
    two = tmp_path / "two"
    for name in (RUN, "10x_224px_0px_overlap"):
        (two / name / "patches").mkdir(parents=True)
        shutil.copyfile(built.run / "patches" / f"{GOOD}.h5", two / name / "patches" / f"{GOOD}.h5")
    with pytest.raises(ExportUsageError, match="several run folders"):
        resolve_run_dir(two, ENC)
    with pytest.raises(ExportUsageError, match="unknown layout"):
        export(built.run, "h5ad", tmp_path / "x", ENC)
    with pytest.raises(ExportUsageError, match="features/resnet50"):
        export(built.run, "trident", tmp_path / "x", "resnet50")
    with pytest.raises(ExportUsageError, match="unknown slide id nope"):
        export(built.run, "trident", tmp_path / "x", ENC, slides=["nope"])
    assert not (tmp_path / "x").exists()


def test_cli_export(built: Built, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(export_command, [str(built.output), "--layout", "slide2vec", "--encoder", ENC])
    assert r.exit_code == 1, r.output  # the slide without features failed
    assert "FAILED" in r.output and "1 done" in r.output and "1 skipped" in r.output
    assert "SKIPPED" in r.output and "0 patches" in r.output
    default = built.run / "exports" / "slide2vec" / ENC
    assert (default / "tile_embeddings" / f"{GOOD}.pt").is_file() and (default / "process_list.csv").is_file()

    dest = tmp_path / "t"
    args = [str(built.run), "--layout", "trident", "--encoder", ENC, "--dest", str(dest), "--slides", GOOD]
    r = runner.invoke(export_command, args)
    assert r.exit_code == 0, r.output
    assert (dest / f"features_{ENC}" / f"{GOOD}.h5").is_file()
    r = runner.invoke(export_command, args)
    assert r.exit_code == 0 and "1 skipped" in r.output

    for bad, msg in [
        ([str(built.run), "--layout", "h5ad", "--encoder", ENC], "h5ad"),
        ([str(tmp_path / "missing"), "--layout", "clam", "--encoder", ENC], "no such folder"),
        ([str(built.run), "--layout", "clam", "--encoder", "resnet50"], "features/resnet50"),
        ([str(built.run), "--layout", "clam", "--encoder", ENC, "--slides", "nope"], "unknown slide"),
    ]:
        r = runner.invoke(export_command, bad)
        assert r.exit_code == 2, (bad, r.output)
        assert msg in r.output
