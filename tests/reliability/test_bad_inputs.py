"""Bad inputs, through the CLI and through a Dagster batch run: every broken, truncated, garbled,
mislabelled or unreadable file fails alone (or succeeds with 0 patches where that is right), with
its one-line reason in the summary, the Dagster event log and the catalog; the good slide next to
them is done. Runs as an unprivileged user when the tests run as root (a mode-000 file is then
really unreadable)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import h5py
import pytest

from atlaspatch_assets.core.discovery import discover

from . import corpus, util

RUN = "20x_224px_0px_overlap"
ENCODER = "mobilenet_v2"
OK, FAILED = ("done", "skipped"), "failed"


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("corpus")
    folder = work / "corpus"
    entries = corpus.build(folder)
    if not util.can_drop_privileges():  # root without setpriv: a mode-000 file stays readable
        (folder / corpus.UNREADABLE).unlink()
        entries = [e for e in entries if e.name != corpus.UNREADABLE]
    return work, folder, entries


def _check_store(out: Path, sid: str, entry: corpus.Entry, problems: list[str]) -> int | None:
    """A done slide: its store opens, coords/features rows agree; returns the patch count."""
    h5 = out / RUN / "patches" / f"{sid}.h5"
    try:
        with h5py.File(h5, "r") as f:
            n = int(f.attrs["num_patches"])
            rows = {name: f[name].shape[0] for name in ("coords", "coords_ext", "tissue_fraction")}
            feats = f[f"features/{ENCODER}"].shape[0] if f"features/{ENCODER}" in f else None
    except Exception as e:
        problems.append(f"{entry.name}: done but its store does not open: {type(e).__name__}: {e}")
        return None
    if set(rows.values()) != {n} or feats != n:
        problems.append(f"{entry.name}: rows disagree: num_patches={n} {rows} features={feats}")
    if entry.expect == "empty" and n != 0:
        problems.append(f"{entry.name}: expected 0 patches, got {n}")
    if entry.expect == "done" and n == 0:
        problems.append(f"{entry.name}: expected patches, got 0")
    return n


def _judge(
    entries: list[corpus.Entry],
    folder: Path,
    out: Path,
    status_of: dict[str, str],
    reason_in_log: Any,
    where: str,
) -> tuple[list[tuple[str, ...]], list[str]]:
    """Per entry: the outcome it got and whether that is clean. `status_of`: slide id → status;
    `reason_in_log(sid, reason)` says whether the run's own log (summary / event log) shows the reason."""
    ids = {os.path.realpath(p): sid for sid, p in util.slide_paths(out).items()}
    events = util.events(out)
    rows, problems = [], []
    for e in entries:
        path = os.path.realpath(folder / e.name)
        sid = ids.get(path)
        before = len(problems)
        if e.expect == "skip":
            if sid is not None:
                problems.append(f"{e.name}: not a slide, but it was registered as {sid}")
            rows.append((e.name, e.kind, "not a slide (ignored)", "ok" if len(problems) == before else "NO"))
            continue
        if sid is None:
            problems.append(f"{e.name}: never registered as a slide ({where})")
            rows.append((e.name, e.kind, "missing", "NO"))
            continue
        status = status_of.get(sid, "no outcome")
        mine = [ev for ev in events if ev["slide_id"] == sid]
        failed = [ev for ev in mine if ev["status"] == FAILED]
        got = status
        if status == FAILED:
            if e.expect in ("done", "empty"):
                problems.append(f"{e.name}: expected to succeed, failed")
            if not failed:
                problems.append(f"{e.name}: failed without a failed catalog event")
            for ev in failed[:1]:
                reason = ev["error"] or ""
                if not reason.startswith(f"{sid}: [") or "\n" in reason:
                    problems.append(f"{e.name}: catalog reason is not one line naming the slide: {reason!r}")
                if not reason_in_log(sid, reason):
                    problems.append(f"{e.name}: reason not in the {where} log: {reason!r}")
                got = f"failed {reason.removeprefix(sid + ': ')[:48]}"
            done_assets = {ev["asset"] for ev in mine if ev["status"] == "done"}
            failed_assets = {ev["asset"] for ev in failed}
            if done_assets & failed_assets:
                problems.append(f"{e.name}: both done and failed: {sorted(done_assets & failed_assets)}")
        elif status in OK:
            if e.expect == "fail":
                problems.append(f"{e.name}: expected to fail, got {status}")
            if failed:
                problems.append(f"{e.name}: {status} but the catalog has failures: {failed[0]['error']}")
            n = _check_store(out, sid, e, problems)
            got = f"{status}, {n} patches"
        else:
            problems.append(f"{e.name}: no clean outcome ({status})")
        rows.append((e.name, e.kind, got, "ok" if len(problems) == before else "NO"))
    return rows, problems


def _summary_statuses(stderr: str, ids: dict[str, str]) -> dict[str, str]:
    """slide id → status from the CLI summary table (ids may be shortened there: match on the row)."""
    out: dict[str, str] = {}
    for line in stderr.splitlines():
        m = re.match(r"^\s*(\S+)\s+(done|skipped|failed|interrupted|not started)\b", line)
        if not m:
            continue
        shown = m.group(1)
        head, _, tail = shown.partition("…")
        for sid in ids:
            if sid == shown or (tail and sid.startswith(head) and sid.endswith(tail)):
                out[sid] = m.group(2)
    return out


def test_bad_inputs_through_the_cli(bad_corpus: Any, report: Any) -> None:
    """`atlaspatch process` over the whole corpus folder (-v: the ignored folder is named). Its runs
    use an ephemeral instance: the event log of the same stages is checked by the Dagster test."""
    work, folder, entries = bad_corpus
    out = work / "cli-out"
    args = ["process", str(folder), "--patch-size", "224", "--target-mag", "20", "--feature-extractors", ENCODER]
    proc = util.run(util.unprivileged(util.cli_cmd(*args, "-o", str(out), "-v")), util.env(COLUMNS="100"))
    assert proc.returncode == 1, proc.stderr[-3000:]  # some slides failed; no crash, no usage error
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ids = util.slide_paths(out)
    statuses = _summary_statuses(proc.stderr, ids)
    failed_lines = [line for line in proc.stderr.splitlines() if line.startswith("FAILED ")]

    def in_summary(sid: str, reason: str) -> bool:
        return any(line == f"FAILED {ids[sid]}: {reason}" for line in failed_lines)

    rows, problems = _judge(entries, folder, out, statuses, in_summary, "CLI summary")
    # every registered slide has exactly one summary row; the totals line counts them all
    assert set(statuses) == set(ids), f"summary rows {sorted(statuses)} vs slides {sorted(ids)}"
    n_failed = sum(1 for s in statuses.values() if s == FAILED)
    assert f"{n_failed} failed" in proc.stderr
    assert len(failed_lines) == n_failed  # each failure once
    assert f"ignored {folder / 'folder.svs'}: folder not searched" in proc.stderr  # -v says why
    assert util.temporaries(out) == []
    report.table("bad inputs through the CLI", ("input", "kind", "outcome", "clean"), rows)
    clean = sum(1 for r in rows if r[-1] == "ok")
    report.add("bad inputs (CLI)", "inputs tried / handled cleanly", f"{len(rows)} / {clean}")
    assert not problems, "\n".join(problems)


def _partition_status(home: Path, asset: str, keys: list[str]) -> tuple[set[str], set[str]]:
    """(materialized, failed) partitions of an asset as the UI computes them."""
    from dagster import AssetKey, DagsterInstance, DynamicPartitionsDefinition
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    pdef = DynamicPartitionsDefinition(name="slides")
    with DagsterInstance.from_config(str(home)) as instance:
        value = get_and_update_asset_status_cache_value(instance, AssetKey(asset.split("/")), pdef)
        assert value is not None
        return (
            set(value.deserialize_materialized_partition_subsets(pdef).get_partition_keys()),
            set(value.deserialize_failed_partition_subsets(pdef).get_partition_keys()),
        )


def test_bad_inputs_through_dagster(bad_corpus: Any, report: Any) -> None:
    """One batched run (a backfill batch) over the whole corpus: the UI shows the clean slides
    Materialized and every failed one Failed, each with its reason logged; plus a folder named .svs
    registered by hand as a slide, in a run of its own."""
    work, folder, entries = bad_corpus
    out, home = work / "dg-out", work / "dg-home"
    home.mkdir()
    e = util.env(home)
    args = [str(out), str(folder), "--job", "process", "--encoder", ENCODER, "--batched", "--progress"]
    proc = util.run(util.unprivileged(util.job_cmd(*args)), e)
    raw = util.run(util.unprivileged(util.job_cmd(str(out), str(folder / "folder.svs"), "--raw")), e)
    assert "Traceback" not in proc.stderr + raw.stderr, (proc.stderr + raw.stderr)[-3000:]
    runs = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RUN ")]
    assert len(runs) == 1 and not runs[0]["success"], proc.stdout[-2000:] + proc.stderr[-2000:]
    statuses: dict[str, str] = {}
    per_asset: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():  # what the step reported for each partition
        if line.startswith("OUTCOMES "):
            _, sid, js = line.split(" ", 2)
            got = [s for _, s in json.loads(js)]
            statuses[sid] = FAILED if FAILED in got else ("skipped" if set(got) == {"skipped"} else "done")
            for asset, status in json.loads(js):
                per_asset.setdefault(asset, {})[sid] = status
    ids = util.slide_paths(out)
    records = util.dagster_records(home, runs[0]["run_id"])
    messages = [r.event_log_entry.user_message or "" for r in records]
    failure = [
        r.event_log_entry.dagster_event
        for r in records
        if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.is_step_failure
    ]

    def in_event_log(sid: str, reason: str) -> bool:
        core = reason.split("] ", 1)[-1][:60]
        return any(m.startswith("FAILED ") and sid in m and core in m for m in messages)

    rows, problems = _judge([x for x in entries if x.expect != "skip"], folder, out, statuses, in_event_log, "Dagster")
    assert len(failure) == 1  # the step fails once, after storing every good slide
    assert set(statuses) == {k for k in ids if k != "folder"}  # every partition reported once
    keys = set(statuses)
    for asset in ("tissue_mask", "patch_coords", f"features/{ENCODER}"):
        good = {k for k, s in per_asset[asset].items() if s != FAILED}
        materialized, failed = _partition_status(home, asset, list(keys))
        if (materialized & keys, failed & keys) != (good, keys - good):
            problems.append(
                f"{asset}: UI shows materialized {sorted(materialized & keys)} failed {sorted(failed & keys)}, "
                f"the step reported {sorted(good)} good"
            )
    # the folder named .svs, registered by hand: its run fails alone with the reason
    raw_runs = [json.loads(line[4:]) for line in raw.stdout.splitlines() if line.startswith("RUN ")]
    assert len(raw_runs) == 1 and not raw_runs[0]["success"], raw.stdout + raw.stderr[-2000:]
    folder_events = [ev for ev in util.events(out) if ev["slide_id"] == "folder" and ev["status"] == FAILED]
    assert folder_events and folder_events[0]["error"].startswith("folder: [open]"), folder_events
    raw_messages = [r.event_log_entry.user_message or "" for r in util.dagster_records(home, raw_runs[0]["run_id"])]
    assert any(folder_events[0]["error"].split("] ", 1)[1][:40] in m for m in raw_messages)
    why = folder_events[0]["error"].removeprefix("folder: ")
    rows.append(("folder.svs (registered by hand)", "directory as a slide", f"failed {why}"[:60], "ok"))
    assert util.temporaries(out) == []
    report.table("bad inputs through Dagster (one batched run)", ("input", "kind", "outcome", "clean"), rows)
    clean = sum(1 for r in rows if r[-1] == "ok")
    report.add("bad inputs (Dagster)", "inputs tried / handled cleanly", f"{len(rows)} / {clean}")
    assert not problems, "\n".join(problems)


def test_a_folder_named_like_a_slide_is_passed_over_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "x.svs").mkdir()
    shutil.copyfile(corpus.REAL / "small-16px.svs", tmp_path / "real.svs")
    found = discover([tmp_path])
    assert [Path(s.path).name for s in found.slides] == ["real.svs"]
    assert any(Path(i.path).name == "x.svs" and "folder" in i.reason for i in found.ignored)
