"""End-to-end with the real processes: `dagster-webserver` + `dagster-daemon` (see conftest).

1. A slide copied into the inbox in chunks is taken only once complete: no run exists while the
   copy is in progress (runs polled through GraphQL, the sensor ticking meanwhile), then one run
   materializes the slide; GraphQL shows the partition and its materializations, the catalog
   records the inbox events and both stages with that run's id.
2. A backfill over several slides, launched through GraphQL, runs in batches of
   ATLASPATCH_stack.backfill_batch slides (multi_run backfill policy): fewer runs than partitions.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from datetime import datetime, timezone

import pytest
from dagster import DagsterRunStatus

from atlaspatch_assets.core.catalog import EVENTS, SLIDES, Catalog

ASSETS = ("tissue_mask", "patch_coords")
PREVIEW_PREFIX = "![preview](data:image/png;base64,"
pytestmark = pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")  # gql, via the client


def _meta(materialization: dict, label: str):
    for e in materialization["metadataEntries"]:
        if e["label"] == label:
            return next((v for k, v in e.items() if k not in ("label", "__typename")), None)
    return None


def _catalog_rows(stack, table: str) -> list[dict]:
    return Catalog(stack.output / "catalog").read(table).sort_by("time").to_pylist()


def _ts(dt: datetime) -> float:
    return dt.replace(tzinfo=dt.tzinfo or timezone.utc).timestamp()


def test_inbox_slide_runs_only_once_copied(dagster_stack, inbox_slide) -> None:
    stack, s = dagster_stack, inbox_slide

    # -- the sensor did not fire while the file was being written --------------------------------
    assert s.polls_during_copy >= s.chunks, "runs were not polled during the copy"
    assert s.runs_during_copy == [], f"runs created while the slide was still being copied: {s.runs_during_copy}"
    ticks = stack.sensor_ticks(limit=200)
    during = [t for t in ticks if s.copy_started <= t["timestamp"] <= s.copy_finished]
    assert during, "no new_slides tick happened during the copy: the check above would mean nothing"
    assert all(not t["runIds"] for t in during), during
    assert all("no new complete slide" in (t["skipReason"] or "") for t in during), during
    requesting = [t for t in ticks if s.run["runId"] in t["runIds"]]
    assert len(requesting) == 1 and requesting[0]["timestamp"] >= s.copy_finished, requesting
    assert s.run["creationTime"] >= s.copy_finished

    # -- one run, from the sensor, for this slide -------------------------------------------------
    assert s.slide_id == "CMU-1-Small-Region"
    assert s.run["jobName"] == stack.sensor_job
    assert stack.tag(s.run, "dagster/sensor_name") == stack.sensor and stack.tag(s.run, "atlaspatch/source") == "inbox"
    assert s.run_status == DagsterRunStatus.SUCCESS.value, stack.diagnostics()
    assert stack.client().get_run_status(s.run["runId"]) == DagsterRunStatus.SUCCESS
    sensor_runs = [r for r in stack.runs() if stack.tag(r, "dagster/sensor_name") == stack.sensor]
    assert [r["runId"] for r in sensor_runs] == [s.run["runId"]], "the slide must be run exactly once"

    # -- GraphQL: partition + materializations ----------------------------------------------------
    for asset in ASSETS:
        st = stack.partition_statuses(asset)
        assert s.slide_id in st["partitionKeys"], st
        assert s.slide_id in st["materializedPartitions"], st
        mats = stack.materializations(asset, [s.slide_id])
        assert [m["runId"] for m in mats] == [s.run["runId"]], mats
        assert mats[0]["partition"] == s.slide_id
    coords = stack.materializations("patch_coords", [s.slide_id])[0]
    assert _meta(coords, "num_patches") > 0
    assert 0 < _meta(coords, "mean_tissue_fraction") <= 1
    assert str(_meta(coords, "preview")).startswith(PREVIEW_PREFIX)
    mask = stack.materializations("tissue_mask", [s.slide_id])[0]
    assert 0 < _meta(mask, "tissue_fraction") <= 1

    # -- catalog: the slide, the inbox's view of the copy, both stages with the run id ------------
    slides = [r for r in _catalog_rows(stack, SLIDES) if r["slide_id"] == s.slide_id]
    assert slides and slides[-1]["path"] == str(s.path) and slides[-1]["size"] == stack.cmu.stat().st_size
    events = _catalog_rows(stack, EVENTS)
    inbox = [e for e in events if e["asset"] == "inbox" and str(s.path) in (e["parameters"] or "")]
    kinds = [(_ts(e["time"]), e["parameters"]) for e in inbox]
    early = [p for t, p in kinds if t <= s.copy_finished]
    assert early and all('"event": "taken"' not in p for p in early), kinds  # seen mid-copy, not taken
    taken = [t for t, p in kinds if '"event": "taken"' in p]
    assert len(taken) == 1 and taken[0] >= s.copy_finished, kinds
    for asset in ASSETS:
        rows = [e for e in events if e["slide_id"] == s.slide_id and e["asset"] == asset]
        assert [(r["status"], r["run_id"]) for r in rows] == [("done", s.run["runId"])], rows
    coords_row = next(e for e in events if e["slide_id"] == s.slide_id and e["asset"] == "patch_coords")
    assert coords_row["rows"] == _meta(coords, "num_patches")
    assert coords_row["output_path"].endswith(f"{s.slide_id}.h5")


def test_backfill_runs_in_batches(dagster_stack) -> None:
    stack = dagster_stack
    keys = ["a", "b", "c", "d"]
    for k in keys:  # found through ATLASPATCH_SLIDE_DIRS when a run first opens the partition
        shutil.copyfile(stack.cmu, stack.library / f"{k}.svs")
    repo = stack.repository_selector()
    for k in keys:
        res = stack.gql(
            """mutation($repo: RepositorySelector!, $key: String!) { addDynamicPartition(
                 repositorySelector: $repo, partitionsDefName: "slides", partitionKey: $key) {
                 __typename ... on PythonError { message } } }""",
            {"repo": repo, "key": k},
        )["addDynamicPartition"]
        assert res["__typename"] == "AddDynamicPartitionSuccess", res
    assert set(keys) <= set(stack.partition_statuses("patch_coords")["partitionKeys"])

    t0 = time.monotonic()
    res = stack.gql(
        """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename
             ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
             ... on InvalidSubsetError { message } ... on PartitionKeysNotFoundError { message } } }""",
        {
            "p": {
                "partitionNames": keys,
                "assetSelection": [{"path": [a]} for a in ASSETS],
                "title": "e2e batched backfill",
            }
        },
    )["launchPartitionBackfill"]
    assert res["__typename"] == "LaunchBackfillSuccess", res
    backfill_id = res["backfillId"]

    query = """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
        ... on PartitionBackfill { status numPartitions isAssetBackfill partitionNames
          runs { runId status tags { key value } } } ... on PythonError { message } } }"""

    def finished():
        b = stack.gql(query, {"id": backfill_id})["partitionBackfillOrError"]
        assert b["__typename"] == "PartitionBackfill", b
        return b if b["status"] not in ("REQUESTED", "CANCELING", "FAILING") else None

    # the backfill daemon ticks every 30 s: submission and completion each wait for a tick
    backfill = stack.wait_for(f"backfill {backfill_id} to complete", finished, 420, 3)
    seconds = time.monotonic() - t0
    assert backfill["status"] in ("COMPLETED_SUCCESS", "COMPLETED"), (backfill, stack.diagnostics())
    assert backfill["isAssetBackfill"] and backfill["numPartitions"] == len(keys)
    assert sorted(backfill["partitionNames"]) == keys

    runs = backfill["runs"]
    expected_runs = math.ceil(len(keys) / stack.backfill_batch)
    assert len(runs) == expected_runs < len(keys), f"{len(runs)} runs for {len(keys)} partitions: {runs}"
    assert all(r["status"] == "SUCCESS" for r in runs), runs
    assert all(stack.tag(r, "dagster/backfill") == backfill_id for r in runs)
    run_ids = {r["runId"] for r in runs}

    # each run materialized a batch of stack.backfill_batch slides, for both assets
    for asset in ASSETS:
        st = stack.partition_statuses(asset)
        assert set(keys) <= set(st["materializedPartitions"]), st
        mats = stack.materializations(asset, keys)
        by_run = Counter(m["runId"] for m in mats)
        assert set(by_run) == run_ids and sorted(by_run.values()) == [stack.backfill_batch] * expected_runs, by_run
        assert sorted(m["partition"] for m in mats) == keys

    # the catalog agrees: each slide's stages were done by one of the batch runs, 2 slides per run
    events = [e for e in _catalog_rows(stack, EVENTS) if e["slide_id"] in keys and e["asset"] in ASSETS]
    assert {(e["slide_id"], e["asset"]) for e in events} == {(k, a) for k in keys for a in ASSETS}
    assert all(e["status"] == "done" for e in events), events
    per_run = Counter(e["run_id"] for e in events if e["asset"] == "patch_coords")
    assert set(per_run) == run_ids and set(per_run.values()) == {stack.backfill_batch}, per_run
    paths = {r["slide_id"]: r["path"] for r in _catalog_rows(stack, SLIDES)}
    assert all(paths[k] == str(stack.library / f"{k}.svs") for k in keys)
    print(f"backfill of {len(keys)} slides: {len(runs)} runs, {seconds:.0f}s from launch to COMPLETED")


@pytest.fixture(autouse=True)
def _still_running(dagster_stack):
    yield
    for name, p in dagster_stack.procs.items():
        assert p.poll() is None, f"{name} died during the test\n{dagster_stack.diagnostics()}"
