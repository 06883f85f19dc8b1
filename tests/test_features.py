"""Patch features through the pipeline (`atlaspatch process`): parity with a plain torchvision
forward, one read pass for several encoders, incremental encoders, isolation of failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow.dataset as pads
import pytest
import tifffile
import torch
import torchvision
from click.testing import CliRunner

from atlaspatch_assets.cli import main
from atlaspatch_assets.core.encoders import Encoder
from atlaspatch_assets.core.patches import read_patch
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages import load_patch_coords
from atlaspatch_assets.core.stages.features import extract_features
from atlaspatch_assets.core.store import RunLayout

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
RUN = "20x_224px_0px_overlap"
BASE = ["--patch-size", "224", "--target-mag", "20"]


@pytest.fixture(autouse=True)
def _no_dagster_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("ATLASPATCH_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _process(inp: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(
        main, ["process", str(inp), *BASE, "-o", str(out), *extra], catch_exceptions=False, env={"COLUMNS": "250"}
    )
    return res.exit_code, res.output


def _events(out: Path) -> list[dict]:
    return pads.dataset(str(out / "catalog" / "events"), format="parquet").to_table().to_pylist()


@pytest.fixture()
def cmu_dir(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(CMU, d / CMU.name)
    return d


def _torchvision_features(weights: Path, pixels: np.ndarray) -> np.ndarray:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.classifier = torch.nn.Identity()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model.eval()((x - mean) / std).numpy()


def test_pipeline_features_equal_plain_torchvision(cmu_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, text = _process(cmu_dir, out, "--feature-extractors", "mobilenet_v2")
    assert code == 0, text
    h5 = out / RUN / "patches" / "CMU-1-Small-Region.h5"
    with h5py.File(h5) as f:
        feats = f["features/mobilenet_v2"][()]
        coords = f["coords"][()]
        attrs = dict(f["features/mobilenet_v2"].attrs)
    assert feats.shape == (len(coords), 1280) and feats.dtype == np.float32 and len(coords) > 10
    assert attrs["encoder"] == "mobilenet_v2" and attrs["precision"] == "float32" and attrs["input_size"] == 224
    # The same pixels, read by the reference reader, through plain torchvision with the same weights.
    weights = Encoder.load("mobilenet_v2").weights.path
    layout = RunLayout.create(out, 224, target_mag=20)
    geometry = load_patch_coords(layout, "CMU-1-Small-Region").geometry
    with open_slide(CMU) as slide:
        pixels = np.stack([read_patch(slide, geometry, int(x), int(y)) for x, y in coords])
    ref = _torchvision_features(weights, pixels)
    rel = np.linalg.norm(feats - ref) / np.linalg.norm(ref)
    assert rel <= 1e-5, rel
    assert attrs["weights_sha256"] and len(attrs["weights_sha256"]) == 64


def test_one_read_pass_feeds_every_encoder(tmp_path: Path, cmu_dir: Path) -> None:
    out = tmp_path / "out"
    assert _process(cmu_dir, out, "--feature-extractors", "mobilenet_v2")[0] == 0
    layout = RunLayout.create(out, 224, target_mag=20)
    coords = load_patch_coords(layout, "CMU-1-Small-Region")
    encoders = {n: Encoder.load(n) for n in ("mobilenet_v2", "efficientnet_lite0")}
    with open_slide(CMU) as slide:
        # the CLI's batch size (32): a last batch of one patch (49 = 6 x 8 + 1) gives other floats
        results = extract_features(slide, "CMU-1-Small-Region", coords, encoders, batch_size=32)
    reader = results["mobilenet_v2"].extra["reader"]
    assert reader["patches"] == coords.num_patches  # each patch assembled once for both encoders
    assert results["efficientnet_lite0"].extra["reader"] is reader
    with h5py.File(layout.store("CMU-1-Small-Region").path) as f:
        np.testing.assert_array_equal(results["mobilenet_v2"].features, f["features/mobilenet_v2"][()])


def test_adding_an_encoder_keeps_coords_and_other_features(tmp_path: Path, cmu_dir: Path) -> None:
    out = tmp_path / "out"
    assert _process(cmu_dir, out, "--feature-extractors", "mobilenet_v2")[0] == 0
    h5 = out / RUN / "patches" / "CMU-1-Small-Region.h5"
    with h5py.File(h5) as f:
        first = f["features/mobilenet_v2"][()]
        coords = f["coords"][()]
    n_events = len(_events(out))
    code, text = _process(cmu_dir, out, "--feature-extractors", "mobilenet_v2,efficientnet_lite0")
    assert code == 0, text
    new = _events(out)[n_events:]
    by_asset = {e["asset"]: e["status"] for e in new}
    assert by_asset["tissue_mask"] == "skipped" and by_asset["patch_coords"] == "skipped"
    assert by_asset["features/efficientnet_lite0"] == "done"
    assert by_asset["features/mobilenet_v2"] == "skipped"  # reused, not recomputed
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(f["features/mobilenet_v2"][()], first)
        np.testing.assert_array_equal(f["coords"][()], coords)
        assert f["features/efficientnet_lite0"].shape == (len(coords), 1280)
        assert {d["name"] for d in __import__("json").loads(f.attrs["feature_sets"])} == {
            "mobilenet_v2",
            "efficientnet_lite0",
        }
    # --force recomputes only what was asked.
    n_events = len(_events(out))
    assert _process(cmu_dir, out, "--feature-extractors", "efficientnet_lite0", "--force")[0] == 0
    forced = {e["asset"] for e in _events(out)[n_events:] if e["status"] == "done"}
    assert forced == {"tissue_mask", "patch_coords", "features/efficientnet_lite0"}
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(f["features/mobilenet_v2"][()], first)


def test_missing_weights_are_refused_before_any_work(tmp_path: Path, cmu_dir: Path) -> None:
    """The CLI checks every requested encoder first and lists all the missing weights at once."""
    out = tmp_path / "out"
    code, text = _process(cmu_dir, out, "--feature-extractors", "mobilenet_v2,resnet18,uni_v1")
    assert code == 2
    assert "features/resnet18" in text and "features/uni_v1" in text and "mobilenet_v2:" not in text
    assert "--weights-dir" in text and "never downloaded" in text
    assert not (out / RUN / "patches").exists()  # nothing was started


def test_an_encoder_without_weights_fails_alone_in_a_run(tmp_path: Path) -> None:
    """Where no pre-check ran (a UI run), the encoder fails on every slide, the others are stored."""
    from atlaspatch_assets.core.catalog import Catalog
    from atlaspatch_assets.core.source import SlideRef
    from atlaspatch_assets.core.stages import CoordsParams, MaskParams, StageEnv, StagePlan, run_slide

    layout = RunLayout.create(tmp_path, 224, target_mag=20)
    env = StageEnv(layout=layout, catalog=Catalog(layout.catalog_dir))
    plan = StagePlan(mask=MaskParams(), coords=CoordsParams(), encoders=("mobilenet_v2", "resnet18"))
    outs = {o.asset: o for o in run_slide(SlideRef("cmu", str(CMU)), plan, env)}
    assert outs["features/mobilenet_v2"].status == "done"
    bad = outs["features/resnet18"]
    assert bad.status == "failed" and "resnet18" in bad.reason and "never downloaded" in bad.reason
    assert layout.store("cmu").encoders() == ["mobilenet_v2"]


def test_unknown_encoder_and_bad_plugin_are_usage_errors(tmp_path: Path, cmu_dir: Path) -> None:
    code, text = _process(cmu_dir, tmp_path, "--feature-extractors", "uni_v3")
    assert code == 2 and "uni_v1" in text
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text(
        "def register_feature_extractors(registry, device, dtype, num_workers):\n    raise RuntimeError('boom')\n"
    )
    code, text = _process(cmu_dir, tmp_path, "--feature-extractors", "mobilenet_v2", "--feature-plugin", str(plugin))
    assert code == 2 and "broken_plugin.py" in text and "boom" in text


PLUGIN = """
import torch
from atlaspatch_assets.core.encoders import register_custom_encoder

class Tiny(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.proj = torch.nn.Linear(3, dim)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))[:, : {out}]

def register_feature_extractors(registry, device, dtype, num_workers):
    register_custom_encoder(registry=registry, name="{name}", embedding_dim=8, loader=lambda device, dtype: Tiny(8),
                            input_size=64)
"""


def test_plugin_encoder_works_and_wrong_shape_fails_alone(tmp_path: Path, cmu_dir: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(PLUGIN.replace("{out}", "8").replace("{name}", "tiny_good"))
    out = tmp_path / "out"
    code, text = _process(cmu_dir, out, "--feature-extractors", "tiny_good,mobilenet_v2", "--feature-plugin", str(good))
    assert code == 0, text
    h5 = out / RUN / "patches" / "CMU-1-Small-Region.h5"
    with h5py.File(h5) as f:
        assert f["features/tiny_good"].shape == (f["coords"].shape[0], 8)
        before = f["features/mobilenet_v2"][()]
    bad = tmp_path / "bad.py"
    bad.write_text(PLUGIN.replace("{out}", "5").replace("{name}", "tiny_bad"))
    code, text = _process(cmu_dir, out, "--feature-extractors", "tiny_bad", "--feature-plugin", str(bad))
    assert code == 1 and "tiny_bad" in text
    with h5py.File(h5) as f:
        assert "features/tiny_bad" not in f
        np.testing.assert_array_equal(f["features/mobilenet_v2"][()], before)


def test_tiles_failing_mid_slide_store_nothing_partial(tmp_path: Path) -> None:
    """A slide whose level-0 tiles break in the middle: mask/coords work (coarse level), the
    features step fails for the slide and stores nothing; earlier features stay intact."""
    import subprocess
    import sys

    slide = tmp_path / "in" / "bigger.svs"
    slide.parent.mkdir()
    tool = SHARED / "tools" / "make_test_slide.py"
    subprocess.run(
        [
            sys.executable,
            str(tool),
            str(slide),
            "--width",
            "3000",
            "--height",
            "2400",
            "--mag",
            "20",
            "--tissue",
            "0.6",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = tmp_path / "out"
    code, text = _process(slide.parent, out, "--feature-extractors", "mobilenet_v2")
    assert code == 0, text
    h5 = out / RUN / "patches" / "bigger.h5"
    with h5py.File(h5) as f:
        before = f["features/mobilenet_v2"][()]
    # Corrupt the level-0 tiles of the lower half of the slide (keep file size and structure).
    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    with open(slide, "r+b") as fh:
        for off, cnt in list(zip(offsets, counts, strict=True))[len(offsets) // 2 :]:
            fh.seek(off)
            fh.write(b"\x00" * cnt)
    code, text = _process(slide.parent, out, "--feature-extractors", "efficientnet_lite0")
    assert code == 1
    assert "bigger" in text and "FAILED" in text
    with h5py.File(h5) as f:
        assert "features/efficientnet_lite0" not in f
        np.testing.assert_array_equal(f["features/mobilenet_v2"][()], before)


MEMORY_LIMITED_PLUGIN = """
import torch
from atlaspatch_assets.core.encoders import register_custom_encoder

class MemoryLimited(torch.nn.Module):
    '''Like a big model on a small GPU: batches above `fits` patches run out of memory.'''

    def __init__(self, fits):
        super().__init__()
        self.fits = fits
        torch.manual_seed(0)  # the same weights in every run
        self.proj = torch.nn.Linear(3, 8)

    def forward(self, x):
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} GiB")
        return self.proj(x.mean(dim=(2, 3)))

def register_feature_extractors(registry, device, dtype, num_workers):
    register_custom_encoder(registry=registry, name="fits_3", embedding_dim=8,
                            loader=lambda device, dtype: MemoryLimited(3), input_size=64)
    register_custom_encoder(registry=registry, name="fits_0", embedding_dim=8,
                            loader=lambda device, dtype: MemoryLimited(0), input_size=64)
"""


def test_out_of_memory_batches_are_split_and_a_hopeless_encoder_fails_alone(tmp_path: Path, cmu_dir: Path) -> None:
    plugin = tmp_path / "memory_limited.py"
    plugin.write_text(MEMORY_LIMITED_PLUGIN)
    out = tmp_path / "out"
    args = ["--feature-plugin", str(plugin), "--feature-batch-size", "16"]
    code, text = _process(cmu_dir, out, "--feature-extractors", "fits_3,fits_0,mobilenet_v2", *args)
    assert code == 1 and "fits_0" in text and "out of memory" in text and "1 patch per batch" in text
    with h5py.File(out / RUN / "patches" / "CMU-1-Small-Region.h5") as f:
        n = f["coords"].shape[0]
        assert n > 16  # several reader batches, each split until 3 patches fit
        assert f["features/fits_3"].shape == (n, 8) and np.isfinite(f["features/fits_3"][()]).all()
        assert f["features/mobilenet_v2"].shape[0] == n  # the same pass, unaffected
        assert "features/fits_0" not in f  # nothing partial
        smaller = f["features/fits_3"][()]
    # the split batches give the features of one patch at a time
    code, text = _process(
        cmu_dir, tmp_path / "one", "--feature-extractors", "fits_3", *args[:2], "--feature-batch-size", "1"
    )
    assert code == 0, text
    with h5py.File(tmp_path / "one" / RUN / "patches" / "CMU-1-Small-Region.h5") as f:
        np.testing.assert_allclose(f["features/fits_3"][()], smaller, rtol=1e-5, atol=1e-6)
