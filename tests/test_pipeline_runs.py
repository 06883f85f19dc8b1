"""End-to-end runs through Dagster (`runner.run_slides`, ephemeral instance) on a messy folder."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from conftest import CMU, PNG, truncated_copy
from dagster import DagsterInstance

from atlaspatch_assets.cli.runner import RunSettings, SlideOutcome, run_slides
from atlaspatch_assets.core.discovery import SlideFile, discover
from atlaspatch_assets.core.source import SlideSourceParams
from atlaspatch_assets.core.stages import CoordsParams, MaskParams, StagePlan
from atlaspatch_assets.core.store import GeometryParams
from atlaspatch_assets.core.tiling import DEFAULT_MIN_TISSUE_FRACTION

ALLOWED_SUFFIXES = (".h5", ".geojson", ".png", ".parquet")


@dataclass
class Runs:
    inputs: Path
    output: Path
    slides: list[SlideFile]
    first: dict[str, SlideOutcome]  # by file name relative to inputs
    first_h5: dict[str, dict]  # slide_id -> facts read from its store right after the first run
    mpp_csv: SlideOutcome
    mag40: SlideOutcome
    again: list[SlideOutcome]
    changed: list[SlideOutcome]


def _opts(output: Path, target_mag: float = 20, mpp_csv: str = "", **coords: object) -> RunSettings:
    plan = StagePlan(mask=MaskParams(), coords=CoordsParams(**coords))
    return RunSettings(str(output), GeometryParams(256, None, target_mag), plan, SlideSourceParams(mpp_csv=mpp_csv))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, blank_slide: Path) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    inputs, output = root / "in", root / "out"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    shutil.copyfile(CMU, inputs / "a" / "CMU.svs")
    shutil.copyfile(CMU, inputs / "b" / "CMU.svs")
    (inputs / "empty.svs").write_bytes(b"")
    (inputs / "notes.svs").write_text("meeting notes, not a slide\n")
    truncated_copy(CMU, inputs / "trunc.svs", 0.6)
    shutil.copyfile(blank_slide, inputs / "blank.svs")
    shutil.copyfile(PNG, inputs / PNG.name)

    slides, problems = discover([inputs], recursive=True)
    assert problems == []
    instance = DagsterInstance.ephemeral()

    def by_name(outcomes: list[SlideOutcome]) -> dict[str, SlideOutcome]:
        return {Path(o.path).resolve().relative_to(inputs.resolve()).as_posix(): o for o in outcomes}

    first = by_name(run_slides(slides, _opts(output), instance=instance))
    first_h5 = {o.slide_id: _store_facts(output, o.slide_id) for o in first.values() if o.status == "done"}

    csv = root / "mpp.csv"
    csv.write_text(f"wsi,mpp\n{PNG.name},0.5\n")
    png = [s for s in slides if s.path.endswith(".png")]
    (mpp_csv,) = run_slides(png, _opts(output, mpp_csv=str(csv)), instance=instance)

    cmu_a = [s for s in slides if Path(s.path).parent.name == "a"]
    (mag40,) = run_slides(cmu_a, _opts(output, target_mag=40), instance=instance)

    cmus = [s for s in slides if s.name == "CMU"]
    again = run_slides(cmus, _opts(output), instance=instance)
    changed = run_slides(cmus, _opts(output, min_tissue_fraction=0.2), instance=instance)
    return Runs(inputs, output, slides, first, first_h5, mpp_csv, mag40, again, changed)


def _store_facts(output: Path, slide_id: str) -> dict:
    with h5py.File(output / "20x_256px_0px_overlap" / "patches" / f"{slide_id}.h5", "r") as f:
        return {
            "coords_shape": f["coords"].shape,
            "num_patches": int(f.attrs["num_patches"]),
            "wsi_path": str(f.attrs["wsi_path"]),
            "dims": (int(f.attrs["level0_width"]), int(f.attrs["level0_height"])),
            "mask_any": bool(np.asarray(f["tissue/mask"][()]).any()),
            "min_fraction": float(f["tissue_fraction"][()].min()) if f["tissue_fraction"].shape[0] else None,
        }


def _assert_failure(o: SlideOutcome) -> None:
    assert o.status == "failed", o
    assert o.reason and "\n" not in o.reason
    assert o.slide_id in o.reason, o.reason


def test_discovery_and_distinct_ids(runs: Runs) -> None:
    names = sorted(Path(s.path).relative_to(runs.inputs).as_posix() for s in runs.slides)
    assert names == sorted(["a/CMU.svs", "b/CMU.svs", "empty.svs", "notes.svs", "trunc.svs", "blank.svs", PNG.name])
    assert set(runs.first) == set(names)
    ids = [o.slide_id for o in runs.first.values()]
    assert len(set(ids)) == len(ids)
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", sid) and ".." not in sid


def test_both_cmu_copies_done(runs: Runs) -> None:
    a, b = runs.first["a/CMU.svs"], runs.first["b/CMU.svs"]
    assert a.slide_id != b.slide_id
    ref = openslide.OpenSlide(str(CMU))
    mpp = float(ref.properties[openslide.PROPERTY_NAME_MPP_X])
    for o, folder in ((a, "a"), (b, "b")):
        assert o.status == "done", o
        assert o.num_patches and o.num_patches > 0
        assert o.mpp == pytest.approx(mpp)
        facts = runs.first_h5[o.slide_id]
        assert facts["coords_shape"] == (o.num_patches, 2)
        assert facts["num_patches"] == o.num_patches
        assert Path(facts["wsi_path"]).resolve() == (runs.inputs / folder / "CMU.svs").resolve()
        assert facts["dims"] == ref.dimensions
        assert facts["min_fraction"] >= DEFAULT_MIN_TISSUE_FRACTION  # the documented default
    # Same pixels, same recipe → same coordinates.
    assert a.num_patches == b.num_patches
    ref.close()


@pytest.mark.parametrize("name", ["empty.svs", "notes.svs", "trunc.svs"])
def test_broken_files_fail_with_one_line(runs: Runs, name: str) -> None:
    _assert_failure(runs.first[name])


def test_blank_slide_done_with_zero_patches(runs: Runs) -> None:
    o = runs.first["blank.svs"]
    assert o.status == "done", o
    assert o.num_patches == 0
    assert o.mpp == pytest.approx(0.5)
    assert o.warnings, "a slide without tissue must carry a warning"
    facts = runs.first_h5[o.slide_id]
    assert facts["coords_shape"] == (0, 2)
    assert facts["num_patches"] == 0
    assert not facts["mask_any"]


def test_png_without_mpp_fails_then_succeeds_with_csv(runs: Runs) -> None:
    o = runs.first[PNG.name]
    _assert_failure(o)
    assert "--mpp-csv" in o.reason
    ok = runs.mpp_csv
    assert ok.slide_id == o.slide_id
    assert ok.status == "done", ok
    assert ok.mpp == pytest.approx(0.5)
    assert ok.num_patches and ok.num_patches > 0
    # 1000 px at 0.5 µm/px is 20x already: at most a 3 x 3 grid of 256 px patches.
    assert ok.num_patches <= (1000 // 256) ** 2


def test_target_finer_than_native_fails(runs: Runs) -> None:
    o = runs.mag40
    _assert_failure(o)
    assert "native" in o.reason.lower()
    assert re.search(r"\b20(\.0+)?x", o.reason), o.reason


def test_rerun_skips_and_changed_recipe_recomputes(runs: Runs) -> None:
    first = {o.slide_id: o for o in runs.first.values()}
    assert len(runs.again) == 2
    for o in runs.again:
        assert o.status == "skipped", o
        assert o.num_patches == first[o.slide_id].num_patches
    for o in runs.changed:
        assert o.status == "done", o
        # A lower tissue threshold keeps a superset of the patches.
        assert o.num_patches is not None and o.num_patches >= first[o.slide_id].num_patches
        h5 = runs.output / "20x_256px_0px_overlap" / "patches" / f"{o.slide_id}.h5"
        with h5py.File(h5, "r") as f:
            assert f["tissue_fraction"][()].min() >= 0.2
            assert int(f.attrs["num_patches"]) == o.num_patches


def test_no_temporary_files_left(runs: Runs) -> None:
    bad = []
    for dirpath, dirnames, filenames in os.walk(runs.output):
        for d in dirnames:
            if d.startswith("."):
                bad.append(os.path.join(dirpath, d))
        for name in filenames:
            if name.startswith(".") and name.endswith(".lock"):
                continue
            if name.startswith(".") or not name.endswith(ALLOWED_SUFFIXES):
                bad.append(os.path.join(dirpath, name))
    assert bad == []
    assert list(runs.output.rglob("*.h5")), "the runs wrote no slide store"


def test_cli_runs_batch_consecutive_slides_and_report_each(tmp_path: Path) -> None:
    """New slides are consecutive partitions: one Dagster run covers them, each slide reported alone."""
    from atlaspatch_assets.core.discovery import SlideFile

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a.svs", "c.svs"):
        shutil.copyfile(CMU, inp / name)
    (inp / "b.svs").write_text("not a slide")
    slides = [SlideFile(str(inp / n), n[0]) for n in ("a.svs", "b.svs", "c.svs")]
    instance = DagsterInstance.ephemeral()
    seen: list[str] = []
    outs = run_slides(slides, _opts(tmp_path / "out"), instance=instance, on_progress=lambda o: seen.append(o.slide_id))
    assert [(o.slide_id, o.status) for o in outs] == [("a", "done"), ("b", "failed"), ("c", "done")]
    assert seen == ["a", "b", "c"]  # each as it finished
    assert len(instance.get_runs()) == 1 and all(o.run_id == outs[0].run_id for o in outs)
