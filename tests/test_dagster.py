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
from atlaspatch_assets.definitions import build_definitions
from atlaspatch_assets.jobs import SEGMENT_AND_COORDS
from atlaspatch_assets.resources import SlideSourceResource, StoreResource

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


@pytest.mark.parametrize("batched", [True, False])
def test_runs_isolate_broken_slides(tmp_path: Path, batched: bool) -> None:
    """One multi-partition run (backfill batch) or one run per slide: good slides are stored,
    broken ones are not, and each failure is recorded with a one-line reason."""
    out = tmp_path / "out"
    store = StoreResource(output_dir=str(out))
    source = SlideSourceResource(output_dir=str(out))
    defs = build_definitions(store=store, slide_source=source)
    instance = DagsterInstance.ephemeral()
    slides, _ = discover([SHARED / "slides" / "real" / "CMU-1-Small-Region.svs", SHARED / "slides" / "broken"])
    ids = assign_ids(slides)
    for key, sf in ids.items():
        source.register(key, sf.path)
    keys = list(ids)
    instance.add_dynamic_partitions("slides", keys)
    job = defs.resolve_job_def(SEGMENT_AND_COORDS)
    cfg = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    if batched:
        res = job.execute_in_process(
            instance=instance,
            run_config=cfg,
            raise_on_error=False,
            tags={
                "dagster/asset_partition_range_start": keys[0],
                "dagster/asset_partition_range_end": keys[-1],
            },
        )
        assert res.success  # a broken slide does not take the batch down
        checks = {
            e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
            for e in res.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        }
        assert checks == {"has_tissue": False, "has_patches": False}
    else:
        for key in keys:
            res = job.execute_in_process(instance=instance, run_config=cfg, raise_on_error=False, partition_key=key)
            assert res.success == (key == "CMU-1-Small-Region")
    layout = store.layout
    assert layout.store("CMU-1-Small-Region").attrs()["num_patches"] > 0
    broken = [k for k in keys if k != "CMU-1-Small-Region"]
    assert broken and all(not layout.store(k).exists() for k in broken)
    events = pads.dataset(str(out / "catalog" / "events"), format="parquet").to_table().to_pylist()
    failed = [e for e in events if e["status"] == "failed"]
    assert {e["slide_id"] for e in failed} == set(broken)
    assert all(e["error"] and "\n" not in e["error"] for e in failed)
    done = [e for e in events if e["status"] == "done" and e["slide_id"] == "CMU-1-Small-Region"]
    assert {e["asset"] for e in done} == {"tissue_mask", "patch_coords"}
