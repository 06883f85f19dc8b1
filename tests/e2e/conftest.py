"""End-to-end fixtures: a real `dagster-webserver` + `dagster-daemon` on 127.0.0.1 with their own
DAGSTER_HOME, inbox and output folders, and the slide the inbox sensor picked up.

One stack serves the whole session (starting it costs ~20 s). Both processes are started in
their own session (process group); teardown sends SIGTERM to each group and to every
descendant recorded while they ran (code servers, run workers), waits, then SIGKILLs by PID
what is left and checks that nothing survived. Their logs are in `<tmp>/logs/` and their tails
are printed when a wait times out.

Timeouts are generous (a loaded 2-core machine): each wait polls and fails with what it saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import requests

from atlaspatch_assets.devtools.process_tree import record_descendants, stop_process_groups

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
ARTIFACTS = REPO / "test-artifacts"
BIN = Path(sys.executable).parent  # the venv running pytest holds the dagster console scripts

SENSOR = "new_slides"
SENSOR_JOB = "segment_and_get_coords"
QUIET_SECONDS = 3
BACKFILL_BATCH = 2
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 1.0, diag=None) -> T:
    """Poll `fn` until it returns something truthy; fail with `what` (+ diagnostics) on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # e.g. server not up yet: keep polling, report the last error
            last_exc = e
        if time.monotonic() > deadline:
            extra = f"\nlast error: {type(last_exc).__name__}: {last_exc}" if last_exc else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{extra}\n{diag() if diag else ''}")
        time.sleep(interval)


@dataclass
class DagsterStack:
    """dagster-webserver + dagster-daemon on one instance; GraphQL helpers."""

    root: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant observed

    # for the test modules (they get everything through fixtures, never by importing conftest)
    cmu = CMU
    artifacts = ARTIFACTS
    sensor = SENSOR
    sensor_job = SENSOR_JOB
    backfill_batch = BACKFILL_BATCH

    @staticmethod
    def tag(run: dict[str, Any], key: str) -> str | None:
        return _tag(run, key)

    def wait_for(self, what: str, fn: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
        return wait_for(what, fn, timeout, interval, self.diagnostics)

    def __post_init__(self) -> None:
        self.home = self.root / "dagster_home"
        self.output = self.root / "output"
        self.inbox = self.root / "inbox"
        self.library = self.root / "library"  # slides found through ATLASPATCH_SLIDE_DIRS
        self.logs = self.root / "logs"
        for d in (self.home, self.output, self.inbox, self.library, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "dagster.yaml", self.home / "dagster.yaml")
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "ATLASPATCH_OUTPUT": str(self.output),
            "ATLASPATCH_INBOX": str(self.inbox),
            "ATLASPATCH_INBOX_QUIET_SECONDS": str(QUIET_SECONDS),
            "ATLASPATCH_SENSOR_INTERVAL_SECONDS": "2",
            "ATLASPATCH_BACKFILL_BATCH": str(BACKFILL_BATCH),
            # a small asset graph: one patch encoder and its mean slide embedding (the lineage
            # view of patch_coords then shows tissue_mask -> patch_coords -> features/mobilenet_v2)
            "ATLASPATCH_ENCODERS": "mobilenet_v2",
            "ATLASPATCH_SLIDE_ENCODERS": "mean_mobilenet_v2",
            "ATLASPATCH_SLIDE_DIRS": str(self.library),
            "ATLASPATCH_PATCH_STORES": "none",  # the lineage of patch_coords stays small enough to draw in detail
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore",
        }
        for k in ("ATLASPATCH_SENSOR_ENCODERS", "ATLASPATCH_INBOX_MAX_PER_TICK", "DAGSTER_CLI_API_GRPC_HOST"):
            self.env.pop(k, None)

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor

    def start(self) -> None:
        ws = str(REPO / "workspace.yaml")
        # Create the instance's storage once, before webserver and daemon start: both would run
        # the SQLite schema migrations at the same moment on a fresh home ("more than one head").
        subprocess.run(
            [str(BIN / "dagster"), "instance", "migrate"], cwd=REPO, env=self.env, check=True, capture_output=True
        )
        self._spawn(
            "webserver",
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port), "-w", ws],
        )
        self._spawn("daemon", [str(BIN / "dagster-daemon"), "run", "-w", ws])
        wait_for("the webserver to load the code location", self._location_loaded, 240, 2, self.diagnostics)
        wait_for(
            "the daemon's heartbeats (sensor, backfill, run queue)", self._daemons_healthy, 240, 2, self.diagnostics
        )

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                pytest.fail(f"{name} exited with {p.returncode}\n{self.diagnostics()}")

    def _location_loaded(self) -> bool:
        self._check_alive()
        self.record_descendants()
        data = self.gql(
            """{ workspaceOrError { __typename ... on Workspace { locationEntries {
                 name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
        )
        entries = data["workspaceOrError"]["locationEntries"]
        for e in entries:
            err = e["locationOrLoadError"] or {}
            if err.get("__typename") == "PythonError":
                pytest.fail(f"code location {e['name']} failed to load: {err['message']}")
        return bool(entries) and all(
            e["loadStatus"] == "LOADED" and (e["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
            for e in entries
        )

    def _daemons_healthy(self) -> bool:
        self._check_alive()
        self.record_descendants()
        data = self.gql("{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }")
        statuses = {d["daemonType"]: d for d in data["instance"]["daemonHealth"]["allDaemonStatuses"]}
        need = ("SENSOR", "BACKFILL", "QUEUED_RUN_COORDINATOR")
        return all(statuses.get(t, {}).get("healthy") for t in need)

    def record_descendants(self) -> None:
        record_descendants(self.procs.values(), self.seen)

    def stop(self) -> list[str]:
        """SIGTERM every group and recorded descendant, wait, SIGKILL by PID; returns survivors."""
        return stop_process_groups(self.procs.values(), self.seen)

    def diagnostics(self, lines: int = 40) -> str:
        out = []
        for name in self.procs:
            path = self.logs / f"{name}.log"
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {name} log (last {lines} lines of {path}) ---")
            out.extend(text[-lines:])
        return "\n".join(out)

    # -- GraphQL --------------------------------------------------------------------------------

    def gql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {json.dumps(body['errors'])[:2000]}")
        return body["data"]

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)

    def repository_selector(self) -> dict[str, str]:
        data = self.gql(
            """{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"""
        )
        node = data["repositoriesOrError"]["nodes"][0]
        return {"repositoryName": node["name"], "repositoryLocationName": node["location"]["name"]}

    def runs(self, limit: int = 100) -> list[dict[str, Any]]:
        data = self.gql(
            """query($limit: Int) { runsOrError(limit: $limit) { __typename ... on Runs { results {
                 runId status jobName creationTime tags { key value } } } } }""",
            {"limit": limit},
        )
        return data["runsOrError"]["results"]

    def sensor_ticks(self, limit: int = 50) -> list[dict[str, Any]]:
        data = self.gql(
            """query($sel: SensorSelector!, $limit: Int) { sensorOrError(sensorSelector: $sel) {
                 __typename ... on Sensor { sensorState { status ticks(limit: $limit) {
                   id status timestamp skipReason runIds } } } } }""",
            {"sel": {**self.repository_selector(), "sensorName": SENSOR}, "limit": limit},
        )
        sensor = data["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        return sensor["sensorState"]["ticks"]

    def sensor_status(self) -> str:
        data = self.gql(
            """query($sel: SensorSelector!) { sensorOrError(sensorSelector: $sel) {
                 ... on Sensor { sensorState { status } } } }""",
            {"sel": {**self.repository_selector(), "sensorName": SENSOR}},
        )
        return data["sensorOrError"]["sensorState"]["status"]

    def partition_statuses(self, asset: str) -> dict[str, Any]:
        data = self.gql(
            """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename ... on AssetNode {
                 partitionKeys
                 assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
                   materializedPartitions failedPartitions materializingPartitions
                   unmaterializedPartitions } } } } }""",
            {"key": {"path": asset.split("/")}},
        )
        node = data["assetNodeOrError"]
        assert node["__typename"] == "AssetNode", node
        return {"partitionKeys": node["partitionKeys"], **node["assetPartitionStatuses"]}

    def materializations(self, asset: str, partitions: list[str] | None = None) -> list[dict[str, Any]]:
        data = self.gql(
            """query($key: AssetKeyInput!, $partitions: [String!]) { assetOrError(assetKey: $key) {
                 __typename ... on Asset { assetMaterializations(partitions: $partitions, limit: 100) {
                   runId partition timestamp
                   metadataEntries { label __typename
                     ... on IntMetadataEntry { intValue }
                     ... on FloatMetadataEntry { floatValue }
                     ... on TextMetadataEntry { text }
                     ... on MarkdownMetadataEntry { mdStr }
                     ... on PathMetadataEntry { path } } } } } }""",
            {"key": {"path": asset.split("/")}, "partitions": partitions},
        )
        asset_ = data["assetOrError"]
        assert asset_["__typename"] == "Asset", asset_
        return asset_["assetMaterializations"]


@dataclass
class InboxSlide:
    """What happened when a slide was copied into the inbox in chunks (see `inbox_slide`)."""

    slide_id: str
    path: Path
    copy_started: float
    copy_finished: float
    chunks: int
    runs_during_copy: list[dict[str, Any]]
    polls_during_copy: int
    ticks_before_copy: int
    run: dict[str, Any]
    run_status: str
    seconds_to_run: float


@pytest.fixture(scope="session")
def dagster_stack(tmp_path_factory: pytest.TempPathFactory):
    if not CMU.is_file():
        pytest.fail(f"missing test slide {CMU} (../shared/slides beside the repository)")
    stack = DagsterStack(tmp_path_factory.mktemp("e2e"))
    try:
        stack.start()
        yield stack
    finally:
        survivors = stack.stop()
        # keep the process logs with the other test artifacts
        with contextlib.suppress(OSError):
            dst = ARTIFACTS / "e2e-logs"
            dst.mkdir(parents=True, exist_ok=True)
            for f in stack.logs.iterdir():
                shutil.copyfile(f, dst / f.name)
        assert not survivors, f"processes still running after SIGTERM+SIGKILL: {survivors}"


@pytest.fixture(scope="session")
def inbox_slide(dagster_stack: DagsterStack) -> InboxSlide:
    """Copy CMU-1-Small-Region.svs into the inbox in chunks while watching the runs, then wait for
    the run the sensor launches once the file is complete (quiet period + it opens)."""
    stack = dagster_stack
    assert stack.sensor_status() == "RUNNING", "new_slides should default to RUNNING when ATLASPATCH_INBOX is set"
    # the sensor must be ticking before the copy starts, or "no run during the copy" means nothing
    ticks0 = wait_for("a first new_slides tick", lambda: len(stack.sensor_ticks()), 120, 1, stack.diagnostics)

    data = CMU.read_bytes()
    dst = stack.inbox / CMU.name
    before = {r["runId"] for r in stack.runs()}  # e.g. a backfill that ran first
    chunks = 8
    size = -(-len(data) // chunks)
    runs_during: list[dict[str, Any]] = []
    polls = 0
    t0 = time.time()
    with open(dst, "wb") as fh:
        for i in range(chunks):
            fh.write(data[i * size : (i + 1) * size])
            fh.flush()
            os.fsync(fh.fileno())
            # ~1.6 s per chunk: the copy spans several sensor ticks (the daemon ticks every ~5 s)
            end = time.monotonic() + 1.6
            while time.monotonic() < end:
                runs_during.extend(r for r in stack.runs() if r["runId"] not in before)
                polls += 1
                time.sleep(0.4)
    t1 = time.time()
    # the last chunk is written: nothing may have started yet
    runs_during.extend(r for r in stack.runs() if r["runId"] not in before)
    polls += 1

    run = wait_for(
        "the run requested by new_slides for the copied slide",
        lambda: next(
            (r for r in stack.runs() if r["runId"] not in before and _tag(r, "dagster/sensor_name") == SENSOR), None
        ),
        180,
        1,
        stack.diagnostics,
    )
    client = stack.client()
    from dagster import DagsterRunStatus

    done = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    status = wait_for(
        f"run {run['runId']} to finish",
        lambda: (s := client.get_run_status(run["runId"])) in done and s,
        240,
        2,
        stack.diagnostics,
    )
    return InboxSlide(
        slide_id=_tag(run, "dagster/partition") or "",
        path=dst,
        copy_started=t0,
        copy_finished=t1,
        chunks=chunks,
        runs_during_copy=runs_during,
        polls_during_copy=polls,
        ticks_before_copy=ticks0,
        run=run,
        run_status=status.value,
        seconds_to_run=time.time() - t1,
    )


def _tag(run: dict[str, Any], key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)
