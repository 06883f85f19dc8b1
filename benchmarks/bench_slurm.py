#!/usr/bin/env python3
"""Benchmark: a batched backfill through Slurm jobs (Dagster Pipes) vs the same backfill in process.

N copies of ../shared/slides/real/CMU-1-Small-Region.svs (2220×2967 Aperio SVS, 32 patches of
256 px at 20x) get tissue_mask → patch_coords → features/mobilenet_v2. The backfill is split as
`BackfillPolicy.multi_run(B)` splits it: N/B runs of B partitions (a partition range each), run
by `--runs-at-once` run-worker processes at a time (the instance's max_concurrent_runs), each
with `execute_in_process` on its own instance:

- local: the assets in the run process (SlurmResource not configured), OMP_NUM_THREADS=1 like a
  1-CPU job, so both paths get the same thread budget on the shared cores.
- slurm: the same runs with the SlurmResource (defaults: mask and coordinates in the run process,
  features in one Slurm job per run); the local test cluster (start_local_slurm.sh, this
  machine's cores as one node, 1 CPU per job) runs the jobs.

Per job, from the run's event log: submit → RUNNING (queue + start), RUNNING → Pipes opened (the
job's Python: imports), opened → first slide reported (model load + first slide), last slide →
step saw the job end; then the time from a stop request to a clean stop: the Dagster run
terminated (report_run_canceling + SIGINT, as DefaultRunLauncher.terminate does) until the
run process exited and the job left the queue, and `scancel` / SIGTERM to the batch process
(pre-emption) until the job left the queue.

On one machine the "cluster" shares the cores with Dagster: the wall-time comparison shows the
cost of going through Slurm, not the speed-up of a real cluster.

usage (repository root, venv active, as root: it starts its own cluster on free ports):
  python benchmarks/bench_slurm.py                 # N=20, batch 5, 2 runs at once
  python benchmarks/bench_slurm.py --n 10 --batch 5 --skip-stop
Everything goes to a temporary folder (removed unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO.parent / "shared" / "tools"
CMU = REPO.parent / "shared" / "slides" / "real" / "CMU-1-Small-Region.svs"
RESULT = "BENCH_RESULT "

# One run worker: builds the definitions, registers the slides, runs one partition range, then
# reads its own event log for the Slurm timings.
WORKER = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
t0 = time.time()
from dagster import DagsterEventType, DagsterInstance
from atlaspatch_assets.defs.definitions import build_definitions
from atlaspatch_assets.defs.jobs import PROCESS
from atlaspatch_assets.defs.resources import SlideSourceResource, StoreResource
from atlaspatch_assets.defs.slurm import SlurmResource
store = StoreResource(output_dir=spec["out"])
source = SlideSourceResource(output_dir=spec["out"])
slurm = SlurmResource(**spec["slurm"]) if spec["slurm"] else None
defs = build_definitions(store=store, slide_source=source, encoders=["mobilenet_v2"], slide_encoders=[], slurm=slurm)
for k, v in spec["slides"].items():
    source.register(k, v)
keys = list(spec["slides"])
MARKS = [("submit", "submitted:"), ("running", ": RUNNING"), ("opened", "[pipes] external process"), ("done", "after")]
with DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("slides", keys)
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    cfg = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    job = defs.resolve_job_def(PROCESS)
    res = job.execute_in_process(instance=instance, run_config=cfg, raise_on_error=False, tags=tags)
    marks, slides = {}, []
    for r in instance.get_records_for_run(res.run_id, limit=100000).records:
        e, m = r.event_log_entry, r.event_log_entry.user_message
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = e.dagster_event.step_materialization_data.materialization
            if mat.asset_key.path[0] == "features":
                slides.append(e.timestamp)
        for key, text in MARKS:
            if text in m and m.startswith(("Slurm job", "[pipes]")) and key not in marks:
                marks[key] = e.timestamp
    result = {"ok": res.success, "seconds": time.time() - t0, "marks": marks, "slides": sorted(slides)}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, base: Path):
        ctld, slurmd = free_ports(2)
        self.env = {
            **os.environ,
            "LOCAL_SLURM_DIR": str(base / "cluster"),
            "LOCAL_SLURM_CLUSTER": f"bench{os.getpid()}",
            "LOCAL_SLURM_CTLD_PORT": str(ctld),
            "LOCAL_SLURM_SLURMD_PORT": str(slurmd),
            "LOCAL_SLURM_MEM_MB": "8192",
        }
        self.conf = str(base / "cluster" / "etc" / "slurm.conf")

    def start(self) -> None:
        p = subprocess.run(["bash", str(TOOLS / "start_local_slurm.sh")], env=self.env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"start_local_slurm.sh failed:\n{p.stderr[-4000:]}")
        self.env["SLURM_CONF"] = self.conf

    def stop(self) -> None:
        subprocess.run(["bash", str(TOOLS / "stop_local_slurm.sh"), "--purge"], env=self.env, capture_output=True)

    def queued(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], env=self.env, capture_output=True, text=True).stdout
        return [ln for ln in out.splitlines() if ln.strip()]


def slurm_fields(cluster: Cluster) -> dict[str, Any]:
    return {
        "enabled": True,
        "slurm_conf": cluster.conf,
        "python": sys.executable,
        "env": {"PYTHONPATH": str(REPO)},  # OMP_NUM_THREADS = cpus_per_task (1), set by the job script
        "cpus_per_task": 1,
        "mem": "3G",
        "poll_seconds": 0.5,
    }


def make_slides(folder: Path, n: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = folder / f"slide-{i:03d}.svs"
        shutil.copyfile(CMU, p)
        out[p.stem] = str(p)
    return out


def run_worker(work: Path, name: str, out: Path, slides: dict[str, str], slurm: dict | None, env: dict) -> dict:
    home = work / "homes" / name
    home.mkdir(parents=True)
    spec = json.dumps({"out": str(out), "slides": slides, "slurm": slurm})
    p = subprocess.run(
        [sys.executable, "-c", WORKER, spec],
        env={**env, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)), None)
    if line is None:
        raise SystemExit(f"run {name} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[len(RESULT) :])


def backfill(work: Path, label: str, slides: dict[str, str], batch: int, at_once: int, slurm: dict | None, env: dict):
    keys = list(slides)
    batches = [dict((k, slides[k]) for k in keys[i : i + batch]) for i in range(0, len(keys), batch)]
    out = work / f"out-{label}"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        runs = list(
            pool.map(lambda ib: run_worker(work, f"{label}-{ib[0]}", out, ib[1], slurm, env), enumerate(batches))
        )
    return time.perf_counter() - t0, runs


def stop_times(work: Path, cluster: Cluster, slides: dict[str, str]) -> dict[str, float]:
    """Seconds from a stop request to a clean stop, three ways."""
    out: dict[str, float] = {}
    two = dict(list(slides.items())[:2])
    fields = slurm_fields(cluster)

    def running_job() -> str:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            jobs = [q.split()[0] for q in cluster.queued() if " RUNNING " in q and not q.endswith("-probe")]
            if jobs:
                return jobs[0]
            time.sleep(0.1)
        raise SystemExit("no job started")

    def gone(job: str, t0: float) -> float:
        while any(q.split()[0] == job for q in cluster.queued()):
            time.sleep(0.05)
        return time.monotonic() - t0

    # (1) the Dagster run terminated
    home = work / "homes" / "stop-dagster"
    home.mkdir(parents=True)
    spec = json.dumps({"out": str(work / "out-stop"), "slides": two, "slurm": fields})
    env = {**cluster.env, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, spec], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    job = running_job()
    time.sleep(4)  # the job is in its first slide
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        instance.report_run_canceling(instance.get_run_records()[0].dagster_run)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out["terminate run → job gone"] = gone(job, t0)
    proc.communicate(timeout=300)
    out["terminate run → run process exited"] = time.monotonic() - t0

    # (2) scancel, (3) SIGTERM to the batch process (what pre-emption and the time limit send)
    for label, args in (("scancel → job gone", []), ("SIGTERM (pre-emption) → job gone", ["--batch", "--signal=TERM"])):
        home = work / "homes" / f"stop-{len(out)}"
        home.mkdir(parents=True)
        spec = json.dumps(
            {"out": str(work / f"out-stop-{len(out)}"), "slides": two, "slurm": {**fields, "check_storage": False}}
        )
        env = {**cluster.env, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, spec], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        job = running_job()
        time.sleep(4)
        t0 = time.monotonic()
        subprocess.run(["scancel", *args, job], env=cluster.env, check=True)
        out[label] = gone(job, t0)
        if label.startswith("scancel"):  # the SIGTERM case retries per the retry policy: let it finish
            proc.kill()
        proc.communicate(timeout=600)
        for q in cluster.queued():  # nothing of this step may be left
            subprocess.run(["scancel", q.split()[0]], env=cluster.env)
    return out


def job_rows(runs: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for i, r in enumerate(runs):
        m, s = r["marks"], r["slides"]
        if not {"submit", "running", "opened", "done"} <= set(m) or not s:
            rows.append((str(i), "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                str(i),
                f"{m['running'] - m['submit']:.1f}",
                f"{m['opened'] - m['running']:.1f}",
                f"{s[0] - m['opened']:.1f}",
                f"{m['done'] - s[-1]:.1f}",
                f"{m['done'] - m['submit']:.1f}",
            )
        )
    return rows


def table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="slides")
    ap.add_argument("--batch", type=int, default=5, help="slides per run (ATLASPATCH_BACKFILL_BATCH)")
    ap.add_argument("--runs-at-once", type=int, default=2, help="runs in flight (max_concurrent_runs)")
    ap.add_argument("--skip-stop", action="store_true", help="skip the stop timings")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-slurm-", dir="/tmp"))
    work.chmod(0o755)  # munged: o+x on the parents of its socket
    cluster = Cluster(work)
    cluster.start()
    try:
        slides = make_slides(work / "slides", a.n)
        local_env = {**cluster.env, "OMP_NUM_THREADS": "1"}
        t_local, local = backfill(work, "local", slides, a.batch, a.runs_at_once, None, local_env)
        t_slurm, runs = backfill(work, "slurm", slides, a.batch, a.runs_at_once, slurm_fields(cluster), cluster.env)
        assert all(r["ok"] for r in local + runs), "a run failed"
        jobs = sum(1 for r in runs if "submit" in r["marks"])
        print(
            f"\n{a.n} slides, batch {a.batch} ({len(runs)} runs), {a.runs_at_once} runs at once, {os.cpu_count()} cores"
        )
        table(
            "Backfill (tissue_mask → patch_coords → features/mobilenet_v2)",
            ("path", "runs", "Slurm jobs", "wall s", "vs local"),
            [
                ("local (in process)", str(len(local)), "0", f"{t_local:.1f}", "1.00x"),
                ("slurm (features in jobs)", str(len(runs)), str(jobs), f"{t_slurm:.1f}", f"{t_slurm / t_local:.2f}x"),
            ],
        )
        table(
            "Per job (seconds, from the run's event log)",
            ("run", "submit→running", "running→pipes opened", "opened→1st slide", "last slide→done seen", "total"),
            job_rows(runs),
        )
        if not a.skip_stop:
            stops = stop_times(work, cluster, slides)
            table(
                "Stop request → clean stop (seconds)",
                ("request", "seconds"),
                [(k, f"{v:.1f}") for k, v in stops.items()],
            )
    finally:
        cluster.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
