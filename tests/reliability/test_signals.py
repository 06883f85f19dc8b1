"""SIGTERM / SIGINT (Slurm, `timeout`, `docker stop`, Ctrl-C) while features are being extracted:
the CLI exits 128+signum promptly naming the interrupted slide, leaves no temporary and no "done"
event for the interrupted stage, and a re-run completes it; inside Dagster the signalled step fails
the run and is not retried."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import h5py
import pytest

from . import util

ENCODER = "mobilenet_v2"
RUN = "20x_224px_0px_overlap"
FEATURES = f"features/{ENCODER}"
ARGS = ("--patch-size", "224", "--target-mag", "20", "--feature-extractors", ENCODER, "--feature-batch-size", "16")


def _mid_features(child: util.Child, pattern: str) -> tuple[int, int]:
    """Wait until at least one batch is encoded and more remain; (done, total)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = child.wait_for(pattern)
        last = [tuple(map(int, g)) for g in re.findall(pattern, child.plain)][-1]
        if 0 < last[0] < last[1]:
            return last
        if last[0] >= last[1] > 0:
            pytest.fail(f"features finished before the signal could land: {m.group(0)}")
        time.sleep(0.05)
    raise AssertionError("features never started")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_stops_cleanly_on_a_signal(
    tmp_path: Path, mid_slide: Path, small_slide: Path, signum: int, report: Any
) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copyfile(small_slide, inp / "a-first.svs")  # done before the signal
    shutil.copyfile(mid_slide, inp / "b-mid.svs")  # interrupted mid-features
    shutil.copyfile(small_slide, inp / "c-last.svs")  # never started
    out = tmp_path / "out"
    e = util.env(tmp_path / "home", FORCE_COLOR="1", COLUMNS="160")
    (tmp_path / "home").mkdir()
    child = util.Child(util.cli_cmd("process", str(inp), *ARGS, "-o", str(out)), e)
    done, total = _mid_features(child, r"patches\D+(\d+)/(\d+)[^\n]*?b-mid features")
    t0 = time.monotonic()
    child.proc.send_signal(signum)
    rc = child.finish(timeout=120)
    stop_s = time.monotonic() - t0
    text = child.plain
    assert rc == 128 + signum, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = text.splitlines()
    assert any(line.startswith(f"INTERRUPTED {inp / 'b-mid.svs'}: ") for line in lines), text[-2000:]
    assert any(line.split()[:2] == ["a-first", "done"] for line in lines), text[-2000:]
    assert any(line.split()[:3] == ["c-last", "not", "started"] for line in lines), text[-2000:]
    assert "1 done, 0 skipped, 0 failed, 1 interrupted, 1 not started" in text
    assert util.temporaries(out) == [], "a temporary survived the interrupted run"
    events = util.events(out)
    mid_done = {ev["asset"] for ev in events if ev["slide_id"] == "b-mid" and ev["status"] == "done"}
    assert FEATURES not in mid_done  # nothing of the interrupted stage recorded done
    assert {"tissue_mask", "patch_coords"} <= mid_done  # the stages finished before it are kept
    store = out / RUN / "patches" / "b-mid.h5"
    with h5py.File(store, "r") as f:  # the store opens; the interrupted dataset is absent, not torn
        assert FEATURES not in f and f["coords"].shape[0] == int(f.attrs["num_patches"]) == total
    assert not (out / RUN / "patches" / "c-last.h5").exists()
    rerun = "not re-run"
    if signum == signal.SIGTERM:  # a re-run completes what was interrupted (and reuses the rest)
        again = util.run(util.cli_cmd("process", str(inp), *ARGS, "-o", str(out)), util.env(tmp_path / "home"))
        assert again.returncode == 0, again.stderr[-3000:]
        with h5py.File(store, "r") as f:
            assert f[FEATURES].shape[0] == total
        later = util.events(out)[len(events) :]
        assert ("b-mid", FEATURES, "done") in {(ev["slide_id"], ev["asset"], ev["status"]) for ev in later}
        assert ("a-first", FEATURES, "skipped") in {(ev["slide_id"], ev["asset"], ev["status"]) for ev in later}
        assert util.temporaries(out) == []
        rerun = "re-run completed"
    name = signal.Signals(signum).name
    report.table(
        f"CLI {name}",
        ("signal at", "exit", "stopped after", "temporaries", "features done events", "re-run"),
        [(f"patch {done}/{total}", rc, f"{stop_s:.1f}s", 0, 0, rerun)],
    )
    report.add("signals", f"CLI {name} mid-features: exit / clean stop", f"{rc} / yes ({stop_s:.1f}s)")


def test_dagster_step_stops_on_sigterm_and_is_not_retried(tmp_path: Path, mid_slide: Path, report: Any) -> None:
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    cmd = util.job_cmd(str(out), str(mid_slide), "--job", "process", "--encoder", ENCODER, "--progress")
    child = util.Child(cmd, util.env(home))
    done, total = _mid_features(child, r"PROGRESS mid features (\d+) (\d+)")
    child.proc.send_signal(signal.SIGTERM)
    rc = child.finish(timeout=120)
    text = child.plain
    assert "Traceback" not in text, text[-3000:]
    runs = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("RUN ")]
    assert len(runs) == 1 and not runs[0]["success"], text[-3000:]
    from dagster import DagsterInstance, DagsterRunStatus

    with DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(runs[0]["run_id"])
        assert run is not None and run.status == DagsterRunStatus.FAILURE
        types = [
            r.event_log_entry.dagster_event.event_type_value
            for r in instance.get_records_for_run(run.run_id, limit=100_000).records
            if r.event_log_entry.dagster_event
        ]
        messages = [
            r.event_log_entry.user_message or ""
            for r in instance.get_records_for_run(run.run_id, limit=100_000).records
        ]
        assert len(instance.get_runs()) == 1  # no run retried it either
    assert types.count("STEP_START") == 1 and types.count("STEP_FAILURE") == 1, types
    assert "STEP_UP_FOR_RETRY" not in types and "STEP_RESTARTED" not in types, types
    assert any("stopped by signal 15" in m and "mid" in m for m in messages), messages[-10:]
    events = util.events(out)
    assert (FEATURES, "done") not in {(ev["asset"], ev["status"]) for ev in events}
    assert util.temporaries(out) == []
    with h5py.File(out / RUN / "patches" / "mid.h5", "r") as f:
        assert FEATURES not in f and f["coords"].shape[0] == total
    report.table(
        "Dagster SIGTERM",
        ("signal at", "exit", "run status", "step starts", "retries", "features done events"),
        [(f"patch {done}/{total}", rc, run.status.value, types.count("STEP_START"), 0, 0)],
    )
    report.add("signals", "Dagster SIGTERM mid-features: run failed, not retried", "yes")
