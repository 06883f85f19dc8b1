"""The per-slide stages as Slurm jobs through Dagster Pipes, on a real (local) Slurm: stored
outputs, metadata sent from inside the jobs, per-slide failures, a job interrupted mid-way and
retried, a terminated run that cancels its job, a partition that does not exist, storage the
nodes do not see."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.dataset as pads
from conftest import BROKEN, CMU
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from test_dagster import _partition_status

from atlaspatch_assets.core.store.files import TMP_MARK
from atlaspatch_assets.defs.definitions import build_definitions
from atlaspatch_assets.defs.jobs import ENCODE_SLIDE, PROCESS
from atlaspatch_assets.defs.resources import SlideSourceResource, StoreResource
from atlaspatch_assets.defs.slurm import SlurmResource

from .conftest import REPO, Cluster

QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
FEATURES = "features/mobilenet_v2"


def copies(folder: Path, names: list[str]) -> dict[str, str]:
    """Slide id → path of a copy of the CMU slide (one file per id, in one folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        shutil.copyfile(CMU, folder / f"{n}.svs")
        out[n] = str(folder / f"{n}.svs")
    return out


def build(out: Path, slides: dict[str, str], slurm: dict[str, Any], patch_size: int = 256, **kw: Any):
    store = StoreResource(output_dir=str(out), patch_size=patch_size)
    source = SlideSourceResource(output_dir=str(out))
    defs = build_definitions(
        store=store,
        slide_source=source,
        encoders=kw.pop("encoders", ["mobilenet_v2"]),
        slide_encoders=kw.pop("slide_encoders", []),
        slurm=SlurmResource(**slurm),
    )
    for k, v in slides.items():
        source.register(k, v)
    return defs, store


def run(defs: Any, instance: DagsterInstance, keys: list[str], job: str = PROCESS):
    instance.add_dynamic_partitions("slides", keys)
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, run_config=QUIET, raise_on_error=False, tags=tags
    )


def records(instance: DagsterInstance, run_id: str, kind: DagsterEventType) -> list[Any]:
    return [
        r.event_log_entry
        for r in instance.get_records_for_run(run_id, limit=100000).records
        if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.event_type == kind
    ]


def materializations(instance: DagsterInstance, run_id: str) -> dict[tuple[str, str], Any]:
    """(asset, partition) → the materialization (the last one, when a retry made another)."""
    out = {}
    for e in records(instance, run_id, DagsterEventType.ASSET_MATERIALIZATION):
        m = e.dagster_event.step_materialization_data.materialization
        out[(m.asset_key.to_user_string(), m.partition)] = m
    return out


def messages(instance: DagsterInstance, run_id: str) -> list[str]:
    return [r.event_log_entry.user_message for r in instance.get_records_for_run(run_id, limit=100000).records]


def md(m: Any, key: str) -> Any:
    v = m.metadata.get(key)
    return getattr(v, "value", v)


def catalog_events(out: Path) -> list[dict]:
    return pads.dataset(str(out / "catalog" / "events"), format="parquet").to_table().to_pylist()


def assert_no_temp_files(out: Path) -> None:
    """Every store was written whole: no temporary file of an interrupted write is left."""
    leftovers = [p for p in out.rglob("*") if TMP_MARK in p.name or p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_batch_runs_in_one_job_and_reports_each_slide(tmp_path: Path, slurm_cluster: Cluster, slurm_options):
    """Every stage on Slurm (from tissue_mask), 2 good slides and a broken one in one batch: one job,
    the good slides Materialized with metadata and data versions sent from inside the job, the
    broken one Failed with its own reason, the stores and catalog events written by the job."""
    slides = {**copies(tmp_path / "slides", ["cmu-a", "cmu-b"]), "broken": str(BROKEN / "not-an-image.svs")}
    out = tmp_path / "out"
    defs, store = build(out, slides, {**slurm_options, "from_stage": "tissue_mask"})
    instance = DagsterInstance.ephemeral()
    res = run(defs, instance, list(slides))
    assert not res.success  # the broken slide fails the batch, after the good ones are stored
    good = {"cmu-a", "cmu-b"}
    for asset in ("tissue_mask", "patch_coords", FEATURES):
        assert _partition_status(instance, defs, asset) == (good, {"broken"})
    failure = records(instance, res.run_id, DagsterEventType.STEP_FAILURE)
    assert len(failure) == 1  # a deterministic slide failure is not retried
    error = failure[0].dagster_event.step_failure_data.error.message
    assert "broken: [open] cannot open slide" in error and "cmu-" not in error
    mats = materializations(instance, res.run_id)
    jobs = {md(m, "slurm_job_id") for m in mats.values()}
    assert len(jobs) == 1 and jobs != {""}  # one job for the batch, its id as the job saw it ($SLURM_JOB_ID)
    for sid in good:
        layout = store.layout
        with h5py.File(layout.store(sid).path, "r") as f:
            feats = f["features/mobilenet_v2"][()]
            n = f["coords"].shape[0]
        assert feats.shape == (n, 1280) and n > 0 and np.isfinite(feats).all()
        m = mats[(FEATURES, sid)]
        assert md(m, "slurm_node") == "localhost" and md(m, "status") == "done"
        assert m.tags["dagster/data_version"] == layout.store(sid).recipe_hash_of(FEATURES)
        assert md(mats[("tissue_mask", sid)], "slurm_node") == "localhost"  # segmented inside the job too
    events = catalog_events(out)
    done = {(e["slide_id"], e["asset"]) for e in events if e["status"] == "done"}
    assert done == {(s, a) for s in good for a in ("tissue_mask", "patch_coords", FEATURES)}
    assert {e["run_id"] for e in events} == {res.run_id}  # recorded by the job, with the run's id from Pipes
    assert {e["slide_id"] for e in events if e["status"] == "failed"} == {"broken"}
    logs = messages(instance, res.run_id)
    assert any("[pipes] external process successfully opened" in m for m in logs)
    assert any(m.startswith("job ") and "on localhost: 3 slides" in m for m in logs)  # pipes.log from the job
    assert any("FAILED broken: [open]" in m for m in logs)  # the stage's own log line, from inside the job
    assert not slurm_cluster.queued()
    assert not list((out / ".slurm").glob("*/try*"))  # a job that completed leaves no work files


def test_features_and_slide_embeddings_on_slurm_segmentation_local(
    tmp_path: Path, slurm_cluster: Cluster, slurm_options
):
    """The default split: mask and coordinates in the Dagster process, then features and slide
    embeddings in one job; each slide reported once, with one outcome per asset."""
    slides = copies(tmp_path / "slides", ["s1", "s2"])
    out = tmp_path / "out"
    defs, store = build(out, slides, slurm_options, slide_encoders=["mean_mobilenet_v2"])
    instance = DagsterInstance.ephemeral()
    res = run(defs, instance, list(slides), job=ENCODE_SLIDE)
    assert res.success
    mats = materializations(instance, res.run_id)
    slide_asset = "slide_features/mean_mobilenet_v2"
    assert set(mats) == {(a, s) for s in slides for a in ("tissue_mask", "patch_coords", FEATURES, slide_asset)}
    for s in slides:
        assert md(mats[("tissue_mask", s)], "slurm_job_id") is None  # here, not in the job
        assert md(mats[(FEATURES, s)], "slurm_node") == "localhost"
        assert md(mats[(slide_asset, s)], "slurm_job_id") == md(mats[(FEATURES, s)], "slurm_job_id")
        with h5py.File(store.layout.store(s).path, "r") as f:
            np.testing.assert_allclose(
                f["slide_features/mean_mobilenet_v2"][()], f["features/mobilenet_v2"][()].mean(0), rtol=1e-5
            )
    checks = records(instance, res.run_id, DagsterEventType.ASSET_CHECK_EVALUATION)
    rows_checks = [c.dagster_event.asset_check_evaluation_data for c in checks]
    assert {(c.check_name, c.partition, c.passed) for c in rows_checks if c.check_name.startswith("rows")} == {
        ("rows_match_patches_and_finite", s, True) for s in slides
    }


def _wait(what: str, fn: Any, timeout: float = 180.0, every: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def running_jobs(cluster: Cluster) -> list[str]:
    """Ids of the running slide jobs (not the storage probe)."""
    return [q.split()[0] for q in cluster.queued() if " RUNNING " in q and not q.endswith("-probe")]


def _has_features(store: StoreResource, sid: str) -> bool:
    p = store.layout.store(sid).path
    if not p.exists():
        return False
    try:
        with h5py.File(p, "r") as f:
            return "features/mobilenet_v2" in f
    except OSError:
        return False


def test_job_interrupted_midway_reports_unfinished_slides_and_is_retried(
    tmp_path: Path, slurm_cluster: Cluster, slurm_options
):
    """SIGTERM to the job (as pre-emption or `scancel` send it) after its first slide: the second
    slide is reported failed-retryable, the store holds no half-written data, the step's retry
    policy submits a second job, which skips the stored slide and finishes the other."""
    slides = copies(tmp_path / "slides", ["first", "second"])
    out = tmp_path / "out"
    # 128 px patches: ~150 patches a slide, so the signal lands while the second slide is running
    defs, store = build(out, slides, slurm_options, patch_size=128)
    instance = DagsterInstance.ephemeral()
    signalled: dict[str, str] = {}

    def interrupt() -> None:
        first = list(slides)[0]
        _wait("the first slide's features", lambda: _has_features(store, first), timeout=300)
        job = _wait("the running job", lambda: running_jobs(slurm_cluster))[0]
        signalled["job"] = job
        slurm_cluster.run("scancel", "--batch", "--signal=TERM", job)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    res = run(defs, instance, list(slides))
    t.join(timeout=10)
    assert res.success, [e.step_failure_data.error.message for e in res.all_events if e.is_step_failure]
    assert records(instance, res.run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    logs = messages(instance, res.run_id)
    assert any("interrupted by Slurm (SIGTERM" in m and "1 slides left for the retry" in m for m in logs)
    first, second = slides
    seen: dict[str, list[tuple[str, str]]] = {}  # slide → (job, status) of each features materialization
    for e in records(instance, res.run_id, DagsterEventType.ASSET_MATERIALIZATION):
        m = e.dagster_event.step_materialization_data.materialization
        if m.asset_key.to_user_string() == FEATURES:
            seen.setdefault(m.partition, []).append((md(m, "slurm_job_id"), md(m, "status")))
    retry_job = seen[second][0][0]
    assert retry_job != signalled["job"]
    assert seen == {first: [(signalled["job"], "done"), (retry_job, "skipped")], second: [(retry_job, "done")]}
    assert_no_temp_files(out)
    for sid in slides:
        with h5py.File(store.layout.store(sid).path, "r") as f:
            assert f["features/mobilenet_v2"].shape[0] == f["coords"].shape[0] > 100
    killed = next(j for j in slurm_cluster.jobs() if j["JobId"] == signalled["job"])
    assert killed["JobState"] == "FAILED" and killed["ExitCode"] == "143:0"  # 128 + SIGTERM, reported first
    assert not slurm_cluster.queued()


RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from dagster import DagsterInstance
    from slurm.test_slurm_jobs import build, run
    spec = json.loads(sys.argv[1])
    defs, _ = build(__import__("pathlib").Path(spec["out"]), spec["slides"], spec["slurm"], patch_size=128)
    with DagsterInstance.get() as instance:
        res = run(defs, instance, list(spec["slides"]))
        print("RUN", res.run_id, res.success, flush=True)
    """
)


def test_terminating_the_run_cancels_its_job(tmp_path: Path, slurm_cluster: Cluster, slurm_options):
    """SIGINT to the process running the Dagster step (what terminating a run sends): the step
    `scancel`s its job and waits until it has left the queue; the run ends CANCELED, nothing is
    half-written and no job is left behind."""
    slides = copies(tmp_path / "slides", ["c1", "c2"])
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    spec = json.dumps({"out": str(out), "slides": slides, "slurm": slurm_options})
    code = RUNNER.format(tests=str(REPO / "tests"), repo=str(REPO))
    env = {**slurm_cluster.env, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", code, spec], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        job = _wait("the running job", lambda: running_jobs(slurm_cluster))[0]
        time.sleep(2.0)  # inside the job now: Python started, Pipes opened
        t0 = time.monotonic()
        with DagsterInstance.from_config(str(home)) as instance:  # what DefaultRunLauncher.terminate does
            instance.report_run_canceling(instance.get_run_records()[0].dagster_run)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        stop_seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not slurm_cluster.queued(), slurm_cluster.queued()
    state = next(j for j in slurm_cluster.jobs() if j["JobId"] == job)["JobState"]
    assert state == "CANCELLED"
    assert stop_seconds < 60
    with DagsterInstance.from_config(str(home)) as instance:
        (run_record,) = instance.get_run_records()
        assert run_record.dagster_run.status == DagsterRunStatus.CANCELED
        logs = messages(instance, run_record.dagster_run.run_id)
    assert any(f"Slurm job {job}: cancelling (scancel)" in m for m in logs), stderr.decode()[-3000:]
    assert any(f"Slurm job {job}: gone" in m for m in logs)
    assert_no_temp_files(out)


def test_a_partition_that_does_not_exist_fails_each_slide_with_slurms_words(
    tmp_path: Path, slurm_cluster: Cluster, slurm_options
):
    slides = copies(tmp_path / "slides", ["p1", "p2"])
    out = tmp_path / "out"
    defs, _ = build(out, slides, {**slurm_options, "partition": "no-such-partition"})
    instance = DagsterInstance.ephemeral()
    res = run(defs, instance, list(slides))
    assert not res.success
    (failure,) = records(instance, res.run_id, DagsterEventType.STEP_FAILURE)  # not retried: it would fail again
    error = failure.dagster_event.step_failure_data.error.message
    assert "invalid partition specified: no-such-partition" in error and "p1" in error and "p2" in error
    assert _partition_status(instance, defs, FEATURES) == (set(), set(slides))
    assert _partition_status(instance, defs, "patch_coords")[0] == set(slides)  # the local stages worked
    assert not slurm_cluster.queued()


def test_storage_the_nodes_do_not_see_fails_before_submitting(tmp_path: Path, slurm_cluster: Cluster, slurm_options):
    """The probe job: a slide folder the nodes do not see (hidden by a setup line, as an unmounted
    share would be) or a Python the nodes do not have fails the batch with a clear message, and
    no job for the slides is submitted; a good check is recorded and not repeated."""
    slides = copies(tmp_path / "slides", ["v1"])
    out = tmp_path / "out"
    folder = tmp_path / "slides"
    hide = [f"mv {folder} {folder}.hidden"]
    defs, _ = build(out, slides, {**slurm_options, "setup": hide})
    instance = DagsterInstance.ephemeral()
    try:
        res = run(defs, instance, list(slides))
    finally:
        if (tmp_path / "slides.hidden").exists():
            (tmp_path / "slides.hidden").rename(folder)
    assert not res.success
    error = records(instance, res.run_id, DagsterEventType.STEP_FAILURE)[0].dagster_event.step_failure_data.error
    assert "shared storage: the nodes of the default partition (probed on localhost) do not see" in error.message
    assert f"{folder} (not found)" in error.message
    names = [j["JobName"] for j in slurm_cluster.jobs()]
    run_jobs = [n for n in names if n == f"atlaspatch-{res.run_id[:8]}"]
    assert not run_jobs  # nothing submitted for the slides

    defs, _ = build(out, slides, {**slurm_options, "python": "/nonexistent/python3"})
    res = run(defs, DagsterInstance.ephemeral(), list(slides))
    (failure,) = [e for e in res.all_events if e.is_step_failure]
    text = failure.step_failure_data.error.message
    assert "wrote no reply" in text and "/nonexistent/python3" in text

    before = len(slurm_cluster.jobs())
    defs, _ = build(out, slides, slurm_options)
    instance = DagsterInstance.ephemeral()
    assert run(defs, instance, list(slides)).success
    defs, _ = build(out, slides, slurm_options)
    assert run(defs, DagsterInstance.ephemeral(), list(slides)).success
    new = slurm_cluster.jobs()[before:]
    assert [j["JobName"] for j in new].count("atlaspatch-probe") == 1  # recorded after the first good check
    assert not slurm_cluster.queued()


def test_a_job_whose_dagster_step_died_stops_by_itself(tmp_path: Path, slurm_cluster: Cluster, slurm_options):
    """The run process is SIGKILLed (it cannot scancel): the job sees its heartbeat file stop
    changing for `orphan_timeout` seconds and stops as on SIGTERM — no job is left running."""
    slides = copies(tmp_path / "slides", ["o1", "o2"])
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    spec = json.dumps({"out": str(out), "slides": slides, "slurm": {**slurm_options, "orphan_timeout": 4}})
    code = RUNNER.format(tests=str(REPO / "tests"), repo=str(REPO))
    env = {**slurm_cluster.env, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", code, spec], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        job = _wait("the running job", lambda: running_jobs(slurm_cluster))[0]
        time.sleep(2.0)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    t0 = time.monotonic()
    _wait("the orphaned job to stop", lambda: not any(q.split()[0] == job for q in slurm_cluster.queued()), 90)
    assert time.monotonic() - t0 < 60
    state = next(j for j in slurm_cluster.jobs() if j["JobId"] == job)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "143:0")
    (log,) = out.glob(".slurm/*/try0-*/job.log")
    assert "the Dagster step stopped watching this job" in log.read_text()
    assert_no_temp_files(out)
