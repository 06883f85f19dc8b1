#!/usr/bin/env python3
"""Benchmark: a backfill of N small slides through the daemon vs the same work as one library call.

The same N slides (copies of ../shared/slides/real/CMU-1-Small-Region.svs, 2220×2967 Aperio SVS,
named slide-000.svs ...) get `tissue_mask` + `patch_coords` with the assets' default recipe:

- library: the core pipeline loop in one fresh Python process (open_slide → compute_tissue_mask →
  save_tissue_mask → compute_patch_coords → save_patch_coords + the two catalog events per
  slide, exactly what the assets store). Wall time of the process, imports included.
- runner (optional, --runner): `runner.run_slides`, one in-process Dagster run per slide (what
  the CLI does).
- daemon: `dagster-webserver` + `dagster-daemon` on a fresh instance (the repository's
  dagster.yaml: queued runs, dequeue every 1 s, max_concurrent_runs 2, SQLite), the slides registered in the
  catalog and added as `slides` partitions beforehand (not timed), then ONE asset backfill of
  both assets launched through GraphQL. `BackfillPolicy.multi_run(ATLASPATCH_BACKFILL_BATCH)`
  (default 25) makes N/25 runs. Timed from the launch mutation to: the last materialization
  (all data stored) and the backfill's COMPLETED status (the backfill daemon only looks every
  30 s, so submission and completion each wait up to one of its ticks).
  Variants (--variants) set ATLASPATCH_EXECUTOR for the code location: `multiprocess` (one
  subprocess per step, i.e. per asset and per asset check, each importing the code location)
  and `in_process` (the default of `definitions.py`).

The ratio daemon / library is the number to watch (goal ≤ 1.3×); the table also shows the runs
created and, per run, its queue wait and duration. Outputs of both paths are compared (same
recipe hashes and patch counts). Timings are indicative on a shared machine.

usage (from the repository root, venv active):
  python benchmarks/bench_backfill.py                       # N=100, batch 25, both variants
  python benchmarks/bench_backfill.py --n 40 --batch 10 --variants in_process --runner
Everything goes to bench_data/backfill/ (gitignored); --keep leaves the instances there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
WORK = REPO / "bench_data" / "backfill"
BIN = Path(sys.executable).parent
GOAL_RATIO = 1.3
RESULT_PREFIX = "BENCH_RESULT "


# -- slides -------------------------------------------------------------------------------------


def make_slides(n: int) -> Path:
    d = WORK / "slides"
    d.mkdir(parents=True, exist_ok=True)
    want = {f"slide-{i:03d}.svs" for i in range(n)}
    for p in d.glob("*.svs"):
        if p.name not in want:
            p.unlink()
    for name in sorted(want):
        p = d / name
        if not p.exists() or p.stat().st_size != CMU.stat().st_size:
            shutil.copyfile(CMU, p)
    return d


def slide_ids(slides_dir: Path) -> dict[str, str]:
    from atlaspatch_assets.core.discovery import assign_ids, discover

    found, _ = discover([slides_dir])
    return {k: os.path.abspath(sf.path) for k, sf in sorted(assign_ids(found).items())}


def asset_params() -> dict[str, dict[str, Any]]:
    """The stages' default parameters (the assets' defaults are the same objects)."""
    from atlaspatch_assets.core.stages import CoordsParams, MaskParams

    return {"mask": dataclasses.asdict(MaskParams()), "coords": dataclasses.asdict(CoordsParams())}


# -- library child (fresh process) --------------------------------------------------------------


def library_child(spec_path: str) -> None:
    """The core stages called directly (no Dagster): the floor the orchestrated paths are compared to."""
    t_start = time.perf_counter()
    from atlaspatch_assets.core.catalog import Catalog
    from atlaspatch_assets.core.source import SlideRef, SlideSource
    from atlaspatch_assets.core.stages import CoordsParams, MaskParams, StageEnv, StagePlan, run_slides
    from atlaspatch_assets.core.store import RunLayout

    spec = json.loads(Path(spec_path).read_text())
    t_imported = time.perf_counter()
    layout = RunLayout.create(spec["output"], 256, None, target_mag=20.0)
    catalog = Catalog(layout.catalog_dir)
    source = SlideSource(catalog)
    plan = StagePlan(mask=MaskParams(**spec["params"]["mask"]), coords=CoordsParams(**spec["params"]["coords"]))
    for slide_id, path in spec["slides"].items():
        source.register(slide_id, path)
    run_slides([SlideRef(k, p) for k, p in spec["slides"].items()], plan, StageEnv(layout=layout, catalog=catalog))
    t_end = time.perf_counter()
    print(RESULT_PREFIX + json.dumps({"imports": t_imported - t_start, "loop": t_end - t_imported}), flush=True)


def runner_child(spec_path: str) -> None:
    t_start = time.perf_counter()
    from atlaspatch_assets.cli.runner import RunSettings, run_slides
    from atlaspatch_assets.core.discovery import SlideFile
    from atlaspatch_assets.core.stages import CoordsParams, MaskParams, StagePlan
    from atlaspatch_assets.core.store import GeometryParams

    spec = json.loads(Path(spec_path).read_text())
    t_imported = time.perf_counter()
    slides = [SlideFile(p, Path(p).stem) for p in spec["slides"].values()]
    settings = RunSettings(spec["output"], GeometryParams(256), StagePlan(mask=MaskParams(), coords=CoordsParams()))
    outcomes = run_slides(slides, settings)
    t_end = time.perf_counter()
    bad = [o.slide_id for o in outcomes if o.status != "done"]
    print(
        RESULT_PREFIX + json.dumps({"imports": t_imported - t_start, "loop": t_end - t_imported, "not_done": bad}),
        flush=True,
    )


def run_child(mode: str, slides: dict[str, str], output: Path, params: dict) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    spec = output.parent / f"{output.name}.spec.json"
    spec.write_text(json.dumps({"slides": slides, "output": str(output), "params": params}))
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}  # runner: ephemeral instance
    env["PYTHONWARNINGS"] = "ignore"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, f"--{mode}-child", str(spec)], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{mode} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX))
    return {"wall": wall, **json.loads(line[len(RESULT_PREFIX) :])}


# -- daemon + webserver -------------------------------------------------------------------------


class Stack:
    def __init__(self, root: Path, batch: int, executor: str = "in_process"):
        import psutil  # noqa: F401  (fail early if missing)

        shutil.rmtree(root, ignore_errors=True)
        self.root, self.home, self.output, self.logs = root, root / "home", root / "output", root / "logs"
        for d in (self.home, self.output, self.logs):
            d.mkdir(parents=True)
        shutil.copyfile(REPO / "dagster.yaml", self.home / "dagster.yaml")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "ATLASPATCH_OUTPUT": str(self.output),
            "ATLASPATCH_BACKFILL_BATCH": str(batch),
            "ATLASPATCH_EXECUTOR": executor,
            "PYTHONWARNINGS": "ignore",
        }
        for k in ("ATLASPATCH_INBOX", "ATLASPATCH_SLIDE_DIRS", "ATLASPATCH_SENSOR_ENCODERS"):
            self.env.pop(k, None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, Any] = {}

    def start(self) -> None:
        ws = str(REPO / "workspace.yaml")
        # the instance's storage once, before webserver + daemon would both migrate it at once
        subprocess.run(
            [str(BIN / "dagster"), "instance", "migrate"], cwd=REPO, env=self.env, check=True, capture_output=True
        )
        for name, args in (
            ("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port), "-w", ws]),
            ("daemon", [str(BIN / "dagster-daemon"), "run", "-w", ws]),
        ):
            with open(self.logs / f"{name}.log", "wb") as log:
                self.procs[name] = subprocess.Popen(
                    args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        self.wait("code location loaded", self._loaded, 300)
        self.wait("daemons healthy", self._healthy, 300)

    def wait(self, what: str, fn, timeout: float, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    sys.exit(f"{name} exited ({p.returncode}); see {self.logs / (name + '.log')}")
            self.record()
            with contextlib.suppress(Exception):
                value = fn()
                if value:
                    return value
            if time.monotonic() > deadline:
                sys.exit(f"timed out waiting for {what}; logs in {self.logs}")
            time.sleep(interval)

    def _loaded(self) -> bool:
        es = self.gql(
            "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus "
            "locationOrLoadError { __typename } } } } }"
        )["workspaceOrError"]["locationEntries"]
        return bool(es) and all(e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in es)

    def _healthy(self) -> bool:
        st = self.gql("{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }")
        ok = {d["daemonType"] for d in st["instance"]["daemonHealth"]["allDaemonStatuses"] if d["healthy"]}
        return {"BACKFILL", "QUEUED_RUN_COORDINATOR"} <= ok

    def gql(self, query: str, variables: dict | None = None) -> dict:
        import requests

        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=120)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise RuntimeError(json.dumps(body["errors"])[:2000])
        return body["data"]

    def record(self) -> None:
        from atlaspatch_assets.devtools.process_tree import record_descendants

        record_descendants(self.procs.values(), self.seen)

    def stop(self) -> None:
        """SIGTERM to each process group and every descendant seen, then SIGKILL by PID."""
        from atlaspatch_assets.devtools.process_tree import stop_process_groups

        stop_process_groups(self.procs.values(), self.seen)


def run_daemon(variant: str, slides: dict[str, str], batch: int, keep: bool) -> dict[str, Any]:
    from dagster import DagsterInstance

    from atlaspatch_assets.defs.resources import SlideSourceResource

    stack = Stack(WORK / f"daemon-{variant}", batch, executor=variant)
    try:
        t_boot = time.perf_counter()
        stack.start()
        boot = time.perf_counter() - t_boot
        # not timed: the slides are known (catalog) and are partitions, as after the inbox sensor
        source = SlideSourceResource(output_dir=str(stack.output))
        for sid, path in slides.items():
            source.register(sid, path)
        os.environ["DAGSTER_HOME"] = str(stack.home)
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("slides", list(slides))
        params: dict[str, Any] = {
            "partitionNames": list(slides),
            "assetSelection": [{"path": ["tissue_mask"]}, {"path": ["patch_coords"]}],
            "title": f"bench {len(slides)} slides",
        }
        t0_epoch, t0 = time.time(), time.perf_counter()
        res = stack.gql(
            """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
            {"p": params},
        )["launchPartitionBackfill"]
        if res["__typename"] != "LaunchBackfillSuccess":
            sys.exit(f"backfill launch failed: {res}")
        bid = res["backfillId"]
        query = """query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill {
            status endTimestamp runs { runId status creationTime startTime endTime
              tags { key value } } } } }"""

        def done():
            b = stack.gql(query, {"id": bid})["partitionBackfillOrError"]
            return b if b["status"] not in ("REQUESTED", "CANCELING", "FAILING") else None

        backfill = stack.wait("backfill completion", done, 3600, 2)
        t_seen_done = time.perf_counter() - t0
        mats = stack.gql(
            """query { assetOrError(assetKey: {path: ["patch_coords"]}) { ... on Asset {
                 assetMaterializations(limit: 10000) { partition timestamp runId } } } }"""
        )["assetOrError"]["assetMaterializations"]
        counts = {}
        for key in ("tissue_mask", "patch_coords"):
            st = stack.gql(
                """query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
                     assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions } } } } }""",
                {"k": {"path": [key]}},
            )
            counts[key] = len(st["assetNodeOrError"]["assetPartitionStatuses"]["materializedPartitions"])
        all_runs = stack.gql("{ runsOrError { ... on Runs { results { runId } } } }")["runsOrError"]["results"]
    finally:
        stack.stop()
        os.environ.pop("DAGSTER_HOME", None)
    runs = sorted(backfill["runs"], key=lambda r: r["creationTime"])
    last_mat = max(float(m["timestamp"]) / 1000 for m in mats) if mats else float("nan")
    first_created = min(r["creationTime"] for r in runs) if runs else float("nan")
    per_run = []
    for r in runs:
        tags = {t["key"]: t["value"] for t in r["tags"]}
        per_run.append(
            {
                "run": r["runId"][:8],
                "status": r["status"],
                "slides": sum(1 for m in mats if m["runId"] == r["runId"]),
                "range": "..".join(str(tags.get(f"dagster/asset_partition_range_{e}")) for e in ("start", "end")),
                "queued": (r["startTime"] or r["creationTime"]) - r["creationTime"],
                "duration": (r["endTime"] or 0) - (r["startTime"] or 0),
            }
        )
    result = {
        "variant": variant,
        "boot": boot,
        "status": backfill["status"],
        "runs": len(runs),
        "all_runs_in_instance": len(all_runs),
        "materialized": counts,
        "to_first_run": first_created - t0_epoch,
        "to_all_materialized": last_mat - t0_epoch,
        "to_completed": (backfill["endTimestamp"] - t0_epoch) if backfill["endTimestamp"] else t_seen_done,
        "per_run": per_run,
        "output": str(stack.output),
    }
    if not keep:
        shutil.rmtree(stack.home, ignore_errors=True)
    return result


# -- comparison + report ------------------------------------------------------------------------


def compare_outputs(a: Path, b: Path, slides: dict[str, str]) -> str:
    """Same recipe hashes and patch counts in both outputs (the same work was done)."""
    from atlaspatch_assets.core.store import RunLayout

    la, lb = RunLayout.create(a, 256, None, target_mag=20.0), RunLayout.create(b, 256, None, target_mag=20.0)
    diffs = []
    for sid in slides:
        xa, xb = la.store(sid).attrs(), lb.store(sid).attrs()
        for k in ("recipe_hash", "num_patches"):
            if xa.get(k) != xb.get(k):
                diffs.append(f"{sid}.{k}: {xa.get(k)} != {xb.get(k)}")
    return "identical (recipe hash, num_patches)" if not diffs else f"{len(diffs)} differences, e.g. {diffs[:3]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="slides (copies of CMU-1-Small-Region.svs)")
    ap.add_argument("--batch", type=int, default=int(os.environ.get("ATLASPATCH_BACKFILL_BATCH", "25")))
    ap.add_argument("--variants", default="multiprocess,in_process", help="ATLASPATCH_EXECUTOR values")
    ap.add_argument("--runner", action="store_true", help="also time runner.run_slides (one Dagster run per slide)")
    ap.add_argument("--keep", action="store_true", help="keep the Dagster instances under bench_data/backfill/")
    ap.add_argument("--library-child", help=argparse.SUPPRESS)
    ap.add_argument("--runner-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.library_child:
        return library_child(args.library_child)
    if args.runner_child:
        return runner_child(args.runner_child)
    if not CMU.is_file():
        sys.exit(f"missing {CMU}")

    import psutil

    slides = slide_ids(make_slides(args.n))
    params = asset_params()
    print(
        f"{len(slides)} slides ({CMU.name} copies, {CMU.stat().st_size / 1e6:.1f} MB each), batch {args.batch} "
        f"-> {math.ceil(len(slides) / args.batch)} runs expected; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        flush=True,
    )
    lib = run_child("library", slides, WORK / "out-library", params)
    print(f"library: {lib['wall']:.1f}s (imports {lib['imports']:.1f}s, loop {lib['loop']:.1f}s)", flush=True)
    runner = None
    if args.runner:
        runner = run_child("runner", slides, WORK / "out-runner", params)
        print(f"runner: {runner['wall']:.1f}s", flush=True)
    daemons = []
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        d = run_daemon(v, slides, args.batch, args.keep)
        d["same_outputs"] = compare_outputs(WORK / "out-library", Path(d["output"]), slides)
        daemons.append(d)
        print(f"daemon[{v}]: {d['to_all_materialized']:.1f}s to the last materialization, {d['runs']} runs", flush=True)

    base = lib["wall"]
    rows = [("library: core loop, 1 fresh process (imports incl.)", base, 1, "")]
    if runner:
        rows.append(("library: runner.run_slides (1 in-process run/slide)", runner["wall"], len(slides), ""))
    for d in daemons:
        v = d["variant"]
        rows.append((f"daemon [{v}]: launch -> last materialization", d["to_all_materialized"], d["runs"], "<- ratio"))
        rows.append((f"daemon [{v}]: launch -> backfill COMPLETED", d["to_completed"], d["runs"], ""))
        rows.append(
            (
                f"daemon [{v}]: first run created -> last mat.",
                d["to_all_materialized"] - d["to_first_run"],
                d["runs"],
                "",
            )
        )
    print()
    print(f"| path ({len(slides)} slides, batch {args.batch}) | wall s | × library | runs |")
    print("|---|---:|---:|---:|")
    for name, secs, nruns, note in rows:
        print(f"| {name} | {secs:.1f} | {secs / base:.2f}× {note} | {nruns} |")
    for d in daemons:
        print()
        print(
            f"daemon [{d['variant']}]: status {d['status']}, runs created {d['runs']} (instance total "
            f"{d['all_runs_in_instance']}), materialized {d['materialized']}, submission latency "
            f"{d['to_first_run']:.1f}s, stack boot {d['boot']:.1f}s (not timed); "
            f"outputs vs library: {d['same_outputs']}"
        )
        print("| run | status | slides | partition range | queued s | duration s |")
        print("|---|---|---:|---|---:|---:|")
        for r in d["per_run"]:
            cells = [r["run"], r["status"], r["slides"], r["range"], f"{r['queued']:.1f}", f"{r['duration']:.1f}"]
            print("| " + " | ".join(map(str, cells)) + " |")
        ratio = d["to_all_materialized"] / base
        verdict = "meets" if ratio <= GOAL_RATIO else "misses"
        print(f"ratio [{d['variant']}] = {ratio:.2f}× ({verdict} the goal ≤ {GOAL_RATIO}×)")


if __name__ == "__main__":
    main()
