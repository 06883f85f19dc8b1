"""What a Slurm job runs (Dagster-free; it only needs `dagster_pipes`):

    python -m atlaspatch_assets.core.jobs run SPEC.json     the slides of a step, through `run_slide`
    python -m atlaspatch_assets.core.jobs probe PROBE.json  can this node see the shared files?

`run` reads the job spec (plan, slides, layout, models, how to name parameters) written by the
Dagster side next to the Pipes files, opens Dagster Pipes (context and messages through files on
the shared filesystem), runs every slide through the same stage functions as a local run — each
stage stores atomically and records its catalog event itself — and sends each slide's outcomes
back as a Pipes custom message as soon as the slide is done; log lines go through `pipes.log`.

Stopping: SIGTERM (scancel, pre-emption, the time limit; SIGKILL follows after Slurm's KillWait)
aborts the slide in progress (its temporary files are removed by the store's `finally`, the
stored data stays the previous complete version); SIGUSR1 (`--signal=B:USR1@<stop_grace>`, the
time limit is near) stops after the current slide. Either way the unfinished slides are reported
failed and retryable ("interrupted by Slurm: ..."), and the job exits 128 + signal number so
Dagster's retry policy re-submits the batch (stored slides are skipped by recipe). A job whose
Dagster step stopped watching (its heartbeat file unchanged for `orphan_timeout` s) stops the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .stages.base import StageInterrupted, failed

log = logging.getLogger("atlaspatch.job")
MODULE = "atlaspatch_assets.core.jobs"
SLIDE, ERROR = "slide", "error"  # kinds of custom messages


def load_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class Stopper:
    """Turns SIGTERM into `StageInterrupted` (abort now) and SIGUSR1 into "stop after this slide";
    `quiet()` defers the abort while a finished slide is being reported."""

    def __init__(self) -> None:
        self.signum = 0
        self.why = ""
        self.stop_after_slide = False
        self._quiet = 0
        self._pending = False

    def ignore(self) -> None:
        """From now on, signals only record themselves (the job is already stopping)."""
        self._quiet += 1
        self._pending = False

    def _term(self, signum: int, _frame: Any) -> None:
        self.signum = self.signum or signum
        self.why = self.why or "SIGTERM: scancel, pre-emption or the time limit"
        if self._quiet:
            self._pending = True
        else:
            raise StageInterrupted(signum)

    def _usr1(self, signum: int, _frame: Any) -> None:
        self.signum = self.signum or signum
        self.why = self.why or "SIGUSR1: the time limit is near"
        self.stop_after_slide = True

    @contextmanager
    def installed(self) -> Iterator[Stopper]:
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        signal.signal(signal.SIGTERM, self._term)
        signal.signal(signal.SIGUSR1, self._usr1)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1
            if not self._quiet and self._pending:
                self._pending = False
                raise StageInterrupted(self.signum)


def watch_heartbeat(path: str, timeout: float, stopper: Stopper) -> None:
    """Stop the job (as SIGTERM would) when `path` has not changed for `timeout` seconds: the
    Dagster step that touches it is gone (its process was killed) and nobody will read our messages.
    Changes are timed with this node's clock, so clock skew between hosts does not matter."""

    def loop() -> None:
        last, since = None, time.monotonic()
        while True:
            time.sleep(min(30.0, max(1.0, timeout / 4)))
            try:
                m = os.stat(path).st_mtime_ns
            except OSError:
                m = None
            if m != last:
                last, since = m, time.monotonic()
            elif time.monotonic() - since > timeout:
                stopper.why = f"the Dagster step stopped watching this job (no heartbeat for {timeout:.0f}s)"
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=loop, name="heartbeat-watch", daemon=True).start()


class _PipesHandler(logging.Handler):
    """Job log lines → Dagster (through `pipes.log`)."""

    def __init__(self, pipes: Any) -> None:
        super().__init__(logging.INFO)
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a closed session must not break the stage that logs
            self.pipes.log.log(record.levelno, record.getMessage())


def _job_metadata() -> dict[str, str]:
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
    }


def run_job(spec_path: str) -> int:
    """The `run` command: every slide of the spec; 0 when all ran (slide failures are data)."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    from .catalog import Catalog
    from .stages import ModelCache, ModelParams, StageEnv, run_slide
    from .stages.serialize import (
        FORMAT,
        layout_from_dict,
        outcome_to_dict,
        params_from_dict,
        plan_from_dict,
        ref_from_dict,
        table_renderer,
    )

    spec = load_json(spec_path)
    if spec.get("format") != FORMAT:
        print(f"job spec format {spec.get('format')!r}, this atlaspatch reads {FORMAT}", file=sys.stderr)
        return 2
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        print("not started through Dagster Pipes (DAGSTER_PIPES_CONTEXT is not set)", file=sys.stderr)
        return 2
    plan = plan_from_dict(spec["plan"])
    todo = [ref_from_dict(d) for d in spec["slides"]]
    meta = _job_metadata()
    stopper = Stopper()
    with open_dagster_pipes() as pipes, stopper.installed():
        logger = logging.getLogger("atlaspatch")
        logger.addHandler(_PipesHandler(pipes))

        def send(sid: str, outcomes: list) -> None:
            for o in outcomes:
                o.metadata.update(meta)
            payload = {"kind": SLIDE, "slide_id": sid, "outcomes": [outcome_to_dict(o) for o in outcomes]}
            pipes.report_custom_message(payload)

        try:
            env = StageEnv(
                layout=layout_from_dict(spec["layout"]),
                catalog=Catalog(spec["catalog_dir"]) if spec.get("catalog_dir") else None,
                run_id=pipes.run_id,
                render=table_renderer(spec.get("render", {})),
                logger=logger,
            )
            models = ModelCache(params_from_dict(ModelParams, spec.get("models", {})))
            if spec.get("heartbeat") and spec.get("orphan_timeout"):
                watch_heartbeat(spec["heartbeat"], float(spec["orphan_timeout"]), stopper)
            log.info(
                f"job {meta['slurm_job_id']} on {meta['slurm_node']}: {len(todo)} slides, try {pipes.retry_number}"
            )
            while todo and not stopper.stop_after_slide:
                outcomes = run_slide(todo[0], plan, env, models)
                with stopper.quiet():  # a finished slide is reported whole, then the signal acts
                    send(todo.pop(0).slide_id, outcomes)
        except StageInterrupted:
            pass
        except Exception as e:  # the job's own error: one line for Dagster, the traceback in the job log
            pipes.report_custom_message({"kind": ERROR, "reason": " ".join(f"{type(e).__name__}: {e}".split())})
            raise
        if not todo:
            return 0
        stopper.ignore()  # report the rest; Slurm's SIGKILL ends it if this outlasts KillWait
        why = stopper.why or "interrupted"
        logger.warning(f"interrupted by Slurm ({why}): {len(todo)} slides left for the retry")
        for r in todo:
            sid = r.slide_id
            send(
                sid, [failed(a, sid, f"{sid}: [{a}] interrupted by Slurm ({why}); retried", True) for a in plan.assets]
            )
        return 128 + (stopper.signum or signal.SIGTERM)


def probe(spec_path: str) -> int:
    """The `probe` command: which of the given folders and files this node does not see."""
    spec = load_json(spec_path)
    problems: list[str] = []
    for d, names in spec.get("dirs", {}).items():
        if not os.path.isdir(d):
            problems.append(f"{d} (not found)")
            continue
        missing = [n for n in names if not os.path.exists(os.path.join(d, n))]
        if missing:
            problems.append(f"{d} ({len(missing)} of {len(names)} files missing, e.g. {missing[0]})")
    reply = {"node": _job_metadata()["slurm_node"], "python": sys.executable, "problems": problems}
    write_json_atomic(spec["reply"], reply)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 2 or args[0] not in ("run", "probe"):
        print(f"usage: python -m {MODULE} run SPEC.json | probe PROBE.json", file=sys.stderr)
        return 2
    return run_job(args[1]) if args[0] == "run" else probe(args[1])


if __name__ == "__main__":
    sys.exit(main())
