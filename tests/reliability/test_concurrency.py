"""Concurrent writers: two encoders of one slide at once, the CLI and a Dagster run on one output,
8 catalog writers with a compactor and a reader — nothing lost, nothing torn."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import h5py

from atlaspatch_assets.core.catalog import EVENTS, Catalog

from . import corpus, util

RUN = "20x_224px_0px_overlap"
ARGS = ("--patch-size", "224", "--target-mag", "20")


def _check_store(path: Path, encoders: list[str]) -> list[str]:
    """Problems of a finished store: every encoder's features, rows agreeing, feature_sets complete."""
    problems = []
    with h5py.File(path, "r") as f:
        n = int(f.attrs["num_patches"])
        for name in ("coords", "coords_ext", "tissue_fraction", *(f"features/{e}" for e in encoders)):
            if name not in f:
                problems.append(f"{path.name}: {name} lost")
            elif f[name].shape[0] != n:
                problems.append(f"{path.name}: {name} has {f[name].shape[0]} rows, num_patches {n}")
        sets = {d["name"] for d in json.loads(f.attrs.get("feature_sets", "[]"))}
        if not set(encoders) <= sets:
            problems.append(f"{path.name}: feature_sets {sorted(sets)} lost an encoder of {encoders}")
    return problems


def test_two_encoders_of_one_slide_at_once(tmp_path: Path, report: Any) -> None:
    """Two `atlaspatch process` runs on one slide and one output, started together, each with its own
    encoder: both also race on the mask and the coordinates. Both succeed and the store keeps both."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copyfile(corpus.CMU, inp / "cmu.svs")
    out = tmp_path / "out"
    encoders = ["mobilenet_v2", "efficientnet_lite0"]
    procs = [
        subprocess.Popen(
            util.cli_cmd("process", str(inp), *ARGS, "--feature-extractors", enc, "-o", str(out)),
            env=util.env(),
            cwd=util.REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for enc in encoders
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    problems = _check_store(out / RUN / "patches" / "cmu.h5", encoders)
    events = util.events(out)
    for enc in encoders:
        if not [e for e in events if e["asset"] == f"features/{enc}" and e["status"] == "done"]:
            problems.append(f"no done event for features/{enc}")
    failed = [e["error"] for e in events if e["status"] == "failed"]
    assert util.temporaries(out) == []
    report.table(
        "two encoders of one slide at once",
        ("writers", "datasets expected", "datasets lost", "failed events"),
        [(2, 3 + len(encoders), len(problems), len(failed))],
    )
    report.add("concurrency", "2 encoders of one slide: writers / rows lost", f"2 / {len(problems)}")
    assert not problems and not failed, problems + failed


def test_the_cli_and_a_dagster_run_on_one_output(tmp_path: Path, small_slide: Path, report: Any) -> None:
    """`atlaspatch process` and a Dagster `process` job over the same two slides, the same output and
    the same $DAGSTER_HOME, at once: both complete, every event each run wrote is in the catalog."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copyfile(corpus.CMU, inp / "cmu.svs")
    shutil.copyfile(small_slide, inp / "small.svs")
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    e = util.env(home)
    cli = subprocess.Popen(
        util.cli_cmd("process", str(inp), *ARGS, "--feature-extractors", "mobilenet_v2", "-o", str(out)),
        env=e,
        cwd=util.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job = subprocess.Popen(
        util.job_cmd(str(out), str(inp), "--job", "process", "--encoder", "mobilenet_v2"),
        env=e,
        cwd=util.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cli_text, job_text = cli.communicate(timeout=600)[0], job.communicate(timeout=600)[0]
    assert cli.returncode == 0, cli_text[-3000:]
    assert job.returncode == 0, job_text[-3000:]
    ids = util.slide_paths(out)
    assert sorted(ids) == ["cmu", "small"], ids  # one id per file, whoever registered it first
    problems = [p for sid in ids for p in _check_store(out / RUN / "patches" / f"{sid}.h5", ["mobilenet_v2"])]
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        order = instance.get_dynamic_partitions("slides")
    # The job runs one slide a run; the CLI one run per range of consecutive partitions, and which
    # process registers which slide first decides whether its two slides are consecutive: 1 or 2 runs.
    assert 3 <= len(runs) <= 4 and all(r.is_success for r in runs), [(r.run_id, r.status) for r in runs]
    events = util.events(out)
    assets = ("tissue_mask", "patch_coords", "features/mobilenet_v2")
    expected = {(r.run_id, k, a) for r in runs for k in _run_partitions(r, order) for a in assets}
    found = {(ev["run_id"], ev["slide_id"], ev["asset"]) for ev in events if ev["status"] in ("done", "skipped")}
    lost = expected - found
    assert util.temporaries(out) == []
    report.table(
        "the CLI and a Dagster run on one output",
        ("runs", "events expected", "events lost", "stores damaged", "failed events"),
        [(len(runs), len(expected), len(lost), len(problems), sum(ev["status"] == "failed" for ev in events))],
    )
    report.add("concurrency", "CLI + Dagster on one output: writers / rows lost", f"2 / {len(lost)}")
    assert not lost and not problems, (sorted(lost), problems)


def _run_partitions(run: Any, order: list[str]) -> list[str]:
    """The slides a run covered: its partition, or its partition range (the CLI's batches)."""
    if "dagster/partition" in run.tags:
        return [run.tags["dagster/partition"]]
    first, last = run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]
    return list(dict.fromkeys(order[order.index(first) : order.index(last) + 1]))


def _writer(root: str, writer: int, n: int, go: Any) -> None:
    cat = Catalog(root)
    go.wait(60)
    for seq in range(n):
        cat.record_event(slide_id=f"w{writer}", asset="stress", status="done", run_id=f"w{writer}", rows=seq)


def _compactor(root: str, stop: Any, out: Any) -> None:
    cat = Catalog(root)
    rounds = 0
    while not stop.is_set():
        cat.compact(EVENTS)
        rounds += 1
        time.sleep(0.05)
    out.put(rounds)


def test_8_catalog_writers_with_a_compactor_and_a_reader(tmp_path: Path, report: Any) -> None:
    """8 processes append events while another compacts and this one reads: every read is whole
    (counts never go down, no duplicate event), and in the end no row is lost."""
    root = tmp_path / "catalog"
    ctx = mp.get_context("spawn")
    go, stop, q = ctx.Event(), ctx.Event(), ctx.Queue()
    n = 150
    writers = [ctx.Process(target=_writer, args=(str(root), w, n, go)) for w in range(8)]
    comp = ctx.Process(target=_compactor, args=(str(root), stop, q))
    for p in [*writers, comp]:
        p.start()
    go.set()
    reads, torn, last = 0, 0, 0
    cat = Catalog(root)
    while any(p.is_alive() for p in writers):
        if not cat.exists():
            time.sleep(0.01)
            continue
        t = cat.read(EVENTS, columns=["event_id", "run_id", "rows"])
        reads += 1
        ids = t["event_id"].to_pylist()
        if len(set(ids)) != len(ids) or t.num_rows < last:
            torn += 1
        last = t.num_rows
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    rounds = q.get(timeout=120)
    comp.join(120)
    rows = {(r["run_id"], r["rows"]) for r in cat.read(EVENTS, columns=["run_id", "rows"]).to_pylist()}
    lost = 8 * n - len(rows & {(f"w{w}", s) for w in range(8) for s in range(n)})
    report.table(
        "8 catalog writers + compactor + reader",
        ("writers", "events written", "rows lost", "reads", "torn reads", "compactions"),
        [(8, 8 * n, lost, reads, torn, rounds)],
    )
    report.add("concurrency", "8 catalog writers: writers / rows lost (torn reads)", f"8 / {lost} ({torn})")
    assert lost == 0 and torn == 0 and reads > 0
    assert util.temporaries(root) == []


def _open_instance(home: str, out: Any) -> None:
    import os

    os.environ["DAGSTER_HOME"] = home
    try:
        from atlaspatch_assets.defs.instance import open_instance

        with open_instance() as instance:
            instance.add_dynamic_partitions("slides", [f"s{os.getpid()}"])
        out.put("ok")
    except Exception as exc:  # reported, so the assertion names what broke
        out.put(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def test_processes_starting_on_a_fresh_instance_at_once(tmp_path: Path, report: Any) -> None:
    """4 processes (CLI runs, a script) open one fresh $DAGSTER_HOME at the same moment: the SQLite
    schema is created once and every process works (unserialized, alembic's version row races)."""
    ctx = mp.get_context("spawn")
    results = []
    for trial in range(2):
        home = tmp_path / f"home{trial}"
        home.mkdir()
        shutil.copyfile(util.REPO / "dagster.yaml", home / "dagster.yaml")
        q = ctx.Queue()
        procs = [ctx.Process(target=_open_instance, args=(str(home), q)) for _ in range(4)]
        for p in procs:
            p.start()
        results += [q.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(60)
        from dagster import DagsterInstance

        with DagsterInstance.from_config(str(home)) as instance:
            assert len(instance.get_dynamic_partitions("slides")) == 4
    failed = [r for r in results if r != "ok"]
    report.add("concurrency", "processes opening a fresh instance / failed", f"{len(results)} / {len(failed)}")
    assert not failed, failed
