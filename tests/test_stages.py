"""The core stages without Dagster: each outcome kind (done, skipped, failed deterministic, failed
transient), the catalog event written only after the data, and upstream failures carried downstream."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
from conftest import CMU, PNG

from atlaspatch_assets.core.catalog import EVENTS, Catalog
from atlaspatch_assets.core.source import SlideHandle, SlideRef
from atlaspatch_assets.core.stages import (
    DONE,
    FAILED,
    SKIPPED,
    CoordsParams,
    MaskParams,
    StageEnv,
    StagePlan,
    run_slide,
)
from atlaspatch_assets.core.stages.coords import patch_coords
from atlaspatch_assets.core.stages.mask import tissue_mask
from atlaspatch_assets.core.store import RunLayout

PLAN = StagePlan(mask=MaskParams(), coords=CoordsParams())


def _env(out: Path) -> StageEnv:
    return StageEnv(layout=RunLayout.create(out, 256, target_mag=20), catalog=Catalog(out / "catalog"), run_id="t")


def _events(out: Path) -> list[dict]:
    return Catalog(out / "catalog").read(EVENTS).to_pylist()


def test_done_then_skipped_then_force(tmp_path: Path) -> None:
    env = _env(tmp_path)
    ref = SlideRef("cmu", str(CMU))
    first = run_slide(ref, PLAN, env)
    assert [(o.asset, o.status) for o in first] == [("tissue_mask", DONE), ("patch_coords", DONE)]
    store = env.layout.store("cmu")
    assert store.num_patches() == first[1].rows > 0
    for o in first:  # the recorded recipe is the stored one: the event describes data on disk
        assert store.recipe_hash_of(o.asset) == o.recipe_hash
    again = run_slide(ref, PLAN, env)
    assert [o.status for o in again] == [SKIPPED, SKIPPED]
    assert [o.recipe_hash for o in again] == [o.recipe_hash for o in first]
    forced = run_slide(
        ref, StagePlan(mask=MaskParams(skip_existing=False), coords=CoordsParams(skip_existing=False)), env
    )
    assert [o.status for o in forced] == [DONE, DONE]
    statuses = [(e["asset"], e["status"]) for e in _events(tmp_path)]
    assert statuses.count(("tissue_mask", "done")) == 2 and statuses.count(("patch_coords", "skipped")) == 1


def test_changed_parameter_recomputes_only_what_it_changes(tmp_path: Path) -> None:
    env = _env(tmp_path)
    ref = SlideRef("cmu", str(CMU))
    run_slide(ref, PLAN, env)
    changed = run_slide(ref, StagePlan(mask=MaskParams(), coords=CoordsParams(min_tissue_fraction=0.9)), env)
    assert [o.status for o in changed] == [SKIPPED, DONE]
    assert min(env.layout.store("cmu").tissue_fraction()) >= 0.9


def test_deterministic_failure_is_one_line_with_the_root_cause_and_stops_downstream(tmp_path: Path) -> None:
    env = _env(tmp_path)
    outs = run_slide(SlideRef("png", str(PNG)), PLAN, env)  # no MPP in a PNG
    mask, coords = outs
    assert mask.status == FAILED and not mask.transient
    assert "no MPP" in mask.reason and "\n" not in mask.reason and mask.reason.startswith("png: [tissue_mask]")
    assert "mpp_csv" in mask.reason  # a hint naming the parameter (rendered per place: flag or field)
    assert coords.status == FAILED and "not run: tissue_mask failed: " in coords.reason and "no MPP" in coords.reason
    assert not env.layout.store("png").exists()
    events = _events(tmp_path)
    assert [(e["asset"], e["status"]) for e in events] == [("tissue_mask", "failed")]  # nothing attempted downstream


def test_missing_upstream_names_the_upstream_failure(tmp_path: Path) -> None:
    """A stage run alone on a slide whose upstream failed earlier says why, not just "missing"."""
    env = _env(tmp_path)
    run_slide(SlideRef("png", str(PNG)), StagePlan(mask=MaskParams()), env)
    (coords,) = run_slide(SlideRef("png", str(PNG)), StagePlan(coords=CoordsParams()), env)
    assert coords.status == FAILED
    assert "no tissue mask stored: tissue_mask failed: [tissue_mask] no MPP" in coords.reason


def _hold_lock(path: str, ready: mp.Event, release: mp.Event) -> None:
    from atlaspatch_assets.core.store.h5 import H5SlideStore

    with H5SlideStore(path).lock():
        ready.set()
        release.wait(60)


def test_transient_failure_at_save_time_is_retryable_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer holds the slide's lock past the timeout: the save fails as *transient* (retried
    in place, then reported retryable), no store and no "done" event; once free, the stage completes."""
    monkeypatch.setenv("ATLASPATCH_LOCK_TIMEOUT", "0.2")
    monkeypatch.setenv("ATLASPATCH_IO_RETRIES", "1")
    monkeypatch.setenv("ATLASPATCH_IO_RETRY_DELAY", "0.05")
    env = _env(tmp_path)
    slide = tmp_path / "cmu.svs"
    shutil.copyfile(CMU, slide)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(env.layout.store("cmu").path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with SlideHandle(SlideRef("cmu", str(slide))) as h:
            out = tissue_mask(h, MaskParams(), env)
        assert out.status == FAILED and out.transient, out
        assert "Timeout" in out.reason or "lock" in out.reason.lower()
        assert not env.layout.store("cmu").exists()
        assert not list(env.layout.patches_dir.glob(".*.tmp-*"))
        assert [e["status"] for e in _events(tmp_path)] == ["failed"]
    finally:
        release.set()
        holder.join(30)
    with SlideHandle(SlideRef("cmu", str(slide))) as h:
        assert tissue_mask(h, MaskParams(), env).status == DONE
        assert patch_coords(h, CoordsParams(), env).status == DONE


def test_patch_quality_flags_are_stored_recorded_and_removed_with_their_recipe(tmp_path: Path) -> None:
    """--patch-quality stores ink_fraction/focus beside tissue_fraction (same rows); the recipe
    changes only when it is on; coordinates made without it drop the old flags."""
    env = _env(tmp_path)
    ref = SlideRef("cmu", str(CMU))
    plain = run_slide(ref, PLAN, env)[1]
    flagged = run_slide(ref, StagePlan(mask=MaskParams(), coords=CoordsParams(patch_quality=True)), env)[1]
    assert flagged.status == DONE and flagged.recipe_hash != plain.recipe_hash
    store = env.layout.store("cmu")
    ink, _ = store.read("ink_fraction")
    focus, fattrs = store.read("focus")
    n = store.num_patches()
    assert ink.shape == focus.shape == (n,) == store.tissue_fraction().shape
    assert ink.min() >= 0 and ink.max() <= 1 and focus.min() > 0 and "Laplacian" in fattrs["definition"]
    assert flagged.rows == plain.rows  # flags only: nothing dropped
    strict = CoordsParams(remove_artifacts=True, min_focus=float(sorted(focus)[n // 2]))  # drop the blurrier half
    dropped = run_slide(ref, StagePlan(mask=MaskParams(), coords=strict), env)[1]
    assert dropped.rows < n and store.attrs()["quality_removed_focus"] == n - dropped.rows
    assert store.read("focus")[0].min() >= strict.min_focus
    again = run_slide(ref, PLAN, env)[1]
    assert again.recipe_hash == plain.recipe_hash and not store.has("focus") and not store.has("ink_fraction")


def test_a_deterministic_save_error_fails_its_slide_once_and_the_batch_goes_on(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.layout.patches_dir.mkdir(parents=True)
    (env.layout.patches_dir / "blocked.h5").mkdir()  # the store's name is taken by a folder
    slides = [SlideRef("blocked", str(CMU)), SlideRef("cmu", str(CMU))]
    from atlaspatch_assets.core.stages import run_slides

    out = run_slides(slides, PLAN, env)
    mask = out["blocked"][0]
    assert mask.status == FAILED and not mask.transient and "IsADirectoryError" in mask.reason
    assert [o.status for o in out["cmu"]] == [DONE, DONE]
    assert [e["status"] for e in _events(tmp_path) if e["slide_id"] == "blocked"] == ["failed"]  # tried once
