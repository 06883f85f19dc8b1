"""The Slurm launcher's pieces that need no cluster: job states in words, the batch script,
the plan split, the resource from its YAML file and the job's signal handling."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from atlaspatch_assets.core.errors import UsageError
from atlaspatch_assets.core.jobs import Stopper
from atlaspatch_assets.core.slurm import _FIELD, JobInfo, SlurmParams, batch_script, end_reason
from atlaspatch_assets.core.stages import CoordsParams, MaskParams, SlideTarget, StageInterrupted, StagePlan
from atlaspatch_assets.defs.slurm import SLURM_CONFIG_ENV, for_job, slurm_from_env, split_plan

# `scontrol show job -o` lines as Slurm 22.05 prints them (shortened)
OOM = (
    "JobId=41 JobName=atlaspatch-1a2b3c4d UserId=root(0) JobState=OUT_OF_MEMORY Reason=OutOfMemory "
    "Dependency=(null) ExitCode=0:125 RunTime=00:02:10 TimeLimit=02:00:00 BatchHost=gpu07"
)
TIMEOUT = "JobId=42 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 TimeLimit=00:30:00 BatchHost=gpu07"


def info_of(line: str) -> JobInfo:
    f = dict(_FIELD.findall(line))
    code, _, sig = f["ExitCode"].partition(":")
    return JobInfo(
        f["JobId"],
        f["JobState"],
        f.get("Reason", ""),
        int(code),
        int(sig),
        f.get("BatchHost", ""),
        f.get("TimeLimit", ""),
    )


def test_end_states_say_what_happened() -> None:
    p = SlurmParams(mem="16G")
    why, retry = end_reason(info_of(OOM), p)
    assert "ran out of memory" in why and "--mem=16G" in why and "{{slurm.mem}}" in why and not retry
    why, retry = end_reason(info_of(TIMEOUT), p)
    assert "time limit" in why and "--time=00:30:00" in why and "{{slurm.time_limit}}" in why and retry
    assert end_reason(JobInfo("1", "PREEMPTED"), p)[1]
    assert "NODE_FAIL" in end_reason(JobInfo("1", "NODE_FAIL", node="n3"), p)[0]
    assert end_reason(JobInfo("1", "FAILED", exit_code=0, signal=9), p) == ("was killed by SIGKILL (FAILED)", True)
    assert end_reason(JobInfo("1", "FAILED", exit_code=1), p) == ("failed (FAILED, exit code 1)", False)
    assert end_reason(None, p)[1]  # purged from slurmctld: unknown, worth a retry


def test_batch_script_options_environment_and_exec(tmp_path: Path) -> None:
    p = SlurmParams(
        partition="gpu",
        account="lab",
        qos="high",
        cpus_per_task=8,
        mem="32G",
        gres="gpu:1",
        time_limit="04:00:00",
        stop_grace=300,
        extra_sbatch=["--constraint=a100", "#SBATCH --exclusive"],
        env={"HF_HOME": "/shared/hf cache"},
        setup=["module load cuda/12.1"],
    )
    script = batch_script(
        p, ["/opt/py/bin/python", "-m", "x", "run", "/w/job.json"], name="n", log="/w/job.log", env={"A": "b"}
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in (
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--cpus-per-task=8",
        "--mem=32G",
        "--gres=gpu:1",
        "--time=04:00:00",
        "--signal=B:USR1@300",
        "--no-requeue",
        "--constraint=a100",
        "--exclusive",
        "--output=/w/job.log",
    ):
        assert f"#SBATCH {opt}" in lines
    assert lines.index("module load cuda/12.1") < lines.index("export HF_HOME='/shared/hf cache'")
    assert "export OMP_NUM_THREADS=8" in lines  # torch uses the job's CPUs, not the node's
    assert lines[-1] == "exec /opt/py/bin/python -m x run /w/job.json"  # exec: Slurm's signals reach Python
    probe = batch_script(p, ["py"], name="p", log="/w/p.log", env={}, probe=True)
    assert "#SBATCH --gres=gpu:1" not in probe and "#SBATCH --cpus-per-task=1" in probe
    with pytest.raises(UsageError, match="not an environment variable name"):
        batch_script(SlurmParams(env={"BAD-NAME": "x"}), ["py"], name="n", log="l", env={})


def test_split_plan_runs_the_stages_before_from_stage_here() -> None:
    plan = StagePlan(
        mask=MaskParams(),
        coords=CoordsParams(),
        encoders=("mobilenet_v2",),
        targets=(SlideTarget("mean", "mobilenet_v2"),),
    )
    local, remote = split_plan(plan, "features")
    assert local.assets == ["tissue_mask", "patch_coords"]
    assert remote.assets == ["features/mobilenet_v2", "slide_features/mean_mobilenet_v2"]
    local, remote = split_plan(plan, "tissue_mask")
    assert local.assets == [] and remote.assets == plan.assets
    local, remote = for_job(local, remote, SlurmParams(cpus_per_task=2, device="cuda"))
    assert (remote.compute.num_workers, remote.compute.device, remote.coords.patch_workers) == (2, "cuda", 2)
    assert local.compute.device == "cpu"  # the stages kept in the Dagster process are unchanged
    local, remote = split_plan(plan, "slide_features")
    assert remote.assets == ["slide_features/mean_mobilenet_v2"]
    assert local.assets + remote.assets == plan.assets


def test_resource_from_the_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SLURM_CONFIG_ENV, raising=False)
    assert slurm_from_env() is None
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text("partition: gpu\ngres: 'gpu:1'\nsetup: [module load cuda]\nenv: {HF_HOME: /shared/hf}\n")
    monkeypatch.setenv(SLURM_CONFIG_ENV, str(cfg))
    r = slurm_from_env()
    assert r is not None and r.enabled and r.params().gres == "gpu:1" and r.params().env == {"HF_HOME": "/shared/hf"}
    cfg.write_text("partitoin: gpu\n")
    with pytest.raises(UsageError, match="partitoin"):
        slurm_from_env()


def test_stopper_aborts_on_term_but_not_while_reporting_and_stops_after_slide_on_usr1() -> None:
    before = signal.getsignal(signal.SIGTERM)
    s = Stopper()
    with s.installed(), pytest.raises(StageInterrupted):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs right after the call returns
    s = Stopper()
    with s.installed():
        reported = False
        with pytest.raises(StageInterrupted), s.quiet():
            os.kill(os.getpid(), signal.SIGTERM)
            reported = True  # reached: the abort waits for the report to finish
        assert reported and s.signum == signal.SIGTERM
    s = Stopper()
    with s.installed():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.stop_after_slide and "time limit" in s.why
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handlers are back
