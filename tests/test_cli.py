"""The `atlaspatch` CLI end to end on real slides: outputs, exit codes, skip/force, Dagster instance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from shapely.geometry import box, shape

from atlaspatch_assets.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
BROKEN = SHARED / "slides" / "broken" / "not-an-image.svs"
RUN = "20x_256px_0px_overlap"


@pytest.fixture(autouse=True)
def _no_dagster_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def _slides(tmp_path: Path, *files: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for f in files:
        shutil.copy(f, d / f.name)
    return d


def test_batch_with_a_broken_slide_fails_alone(tmp_path: Path) -> None:
    inp = _slides(tmp_path, CMU, BROKEN)
    out = tmp_path / "out"
    code, text = _invoke(
        "segment-and-get-coords",
        str(inp),
        "--patch-size",
        "256",
        "--target-mag",
        "20",
        "-o",
        str(out),
        "--visualize-grids",
        "--visualize-mask",
        "--visualize-contours",
        "--save-images",
    )
    assert code == 1, text
    assert "not-an-image" in text and "failed" in text and "cannot open slide" in text
    assert "1 done, 0 skipped, 1 failed" in text
    run = out / RUN
    with h5py.File(run / "patches" / "CMU-1-Small-Region.h5") as f:
        n = f["coords"].shape[0]
        assert n == f.attrs["num_patches"] > 0
    assert not (run / "patches" / "not-an-image.h5").exists()
    for name in ("CMU-1-Small-Region.png", "CMU-1-Small-Region_mask.png", "CMU-1-Small-Region_contours.png"):
        assert (run / "visualization" / name).stat().st_size > 0
    pngs = sorted((run / "images" / "CMU-1-Small-Region").glob("CMU-1-Small-Region_x*_y*.png"))
    assert len(pngs) == n
    # The GeoJSON holds valid level-0 polygons inside the slide.
    gj = json.loads((run / "masks" / "CMU-1-Small-Region.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    bounds = box(0, 0, 2220, 2967).buffer(40)
    for feat in gj["features"]:
        geom = shape(feat["geometry"])
        assert geom.is_valid and geom.area > 0 and bounds.contains(geom)
        assert feat["properties"]["classification"]["name"] == "Tissue"


def test_skip_existing_then_force(tmp_path: Path) -> None:
    inp = _slides(tmp_path, CMU)
    args = [
        "segment-and-get-coords",
        str(inp),
        "--patch-size",
        "256",
        "--target-mag",
        "20",
        "-o",
        str(tmp_path),
    ]
    assert _invoke(*args)[0] == 0
    h5 = tmp_path / RUN / "patches" / "CMU-1-Small-Region.h5"
    mtime = h5.stat().st_mtime_ns
    code, text = _invoke(*args)
    assert code == 0 and "skipped" in text
    assert h5.stat().st_mtime_ns == mtime  # untouched
    code, text = _invoke(*args, "--force")
    assert code == 0 and "1 done" in text
    assert h5.stat().st_mtime_ns != mtime
    # A different recipe is not "existing": recomputed without --force.
    code, text = _invoke(*args, "--tissue-thresh", "0.05")
    assert code == 0 and "1 done" in text


@pytest.mark.parametrize(
    "extra",
    [
        [],  # no --target-mag/--target-mpp
        ["--target-mag", "20", "--mpp-csv", "/nonexistent.csv"],
        ["--target-mag", "-5"],
        ["--target-mag", "20", "--seg-method", "sam2"],  # no checkpoint
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, extra: list[str]) -> None:
    code, text = _invoke("segment-and-get-coords", str(CMU), "--patch-size", "256", "-o", str(tmp_path), *extra)
    assert code == 2, text
    assert not (tmp_path / RUN).exists()


def test_missing_patch_size_and_empty_dir_exit_2(tmp_path: Path) -> None:
    assert _invoke("segment-and-get-coords", str(CMU), "--target-mag", "20")[0] == 2
    (tmp_path / "empty").mkdir()
    code, text = _invoke(
        "segment-and-get-coords",
        str(tmp_path / "empty"),
        "--patch-size",
        "256",
        "--target-mag",
        "20",
        "-o",
        str(tmp_path),
    )
    assert code == 2 and "no supported slide" in text


def test_target_mag_above_native_fails(tmp_path: Path) -> None:
    code, text = _invoke(
        "segment-and-get-coords", str(CMU), "--patch-size", "256", "--target-mag", "40", "-o", str(tmp_path)
    )
    assert code == 1
    assert "finer than the slide's native" in text


def test_mpp_csv_makes_plain_image_work(tmp_path: Path) -> None:
    png = SHARED / "slides" / "images" / "he-1000px.png"
    code, text = _invoke(
        "segment-and-get-coords", str(png), "--patch-size", "128", "--target-mag", "20", "-o", str(tmp_path)
    )
    assert code == 1 and "--mpp-csv" in text
    csv = tmp_path / "mpp.csv"
    csv.write_text("wsi,mpp\nhe-1000px.png,0.5\n")
    code, text = _invoke(
        "segment-and-get-coords",
        str(png),
        "--patch-size",
        "128",
        "--target-mag",
        "20",
        "-o",
        str(tmp_path),
        "--mpp-csv",
        str(csv),
    )
    assert code == 0, text
    with h5py.File(tmp_path / "20x_128px_0px_overlap" / "patches" / "he-1000px.h5") as f:
        assert f.attrs["mpp"] == pytest.approx(0.5)
        assert f.attrs["num_patches"] > 0


def test_detect_tissue_writes_mask_only(tmp_path: Path) -> None:
    code, text = _invoke("detect-tissue", str(CMU), "--patch-size", "256", "--target-mag", "20", "-o", str(tmp_path))
    assert code == 0, text
    with h5py.File(tmp_path / RUN / "patches" / "CMU-1-Small-Region.h5") as f:
        assert "tissue/mask" in f and "coords" not in f
        assert 0 < f["tissue/mask"].attrs["tissue_fraction"] < 1


def test_info_lists_formats_and_layout() -> None:
    code, text = _invoke("info")
    assert code == 0
    for token in (".svs", ".ndpi", ".dcm", ".png", "otsu", "sam2", "coords_ext", "catalog"):
        assert token in text


def test_runs_are_recorded_in_the_dagster_home_instance(tmp_path: Path) -> None:
    """With DAGSTER_HOME set, CLI runs land in that instance (what the UI shows)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    cmd = [
        sys.executable,
        "-m",
        "atlaspatch_assets.cli",
        "segment-and-get-coords",
        str(CMU),
        "--patch-size",
        "256",
        "--target-mag",
        "20",
        "-o",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code = (
        "from dagster import DagsterInstance, AssetKey\n"
        "i = DagsterInstance.get()\n"
        "print(i.get_dynamic_partitions('slides'))\n"
        "ev = i.get_latest_materialization_event(AssetKey('patch_coords'))\n"
        "print(ev.dagster_event.partition, ev.asset_materialization.metadata['num_patches'].value)\n"
    )
    check = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    lines = check.stdout.strip().splitlines()
    assert "CMU-1-Small-Region" in lines[0]
    part, n = lines[1].split()
    with h5py.File(tmp_path / "out" / RUN / "patches" / "CMU-1-Small-Region.h5") as f:
        assert part == "CMU-1-Small-Region" and int(n) == f.attrs["num_patches"]


def test_runtime_install_without_torch_runs_the_main_job(tmp_path: Path) -> None:
    """`make demo` installs no torch: the code location and the CLI must work without it."""
    code = (
        "import sys; sys.modules['torch'] = None  # as if torch were not installed\n"
        "from atlaspatch_assets.defs.definitions import defs\n"
        "keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}\n"
        "assert {'tissue_mask', 'patch_coords'} <= keys and not any(k.startswith('features/') for k in keys), keys\n"
        "from atlaspatch_assets.cli import main\n"
        f"main(['segment-and-get-coords', {str(CMU)!r}, '-o', {str(tmp_path)!r}, "
        "'--patch-size', '256', '--target-mag', '20'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with h5py.File(tmp_path / "20x_256px_0px_overlap" / "patches" / "CMU-1-Small-Region.h5") as f:
        assert len(f["coords"]) > 0
