"""The Slurm launcher: a step's slides as ONE Slurm job, driven through Dagster Pipes.

`SlurmResource.executor(context)` has the signature of `execution.execute_locally`. The stages
before `from_stage` run here (in process) for the batch; the slides whose upstream worked are
then submitted with `sbatch` as one job that runs `python -m atlaspatch_assets.core.jobs run`,
i.e. `core.stages.run_slide` on each slide — the same stage functions as locally. The Pipes
context and the job's messages are files in a per-job folder on the shared filesystem
(`PipesFileContextInjector` + a tailing file reader); each slide's outcomes arrive as a Pipes
custom message and are handed to `report(slide_id, outcomes)` while the job runs, so the UI
shows slides as they finish; the job's log lines arrive through `pipes.log`.

One job per step (a backfill batch), not an array: the models are loaded once per job (seconds
of torch import + weights, the main per-job cost), a Pipes session belongs to one step, and
parallelism comes from Dagster running several batches (runs) at once — each its own job.

Lifecycle: the step polls `scontrol show job` (no `sacct`); a terminated Dagster run (interrupt
while polling) `scancel`s the job and waits until it has left the queue; a job that ends without
reporting some slides fails those with Slurm's state in words (out of memory, time limit,
pre-emption, ...), retryable unless the cause is deterministic; the step's `RetryPolicy` then
re-submits (slides already stored are skipped by recipe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from dagster import (
    ConfigurableResource,
    DagsterRunStatus,
    Failure,
    PipesFileContextInjector,
    PipesMessageHandler,
    PipesMessageReader,
    PipesSession,
)
from dagster._core.pipes.context import build_external_execution_context_data
from dagster_pipes import PipesDefaultMessageWriter

from ..core import slurm
from ..core.errors import UsageError
from ..core.jobs import ERROR, MODULE, SLIDE, load_json, write_json_atomic
from ..core.params import check_params, from_mapping
from ..core.slurm import JobInfo, SlurmError, SlurmParams, end_reason
from ..core.source import SlideRef
from ..core.stages import Outcome, StageEnv, StagePlan, run_slide
from ..core.stages.base import failed, not_run
from ..core.stages.serialize import (
    FORMAT,
    layout_to_dict,
    outcome_from_dict,
    params_to_dict,
    plan_to_dict,
    ref_to_dict,
    render_table,
)
from .config import derive, to_params

Report = Callable[[str, list[Outcome]], None]
SLURM_CONFIG_ENV = "ATLASPATCH_SLURM_CONFIG"
TRANSIENT_SUBMIT_ERRORS = ("Socket timed out", "Unable to contact slurm controller", "did not answer")


class SlurmResource(derive(ConfigurableResource, SlurmParams, "_SlurmFields")):
    """Slurm jobs for the per-slide stages from `from_stage` on (`enabled: false` = in process)."""

    def params(self) -> SlurmParams:
        return to_params(SlurmParams, self)

    def executor(self, context: Any) -> Callable[..., None]:
        """`execute(refs, plan, env, models, report)` submitting through Slurm (as execute_locally)."""
        p = self.params()
        check_params(p)
        return partial(execute_on_slurm, context, p)


def slurm_from_env() -> SlurmResource | None:
    """The resource from the YAML file named by $ATLASPATCH_SLURM_CONFIG (fields of SlurmParams;
    `enabled` defaults to true there), or None when it is unset."""
    path = os.environ.get(SLURM_CONFIG_ENV, "").strip()
    if not path:
        return None
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{SLURM_CONFIG_ENV}={path}: expected a mapping of slurm fields")
    data.setdefault("enabled", True)
    from_mapping(SlurmParams, data)  # unknown fields are an error, named
    return SlurmResource(**data)


class SharedFileMessageReader(PipesMessageReader):
    """Reads the job's Pipes messages from a file on the shared filesystem.

    Unlike `PipesFileMessageReader` it re-opens the file at the last offset on each look (NFS
    serves appends from other hosts on open) and parses only complete lines (a large message,
    e.g. a slide with its PNG preview, may be read while it is being appended).
    """

    def __init__(self, path: str, interval: float = 0.2):
        self.path = path
        self.interval = interval

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        open(self.path, "w", encoding="utf-8").close()
        stop = threading.Event()
        thread = threading.Thread(target=self._read, args=(handler, stop), name="slurm-pipes-reader", daemon=True)
        thread.start()
        try:
            yield {PipesDefaultMessageWriter.FILE_PATH_KEY: self.path}
        finally:
            stop.set()
            thread.join()

    def _read(self, handler: PipesMessageHandler, stop: threading.Event) -> None:
        offset, rest = 0, b""
        while True:
            last = stop.is_set()  # one more read after the session closed: nothing written is lost
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            offset += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                try:
                    handler.handle_message(json.loads(line))
                except Exception:
                    handler.report_pipes_framework_exception(type(self).__name__, sys.exc_info())
            if last:
                return
            stop.wait(self.interval)

    def no_messages_debug_text(self) -> str:
        return f"Attempted to read messages from {self.path}."


@contextmanager
def pipes_session(context: Any, injector: Any, reader: Any, extras: dict[str, Any]) -> Iterator[PipesSession]:
    """`open_pipes_session` without its demand that the step yields one `MaterializeResult` per
    asset: those have no partition, and this step reports each slide (partition) itself."""
    data = build_external_execution_context_data(context, extras)
    handler = PipesMessageHandler(context, reader)
    with injector.inject_context(data) as ci_params, handler.handle_messages() as mr_params:
        yield PipesSession(
            context_data=data,
            message_handler=handler,
            context_injector_params=ci_params,
            message_reader_params=mr_params,
            context=context,
        )


def split_plan(plan: StagePlan, from_stage: str) -> tuple[StagePlan, StagePlan]:
    """(the stages before `from_stage`, the stages from it on) of a plan."""
    k = slurm.REMOTE_STAGES.index(from_stage)
    common = {"features": plan.features, "embedding": plan.embedding, "compute": plan.compute}
    local = StagePlan(
        mask=plan.mask if k > 0 else None,
        coords=plan.coords if k > 1 else None,
        encoders=plan.encoders if k > 2 else (),
        targets=(),
        **common,
    )
    remote = StagePlan(
        mask=plan.mask if k == 0 else None,
        coords=plan.coords if k <= 1 else None,
        encoders=plan.encoders if k <= 2 else (),
        targets=plan.targets,
        **common,
    )
    return local, remote


def for_job(local: StagePlan, remote: StagePlan, p: SlurmParams) -> tuple[StagePlan, StagePlan]:
    """The job's part of the plan sized to the job: reader threads at most its CPUs, its device."""
    c = remote.compute
    compute = replace(c, num_workers=min(c.num_workers, p.cpus_per_task), **({"device": p.device} if p.device else {}))
    coords = (
        replace(remote.coords, patch_workers=min(remote.coords.patch_workers, p.cpus_per_task))
        if remote.coords
        else None
    )
    return local, replace(remote, compute=compute, coords=coords)


def execute_on_slurm(
    context: Any, p: SlurmParams, refs: dict[str, Any], plan: StagePlan, env: StageEnv, models: Any, report: Report
) -> None:
    """The local stages here, then one Slurm job for the slides whose upstream worked."""
    local_plan, remote_plan = for_job(*split_plan(plan, p.from_stage), p)
    local: dict[str, list[Outcome]] = {}
    todo: list[SlideRef] = []
    for sid, ref in refs.items():
        if isinstance(ref, list):  # not resolvable to a file: already failed
            report(sid, ref)
            continue
        outs = run_slide(ref, local_plan, env, models.cache) if local_plan.assets else []
        blocker = next((o for o in outs if not o.ok), None)
        if not remote_plan.assets:
            report(sid, outs)
        elif blocker is not None:
            report(sid, outs + [not_run(a, sid, blocker, env) for a in remote_plan.assets])
        else:
            local[sid] = outs
            todo.append(ref)
    if todo:
        SlurmBatch(context, p, remote_plan, env, models, report, local).run(todo)


def work_root(p: SlurmParams, env: StageEnv) -> Path:
    return Path(p.work_dir) if p.work_dir else env.layout.output / ".slurm"


class SlurmBatch:
    """One step's slides as one Slurm job: storage check, submit, watch, report, cancel."""

    def __init__(
        self,
        context: Any,
        p: SlurmParams,
        plan: StagePlan,
        env: StageEnv,
        models: Any,
        report: Report,
        local: dict[str, list[Outcome]],
    ):
        self.context, self.p, self.plan, self.env, self.models = context, p, plan, env, models
        self._report, self.local = report, local
        self.reported: set[str] = set()
        self.job_error = ""
        self.completed = False  # the job ended COMPLETED having reported every slide
        self._seen = 0
        self.log = context.log

    # -- reporting ------------------------------------------------------------------------------
    def report(self, sid: str, remote: list[Outcome]) -> None:
        if sid in self.reported or sid not in self.local:
            return
        self.reported.add(sid)
        self._report(sid, self.local[sid] + remote)

    def fail_rest(self, why: str, transient: bool) -> None:
        """Fail every slide not reported yet with one reason (the job's or Slurm's)."""
        for sid in [s for s in self.local if s not in self.reported]:
            outs = [failed(a, sid, self.env.text(f"{sid}: [{a}] {why}"), transient) for a in self.plan.assets]
            self.report(sid, outs)

    def deliver(self, handler: PipesMessageHandler, job_id: str) -> None:
        """Hand the job's new custom messages to `report` (here, in the step's thread)."""
        messages = handler.get_custom_messages()
        new, self._seen = messages[self._seen :], len(messages)
        for m in new:
            if not isinstance(m, dict):
                continue
            if m.get("kind") == SLIDE:
                outs = [outcome_from_dict(d) for d in m.get("outcomes", [])]
                for o in outs:
                    o.metadata.setdefault("slurm_job_id", job_id)
                self.report(str(m.get("slide_id")), outs)
            elif m.get("kind") == ERROR:
                self.job_error = str(m.get("reason", ""))

    # -- the batch ------------------------------------------------------------------------------
    def run(self, refs: Sequence[SlideRef]) -> None:
        p = self.p
        root = work_root(p, self.env)
        work = root / self.context.run.run_id / f"try{self.context.retry_number}-{uuid.uuid4().hex[:8]}"
        if self.terminating():  # e.g. the retry Dagster starts after an interrupt: submit nothing
            raise Failure("the run was terminated before its Slurm job was submitted", allow_retries=False)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if p.check_storage:
                problem = check_shared_storage(p, self.env, refs, root, work, self.log)
                if problem:
                    self.fail_rest(problem, False)
                    return
            self.submit_and_watch(refs, work)
        except SlurmError as e:
            text = str(e)
            self.log.error(f"Slurm: {text}")
            self.fail_rest(f"Slurm: {text}", any(t in text for t in TRANSIENT_SUBMIT_ERRORS))
            return
        if self.completed:
            shutil.rmtree(work, ignore_errors=True)  # kept otherwise: spec, script, log, messages
            with contextlib.suppress(OSError):
                work.parent.rmdir()  # the run's folder, when no other try left files

    def spec(self, refs: Sequence[SlideRef], work: Path) -> dict[str, Any]:
        env = self.env
        return {
            "format": FORMAT,
            "plan": plan_to_dict(self.plan),
            "slides": [ref_to_dict(r) for r in refs],
            "layout": layout_to_dict(env.layout),
            "catalog_dir": str(env.catalog.root) if env.catalog is not None else None,
            "models": params_to_dict(self.models.cache.models),
            "render": render_table(env.render),
            "heartbeat": str(work / "heartbeat"),
            "orphan_timeout": self.p.orphan_timeout,
        }

    def submit_and_watch(self, refs: Sequence[SlideRef], work: Path) -> None:
        p = self.p
        spec_path, log_path = work / "job.json", work / "job.log"
        write_json_atomic(spec_path, self.spec(refs, work))
        heartbeat = work / "heartbeat"
        heartbeat.touch()
        injector = PipesFileContextInjector(str(work / "pipes-context.json"))
        reader = SharedFileMessageReader(str(work / "pipes-messages.jsonl"))
        ids = [r.slide_id for r in refs]
        job_id, info = "", None
        with pipes_session(self.context, injector, reader, {"slides": ids, "job_spec": str(spec_path)}) as session:
            handler = session.message_handler
            command = [p.python or sys.executable, "-m", MODULE, "run", str(spec_path)]
            script = slurm.batch_script(
                p,
                command,
                name=f"{p.job_name}-{self.context.run.run_id[:8]}",
                log=str(log_path),
                env=session.get_bootstrap_env_vars(),
            )
            (work / "job.sbatch").write_text(script, encoding="utf-8")
            t_submit = time.monotonic()
            job_id = slurm.submit(str(work / "job.sbatch"), p.slurm_conf)
            self.log.info(f"Slurm job {job_id} submitted: {len(ids)} slides, {', '.join(self.plan.assets)}")
            try:
                info = self.watch(job_id, handler, heartbeat, t_submit)
            except BaseException as e:  # the run was terminated (or the step failed here): no orphaned job
                self.cancel(job_id)
                self.deliver(handler, job_id)
                self.fail_rest(f"Slurm job {job_id} cancelled: the Dagster step was interrupted", True)
                if self.terminating():  # Dagster would retry an interrupted step: not in a cancelled run
                    raise Failure(f"the run was terminated: Slurm job {job_id} cancelled", allow_retries=False) from e
                raise
        self.deliver(handler, job_id)  # what arrived while the session closed
        self.finish(job_id, info, log_path)

    def terminating(self) -> bool:
        """The run is being terminated (the UI's Terminate, `dagster run terminate`)."""
        run = self.context.instance.get_run_by_id(self.context.run.run_id)
        return run is not None and run.status in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)

    def watch(self, job_id: str, handler: PipesMessageHandler, heartbeat: Path, t_submit: float) -> JobInfo | None:
        """Poll until the job has ended, reporting slides as their messages arrive."""
        state = ""
        while True:
            self.deliver(handler, job_id)
            os.utime(heartbeat)
            info = slurm.job_info(job_id, self.p.slurm_conf)
            if info is None or info.finished:
                took = time.monotonic() - t_submit
                self.log.info(f"Slurm job {job_id}: {info.state if info else 'gone'} after {took:.1f}s")
                return info
            if info.state != state:
                state = info.state
                where = f" on {info.node}" if info.node and state == "RUNNING" else ""
                why = f" ({info.reason})" if info.reason not in ("", "None") else ""
                self.log.info(f"Slurm job {job_id}: {state}{where}{why}")
            time.sleep(self.p.poll_seconds)

    def cancel(self, job_id: str) -> None:
        self.log.warning(f"Slurm job {job_id}: cancelling (scancel)")
        try:
            slurm.cancel([job_id], self.p.slurm_conf)
            left = slurm.wait_gone([job_id], self.p.slurm_conf, self.p.cancel_timeout)
        except SlurmError as e:
            self.log.error(f"Slurm job {job_id}: scancel failed: {e}; cancel it by hand (scancel {job_id})")
            return
        if left:
            self.log.error(f"Slurm job {job_id} still queued {self.p.cancel_timeout:.0f}s after scancel")
        else:
            self.log.info(f"Slurm job {job_id}: gone")

    def finish(self, job_id: str, info: JobInfo | None, log_path: Path) -> None:
        """Slides the job did not report fail with its own error or Slurm's reason."""
        missing = [s for s in self.local if s not in self.reported]
        if not missing and (info is None or info.state == "COMPLETED"):
            self.completed = True
            return
        why, transient = end_reason(info, self.p)
        lines = [ln for ln in slurm.tail(str(log_path), 30) if ln.strip()]
        if self.job_error:  # the job's own error (an exception it reported)
            why, transient = f"failed: {self.job_error}", False
        elif info is not None and info.state == "FAILED" and not info.signal and lines:
            why = f"{why}: {lines[-1].strip()}"  # e.g. the setup line or Python that could not start
        self.log.error(f"Slurm job {job_id} {why} (log {log_path}):\n" + "\n".join(lines[-15:]))
        if missing:
            self.fail_rest(f"Slurm job {job_id} {why}", transient)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def check_shared_storage(
    p: SlurmParams, env: StageEnv, refs: Sequence[SlideRef], root: Path, work: Path, log: Any
) -> str:
    """'' when the nodes see the output root and the slides' folders (checked once per cluster,
    partition and folder by a probe job, then recorded under <work root>/storage-checks); else
    one line saying what they do not see."""
    output = env.layout.output
    output.mkdir(parents=True, exist_ok=True)
    cluster = slurm.cluster_name(p.slurm_conf)
    records = root / "storage-checks"
    records.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, list[str]] = {}
    for r in refs:
        dirs.setdefault(os.path.dirname(os.path.abspath(r.path)), []).append(os.path.basename(r.path))
    dirs.setdefault(str(output), [])
    env_key = _key(p.python or sys.executable, *p.setup, json.dumps(p.env, sort_keys=True))
    todo = {d: n for d, n in dirs.items() if not (records / f"{_key(cluster, p.partition, env_key, d)}.json").exists()}
    if not todo:
        return ""
    token = output / f".atlaspatch-probe-{uuid.uuid4().hex[:12]}"  # only visible where the output root is shared
    token.write_text("probe\n", encoding="utf-8")
    todo[str(output)] = [*todo.get(str(output), []), token.name]
    probe_path, reply_path, log_path = work / "probe.json", work / "probe-reply.json", work / "probe.log"
    write_json_atomic(probe_path, {"dirs": todo, "reply": str(reply_path)})
    script = work / "probe.sbatch"
    command = [p.python or sys.executable, "-m", MODULE, "probe", str(probe_path)]
    script.write_text(
        slurm.batch_script(p, command, name=f"{p.job_name}-probe", log=str(log_path), env={}, probe=True),
        encoding="utf-8",
    )
    where = f"partition {p.partition}" if p.partition else "the default partition"
    try:
        job_id = slurm.submit(str(script), p.slurm_conf)
        log.info(f"Slurm probe job {job_id}: do the nodes of {where} see {len(todo)} folders?")
        try:
            info = _wait_finished(job_id, p)
        except BaseException:
            slurm.cancel([job_id], p.slurm_conf)
            slurm.wait_gone([job_id], p.slurm_conf, p.cancel_timeout)
            raise
    finally:
        token.unlink(missing_ok=True)
    if not reply_path.exists():
        lines = [ln for ln in slurm.tail(str(log_path)) if ln.strip()]
        state = info.state if info else "gone"
        said = f": {lines[-1].strip()}" if lines else f"; its log {log_path} is not here either"
        return (
            f"shared storage: the probe job {job_id} ({state}) on {where} wrote no reply to {reply_path}{said}; "
            f"the work folder ({root}), the output root and the slides must be on storage the nodes share"
        )
    reply = load_json(reply_path)
    if reply.get("problems"):
        return (
            f"shared storage: the nodes of {where} (probed on {reply.get('node')}) do not see "
            + "; ".join(reply["problems"])
            + ": slides and the output root must be on storage shared with the nodes"
        )
    for d in todo:
        write_json_atomic(
            records / f"{_key(cluster, p.partition, env_key, d)}.json",
            {"cluster": cluster, "partition": p.partition, "dir": d, "node": reply.get("node"), "time": time.time()},
        )
    log.info(f"Slurm probe job {job_id}: {reply.get('node')} sees the output root and the slides")
    return ""


def _wait_finished(job_id: str, p: SlurmParams) -> JobInfo | None:
    while True:
        info = slurm.job_info(job_id, p.slurm_conf)
        if info is None or info.finished:
            return info
        time.sleep(min(p.poll_seconds, 1.0))
