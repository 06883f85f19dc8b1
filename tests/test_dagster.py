"""The Dagster layer: definitions load/validate, batched multi-slide runs, checks, catalog events."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from dagster import AssetKey, DagsterInstance

from atlaspatch_assets.core.discovery import assign_ids, discover
from atlaspatch_assets.defs.definitions import build_definitions
from atlaspatch_assets.defs.jobs import SEGMENT_AND_COORDS
from atlaspatch_assets.defs.resources import SlideSourceResource, StoreResource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def test_definitions_validate(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "passed validation" in proc.stdout + proc.stderr


def test_instance_configs_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dagster.yaml (embedded default) loads as documented; the Postgres template passes the schema."""
    import shutil

    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 2
        assert concurrency.pool_config.default_pool_limit == 1
        limits = concurrency.run_queue_config.tag_concurrency_limits
        assert [(t["key"], t["limit"]) for t in limits] == [("atlaspatch/gpu", 1)]  # model runs: one per GPU
        assert instance.run_monitoring_enabled and not instance.telemetry_enabled
        assert str(instance.root_directory) == str(home)  # SQLite storage under $DAGSTER_HOME
    pg = tmp_path / "pg"
    pg.mkdir()
    shutil.copy(REPO / "resources" / "deploy" / "dagster.postgres.yaml", pg / "dagster.yaml")
    config, _ = dagster_instance_config(str(pg))
    assert "postgres" in config["storage"] and config["concurrency"]["runs"]["max_concurrent_runs"] >= 1


def test_asset_graph_shape() -> None:
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey("patch_coords")).parent_keys == {AssetKey("tissue_mask")}
    assert graph.get(AssetKey("tissue_mask")).partitions_def.name == "slides"
    job = defs.resolve_job_def(SEGMENT_AND_COORDS)
    assert job.partitions_def is not None


def _partition_status(instance: DagsterInstance, defs: object, asset: str) -> tuple[set[str], set[str]]:
    """(materialized, failed) partitions of an asset as the UI computes them."""
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    key = AssetKey(asset.split("/"))
    pdef = defs.resolve_asset_graph().get(key).partitions_def  # type: ignore[attr-defined]
    value = get_and_update_asset_status_cache_value(instance, key, pdef)
    return (
        set(value.deserialize_materialized_partition_subsets(pdef).get_partition_keys()),
        set(value.deserialize_failed_partition_subsets(pdef).get_partition_keys()),
    )


@pytest.mark.parametrize("batched", [True, False])
def test_runs_report_each_slide_truthfully(tmp_path: Path, batched: bool) -> None:
    """One multi-partition run (a backfill batch) or one run per slide over 3 slides, one broken:
    the UI shows exactly the 2 good slides Materialized and the broken one Failed for each slide
    asset, each check has one result per partition, and the catalog has no "done" without a store."""
    out = tmp_path / "out"
    store = StoreResource(output_dir=str(out))
    source = SlideSourceResource(output_dir=str(out))
    defs = build_definitions(store=store, slide_source=source, encoders=[], slide_encoders=[])
    instance = DagsterInstance.ephemeral()
    real = SHARED / "slides" / "real"
    slides, _ = discover(
        [
            real / "CMU-1-Small-Region.svs",
            SHARED / "slides" / "broken" / "not-an-image.svs",
            real / "ndpi-dapi-fluorescence.ndpi",
        ]
    )
    ids = assign_ids(slides)
    for key, sf in ids.items():
        source.register(key, sf.path)
    keys = list(ids)
    good = {"CMU-1-Small-Region", "ndpi-dapi-fluorescence"}
    assert set(keys) == good | {"not-an-image"}
    instance.add_dynamic_partitions("slides", keys)
    job = defs.resolve_job_def(SEGMENT_AND_COORDS)
    cfg = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    results = []
    if batched:
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        results.append(job.execute_in_process(instance=instance, run_config=cfg, raise_on_error=False, tags=tags))
        assert not results[0].success  # the batch ends failed, after storing every good slide
    else:
        for key in keys:
            res = job.execute_in_process(instance=instance, run_config=cfg, raise_on_error=False, partition_key=key)
            assert res.success == (key in good)
            results.append(res)
    for asset in ("tissue_mask", "patch_coords"):
        assert _partition_status(instance, defs, asset) == (good, {"not-an-image"})
    evaluations = [  # through the instance: what the UI reads
        rec.event_log_entry.dagster_event.asset_check_evaluation_data
        for r in results
        for rec in instance.get_records_for_run(r.run_id).records
        if rec.event_log_entry.dagster_event
        and rec.event_log_entry.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    by_check: dict[str, list] = {}
    for ev in evaluations:
        by_check.setdefault(ev.check_name, []).append(ev)
    for name in ("has_tissue", "has_patches"):
        assert sorted(ev.partition for ev in by_check[name]) == sorted(keys)  # one result per partition
        assert {ev.partition for ev in by_check[name] if not ev.passed} == {"not-an-image"}
    failures = [e for r in results for e in r.all_events if e.is_step_failure]
    assert failures and all("not-an-image" in e.step_failure_data.error.message for e in failures)
    layout = store.layout
    assert all(layout.store(k).num_patches() for k in good)
    assert not layout.store("not-an-image").exists()
    events = pads.dataset(str(out / "catalog" / "events"), format="parquet").to_table().to_pylist()
    failed = [e for e in events if e["status"] == "failed"]
    assert {e["slide_id"] for e in failed} == {"not-an-image"}
    assert all(e["error"] and "\n" not in e["error"] for e in failed)
    done = [e for e in events if e["status"] == "done"]
    assert {(e["slide_id"], e["asset"]) for e in done} == {
        (k, a) for k in good for a in ("tissue_mask", "patch_coords")
    }
    for e in done:  # no "done" without the data on disk
        assert layout.store(e["slide_id"]).recipe_hash_of(e["asset"]) == e["recipe_hash"]
