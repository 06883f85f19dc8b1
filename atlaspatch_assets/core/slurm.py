"""Slurm through its own commands (Dagster-free): the job's `#SBATCH` options and batch script,
`sbatch`, `scontrol show job` / `squeue` polling, `scancel`, and one-line reasons for how a job ended.

Only `sbatch`, `squeue`, `scontrol` and `scancel` are used — no `sacct` (clusters without
accounting, like the test cluster, still work) and no SSH (the Dagster process runs where the
Slurm client is configured, e.g. on a login node or with `SLURM_CONF` pointing at the cluster).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import UsageError
from .params import param, ref

REMOTE_STAGES = ("tissue_mask", "patch_coords", "features", "slide_features")

# Job states (squeue %T / scontrol JobState) after which the job holds no resources any more.
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
    "SPECIAL_EXIT",
}


class SlurmError(RuntimeError):
    """A Slurm command failed (its own one-line message)."""


@dataclass(frozen=True)
class SlurmParams:
    """Where and how the per-slide stages run as Slurm jobs (`enabled`: off = in process)."""

    SECTION: ClassVar[str] = "slurm"

    enabled: bool = param(False, "Run the per-slide stages as Slurm jobs (sbatch); off = in the Dagster process")
    from_stage: str = param(
        "features",
        "First stage that runs on Slurm; the ones before it run in the Dagster process",
        choices=REMOTE_STAGES,
    )
    partition: str = param("", "Partition (--partition); empty = the cluster's default")
    account: str = param("", "Account (--account)")
    qos: str = param("", "Quality of service (--qos)")
    cpus_per_task: int = param(
        4, "CPUs of the job (--cpus-per-task; caps its reader threads and OMP_NUM_THREADS)", ge=1
    )
    mem: str = param("16G", "Memory of the job (--mem), e.g. 16G")
    gres: str = param("", "Generic resources (--gres), e.g. gpu:1 or gpu:a100:1")
    device: str = param("", "Device in the job (e.g. cuda; segmentation and models); empty = the compute resource's")
    time_limit: str = param("02:00:00", "Time limit of one job (--time), e.g. 02:00:00 or 1-00:00:00")
    stop_grace: int = param(
        120,
        "Seconds before the time limit when the job stops after the current slide (--signal=B:USR1@N); 0 = off",
        ge=0,
    )
    extra_sbatch: list[str] = param(
        default_factory=list, help="More #SBATCH options, one per item, e.g. --constraint=a100"
    )
    python: str = param("", "Python of the job (with atlaspatch-assets installed); empty = this process's")
    env: dict[str, str] = param(default_factory=dict, help="Environment variables exported in the job, NAME=VALUE")
    setup: list[str] = param(
        default_factory=list, help="Shell lines run before the job's Python, e.g. `module load cuda`"
    )
    work_dir: str = param("", "Shared folder for job scripts, Pipes files and logs; empty = <output_dir>/.slurm")
    slurm_conf: str = param("", "SLURM_CONF for sbatch/squeue/scontrol/scancel; empty = the environment's")
    poll_seconds: float = param(2.0, "Seconds between two looks at a job's state", gt=0)
    cancel_timeout: float = param(120.0, "Seconds to wait for a cancelled job to leave the queue", gt=0)
    check_storage: bool = param(
        True, "Check with a probe job (once per cluster, partition and folder) that the nodes see the files"
    )
    orphan_timeout: int = param(
        900, "A job stops when the Dagster step stopped watching it for this many seconds; 0 = never", ge=0
    )
    job_name: str = param("atlaspatch", "Job name prefix (--job-name)")


@dataclass(frozen=True)
class JobInfo:
    """What `scontrol show job` says of a job."""

    job_id: str
    state: str  # JobState, e.g. RUNNING, COMPLETED, OUT_OF_MEMORY
    reason: str = ""
    exit_code: int = 0
    signal: int = 0
    node: str = ""
    time_limit: str = ""
    fields: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


def slurm_env(conf: str = "") -> dict[str, str]:
    env = dict(os.environ)
    if conf:
        env["SLURM_CONF"] = conf
    return env


def run(args: Sequence[str], conf: str = "", timeout: float = 60.0) -> subprocess.CompletedProcess:
    """A Slurm command; SlurmError when it is missing or times out (a non-zero exit is returned)."""
    try:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, env=slurm_env(conf), check=False
        )
    except FileNotFoundError as e:
        raise SlurmError(f"{args[0]} not found: install the Slurm client where Dagster runs") from e
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"{' '.join(args[:2])} did not answer in {timeout:.0f}s (slurmctld down?)") from e


def _error_text(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    return "; ".join(lines) or f"exit code {proc.returncode}"


def submit(script: str, conf: str = "") -> str:
    """`sbatch --parsable SCRIPT` → the job id."""
    proc = run(["sbatch", "--parsable", script], conf)
    if proc.returncode != 0:
        raise SlurmError(_error_text(proc))
    return proc.stdout.strip().split(";")[0]


_FIELD = re.compile(r"(\w+)=(\S*)")


def job_info(job_id: str, conf: str = "") -> JobInfo | None:
    """The job's state, or None when Slurm no longer knows it (purged after MinJobAge)."""
    proc = run(["scontrol", "show", "job", "-o", job_id], conf)
    if proc.returncode != 0:
        if "Invalid job id" in (proc.stderr or ""):
            return None
        raise SlurmError(_error_text(proc))
    fields = dict(_FIELD.findall(proc.stdout))
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return JobInfo(
        job_id=job_id,
        state=fields.get("JobState", "UNKNOWN"),
        reason=fields.get("Reason", ""),
        exit_code=int(code or 0),
        signal=int(sig or 0),
        node=fields.get("BatchHost", "") or fields.get("NodeList", ""),
        time_limit=fields.get("TimeLimit", ""),
        fields=fields,
    )


def active_jobs(job_ids: Sequence[str], conf: str = "") -> list[str]:
    """The ids among `job_ids` still in the queue (pending, running or completing)."""
    if not job_ids:
        return []
    proc = run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], conf)
    if proc.returncode != 0:
        if "Invalid job id" in (proc.stderr or ""):
            return []
        raise SlurmError(_error_text(proc))
    out = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] not in TERMINAL:
            out.append(parts[0])
    return out


def cancel(job_ids: Sequence[str], conf: str = "", signal: str = "") -> None:
    """`scancel` (with `signal`: only signal the batch process, e.g. TERM to simulate pre-emption)."""
    if not job_ids:
        return
    args = ["scancel", *(["--batch", f"--signal={signal}"] if signal else []), *job_ids]
    proc = run(args, conf)
    if proc.returncode != 0 and "already completing or completed" not in (proc.stderr or ""):
        raise SlurmError(_error_text(proc))


def wait_gone(job_ids: Sequence[str], conf: str = "", timeout: float = 120.0, poll: float = 0.5) -> list[str]:
    """Wait until none of the jobs is in the queue; the ids still there after `timeout`."""
    end = time.monotonic() + timeout
    left = active_jobs(job_ids, conf)
    while left and time.monotonic() < end:
        time.sleep(poll)
        left = active_jobs(left, conf)
    return left


def cluster_name(conf: str = "") -> str:
    proc = run(["scontrol", "show", "config"], conf)
    m = re.search(r"^ClusterName\s*=\s*(\S+)", proc.stdout or "", re.M)
    return m.group(1) if m else "unknown"


SIGNALS = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 15: "SIGTERM"}


def end_reason(info: JobInfo | None, params: SlurmParams) -> tuple[str, bool]:
    """How a job ended, as (one line, retryable): Slurm's state and reason in words."""
    if info is None:
        return "left the queue and Slurm no longer knows its end state", True
    s = info.state
    if s == "OUT_OF_MEMORY":
        return f"ran out of memory (OUT_OF_MEMORY, --mem={params.mem}); raise {ref('slurm', 'mem')}", False
    if s == "TIMEOUT":
        limit = info.time_limit or params.time_limit
        return f"reached its time limit (TIMEOUT, --time={limit}); raise {ref('slurm', 'time_limit')}", True
    if s == "PREEMPTED":
        return "was pre-empted by Slurm (PREEMPTED)", True
    if s == "NODE_FAIL":
        return f"lost its node {info.node} (NODE_FAIL)".replace("  ", " "), True
    if s == "BOOT_FAIL":
        return "could not start: its node failed to boot (BOOT_FAIL)", True
    if s == "DEADLINE":
        return "passed its deadline (DEADLINE)", True
    if s == "CANCELLED":
        return "was cancelled (CANCELLED: scancel or an administrator)", True
    if info.signal:
        name = SIGNALS.get(info.signal, f"signal {info.signal}")
        return f"was killed by {name} ({s})", True
    if s == "COMPLETED":
        return "ended (COMPLETED) without reporting", False
    return (
        f"failed ({s}, exit code {info.exit_code}{', ' + info.reason if info.reason not in ('', 'None') else ''})",
        False,
    )


def sbatch_options(p: SlurmParams, *, name: str, log: str, probe: bool = False) -> list[str]:
    """The `#SBATCH` options of a job (a probe job asks for 1 CPU, 1G and 5 minutes, no GRES)."""
    opts = [f"--job-name={name}", f"--output={log}", "--open-mode=append", "--nodes=1", "--ntasks=1"]
    given = [("partition", p.partition), ("account", p.account), ("qos", p.qos)]
    if probe:
        given += [("cpus-per-task", 1), ("mem", "1G"), ("time", "00:05:00")]
    else:
        given += [("cpus-per-task", p.cpus_per_task), ("time", p.time_limit), ("mem", p.mem), ("gres", p.gres)]
        given.append(("signal", f"B:USR1@{p.stop_grace}" if p.stop_grace else ""))
    opts += [f"--{k}={v}" for k, v in given if v]  # empty = the cluster's default
    # Dagster's retry policy re-submits (and skips what is stored): a Slurm requeue would re-run
    # the job behind the step's back, with the Pipes session already closed.
    opts.append("--no-requeue")
    opts += [ln.removeprefix("#SBATCH").strip() for ln in p.extra_sbatch if ln.strip()]
    return opts


def batch_script(
    p: SlurmParams, command: Sequence[str], *, name: str, log: str, env: Mapping[str, str], probe: bool = False
) -> str:
    """A bash batch script: #SBATCH options, setup lines, exports, then `exec` of the command (so
    Slurm's signals reach the Python process itself, not a shell waiting for it)."""
    threads = {} if probe else {"OMP_NUM_THREADS": str(p.cpus_per_task)}  # torch: the job's CPUs, not the node's
    exports = {**threads, **p.env, **env}
    bad = [k for k in exports if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad:
        raise UsageError(f"{ref('slurm', 'env')}: {bad[0]!r} is not an environment variable name")
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {o}" for o in sbatch_options(p, name=name, log=log, probe=probe)]
    lines += ["set -eo pipefail", *p.setup]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in exports.items()]
    lines.append("exec " + " ".join(shlex.quote(c) for c in command))
    return "\n".join(lines) + "\n"


def tail(path: str, lines: int = 20) -> list[str]:
    """The last lines of a job log (empty when it does not exist or cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [ln.rstrip("\n") for ln in f.readlines()[-lines:]]
    except OSError:
        return []
