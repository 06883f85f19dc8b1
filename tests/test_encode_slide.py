"""`atlaspatch encode-slide` / `encode-patient` end to end on real slides with mean/max pooling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_aperio_tiff
from dagster import AssetKey

from atlaspatch_assets.cli import main
from atlaspatch_assets.defs.definitions import build_definitions

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
RUN = "20x_224px_0px_overlap"
GEO = ["--patch-size", "224", "--target-mag", "20"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("ATLASPATCH_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False, env={"COLUMNS": "250"})
    return res.exit_code, res.output


def _blank_slide(path: Path) -> Path:
    return write_aperio_tiff(path, np.full((2048, 2048, 3), 250, np.uint8))


def test_mean_and_max_pooling_are_stored_with_provenance(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(CMU, inp / CMU.name)
    _blank_slide(inp / "blank.svs")
    out = tmp_path / "out"
    code, text = _cli(
        "encode-slide",
        str(inp),
        "-o",
        str(out),
        *GEO,
        "--slide-encoders",
        "mean,max",
        "--feature-extractors",
        "mobilenet_v2",
    )
    assert code == 1, text  # the blank slide has 0 patches: it fails alone
    assert "blank" in text and "0 patches" in text
    with h5py.File(out / RUN / "patches" / "CMU-1-Small-Region.h5") as f:
        feats = f["features/mobilenet_v2"][()]
        np.testing.assert_allclose(f["slide_features/mean_mobilenet_v2"][()], feats.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(f["slide_features/max_mobilenet_v2"][()], feats.max(0))
        attrs = dict(f["slide_features/mean_mobilenet_v2"].attrs)
    assert attrs["patch_encoder"] == "mobilenet_v2" and attrs["slide_encoder"] == "mean"
    assert attrs["num_patches"] == len(feats) and attrs["patch_size"] == 224
    with h5py.File(out / RUN / "patches" / "blank.h5") as f:
        assert "slide_features" not in f
    # Second run: recipe matches, nothing recomputed.
    code, text = _cli(
        "encode-slide",
        str(inp / CMU.name),
        "-o",
        str(out),
        *GEO,
        "--slide-encoders",
        "mean",
        "--feature-extractors",
        "mobilenet_v2",
    )
    assert code == 0 and "skipped" in text


def test_geometry_mismatch_and_incompatible_encoders_fail_before_work(tmp_path: Path) -> None:
    code, text = _cli("encode-slide", str(CMU), "-o", str(tmp_path), "--slide-encoders", "titan,prism")
    assert code == 2 and "titan" in text and "prism" in text and "512" in text and "224" in text
    code, text = _cli("encode-slide", str(CMU), "-o", str(tmp_path), "--slide-encoders", "prism", "--patch-size", "256")
    assert code == 2 and "--patch-size 224" in text
    code, text = _cli("encode-slide", str(CMU), "-o", str(tmp_path), "--slide-encoders", "titn")
    assert code == 2 and "titan" in text
    assert not any(tmp_path.rglob("*.h5"))


def test_missing_weights_of_slide_and_patch_encoder_are_refused_before_work(tmp_path: Path) -> None:
    code, text = _cli("encode-slide", str(CMU), "-o", str(tmp_path), "--slide-encoders", "moozy")
    assert code == 2  # both missing weights listed at once, nothing started
    assert "features/lunit_vit_small_patch8_dino" in text and "slide_features/moozy" in text
    assert "--weights-dir" in text and not (tmp_path / RUN).exists()


def test_slide_embedding_not_run_when_its_patch_features_fail(tmp_path: Path) -> None:
    """In a run (no pre-check), the slide encoder of a slide whose patch features failed is not run
    and says why; mask and coordinates are stored at the slide encoder's geometry."""
    from atlaspatch_assets.core.catalog import Catalog
    from atlaspatch_assets.core.source import SlideRef
    from atlaspatch_assets.core.stages import (
        CoordsParams,
        MaskParams,
        StageEnv,
        StagePlan,
        plan_slide_encoders,
        run_slide,
    )
    from atlaspatch_assets.core.store import RunLayout

    p = plan_slide_encoders(["moozy"])
    layout = RunLayout.create(tmp_path, p.patch_size, target_mag=p.target_mag)
    assert layout.root.name == RUN  # the geometry comes from moozy
    plan = StagePlan(mask=MaskParams(), coords=CoordsParams(), encoders=p.patch_encoders, targets=p.targets)
    outs = {o.asset: o for o in run_slide(SlideRef("cmu", str(CMU)), plan, StageEnv(layout, Catalog(tmp_path / "c")))}
    assert outs["features/lunit_vit_small_patch8_dino"].status == "failed"
    moozy = outs["slide_features/moozy"]
    assert moozy.status == "failed" and "not run: features/lunit_vit_small_patch8_dino failed" in moozy.reason
    assert layout.store("cmu").num_patches() and not layout.store("cmu").slide_feature_names()


def test_encode_patient_manifest(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    a, b = inp / "a.svs", inp / "b.svs"
    shutil.copy(CMU, a)
    shutil.copy(CMU, b)
    png = SHARED / "slides" / "images" / "he-1000px.png"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "case_id,slide_path,mpp\n"
        f"case-1,{a},\ncase-1,{b},\n"
        f"case-2,{png},0.5\n"
        f"case-3,{inp / 'missing.svs'},\n"
        f"case-4,{a},\ncase-4,{a},\n"
    )
    out = tmp_path / "out"
    code, text = _cli(
        "encode-patient",
        str(manifest),
        "-o",
        str(out),
        *GEO,
        "--slide-encoders",
        "mean",
        "--feature-extractors",
        "mobilenet_v2",
    )
    assert code == 1, text
    assert "case-3" in text and "slide not found" in text
    assert "case-4" in text and "duplicate row" in text
    pdir = out / RUN / "patient_features" / "mean_mobilenet_v2"
    assert sorted(p.name for p in pdir.glob("*.h5")) == ["case-1.h5", "case-2.h5"]
    with h5py.File(pdir / "case-1.h5") as f:
        v = f["features"][()]
        assert f.attrs["case_id"] == "case-1" and json.loads(f.attrs["slide_ids"]) == ["a", "b"]
    with h5py.File(out / RUN / "patches" / "a.h5") as fa, h5py.File(out / RUN / "patches" / "b.h5") as fb:
        expected = (fa["slide_features/mean_mobilenet_v2"][()] + fb["slide_features/mean_mobilenet_v2"][()]) / 2
    np.testing.assert_allclose(v, expected, rtol=1e-6)


def test_lineage_links_patch_features_to_slide_and_patient_assets() -> None:
    defs = build_definitions(encoders=[], slide_encoders=["titan", "mean_mobilenet_v2"])
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey(["slide_features", "titan"])).parent_keys == {AssetKey(["features", "conch_v15"])}
    assert graph.get(AssetKey(["slide_features", "mean_mobilenet_v2"])).parent_keys == {
        AssetKey(["features", "mobilenet_v2"])
    }
    patient = graph.get(AssetKey(["patient_features", "titan"]))
    assert patient.parent_keys == {AssetKey(["slide_features", "titan"])}
    assert patient.partitions_def.name == "patients"


def test_titan_on_conch_v15_end_to_end_with_random_weights(tmp_path: Path) -> None:
    """slide → mask → 512 px/20x coords → conch_v15 (TITAN's tower) → titan, both from local checkpoints."""
    import safetensors.torch
    import torch

    from atlaspatch_assets.core.encoders import ENCODERS
    from atlaspatch_assets.core.slide_encoders import SlideEncoder

    torch.manual_seed(0)
    conch = tmp_path / "pytorch_model_vision.bin"
    torch.save(ENCODERS["conch_v15"].create().state_dict(), conch)  # the published layout (trunk.*, ...)
    titan = SlideEncoder.load("titan", random_weights=True)
    titan_dir = tmp_path / "titan"
    titan_dir.mkdir()
    state = {k: v.contiguous() for k, v in titan.model.state_dict().items()}
    safetensors.torch.save_file(state, str(titan_dir / "model.safetensors"))
    out = tmp_path / "out"
    code, text = _cli(
        "encode-slide",
        str(CMU),
        "-o",
        str(out),
        "--slide-encoders",
        "titan",
        "--encoder-weights",
        f"conch_v15={conch}",
        "--slide-encoder-weights",
        f"titan={titan_dir}",
        "--feature-precision",
        "bfloat16",
    )
    assert code == 0, text
    with h5py.File(out / "20x_512px_0px_overlap" / "patches" / "CMU-1-Small-Region.h5") as f:
        assert f.attrs["patch_size"] == 512 and f.attrs["target_magnification"] == 20
        feats = f["features/conch_v15"][()]
        coords = f["coords"][()]
        emb = f["slide_features/titan"][()]
        assert dict(f["features/conch_v15"].attrs)["weights_sha256"] == _sha256(conch)
        size0 = int(f.attrs["patch_size_level0"])
    assert feats.shape == (len(coords), 768) and len(coords) > 5 and np.isfinite(feats).all()
    assert emb.shape == (768,) and np.isfinite(emb).all()
    np.testing.assert_allclose(emb, titan.encode(feats, coords, size0), rtol=1e-4, atol=1e-5)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
