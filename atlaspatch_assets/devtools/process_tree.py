"""Stopping the process trees we started (Dagster webserver/daemon in tests and benchmarks).

Each process is started in its own session (process group); stopping sends SIGTERM to every
group and to every descendant seen while it ran (code servers, run workers that may have left
the group), waits, then SIGKILLs by PID what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable, MutableMapping

import psutil


def record_descendants(procs: Iterable[subprocess.Popen], seen: MutableMapping[int, psutil.Process]) -> None:
    """Add every current descendant of `procs` to `seen` (pid -> process)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(p.pid).children(recursive=True):
                seen.setdefault(c.pid, c)


def stop_process_groups(
    procs: Iterable[subprocess.Popen],
    seen: MutableMapping[int, psutil.Process],
    term_timeout: float = 45.0,
    kill_timeout: float = 15.0,
) -> list[str]:
    """SIGTERM each group and recorded descendant, wait, SIGKILL by PID; return the survivors."""
    procs = list(procs)
    record_descendants(procs, seen)
    targets: list[psutil.Process] = list(seen.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            targets.append(psutil.Process(p.pid))
    for p in procs:  # the whole group: SIGTERM lets the daemon stop its threads
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    for t in targets:
        with contextlib.suppress(psutil.Error):
            t.terminate()
    _, alive = psutil.wait_procs(targets, timeout=term_timeout)
    for t in alive:
        with contextlib.suppress(psutil.Error):
            t.kill()
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=kill_timeout)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=kill_timeout)
    survivors = []
    for t in targets:
        with contextlib.suppress(psutil.Error):
            if t.is_running() and t.status() != psutil.STATUS_ZOMBIE:
                survivors.append(f"{t.pid} {' '.join(t.cmdline())[:120]}")
    return survivors
