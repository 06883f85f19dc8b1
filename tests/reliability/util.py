"""Helpers shared by the reliability tests: subprocesses of the CLI / a Dagster job, the catalog and
the leftovers (temporaries) of a run folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from atlaspatch_assets.core.catalog import EVENTS, Catalog
from atlaspatch_assets.core.store.files import TMP_MARK

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
ROOT = os.geteuid() == 0


def env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child: this checkout first on PYTHONPATH (and tests/, for helpers)."""
    e = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    e["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        e["DAGSTER_HOME"] = str(home)
    e.update(extra)
    return e


DROP_CAPS = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")


def can_drop_privileges() -> bool:
    return not ROOT or shutil.which(DROP_CAPS[0]) is not None


def unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` without root's power to read any file (so a mode-000 file really is unreadable)."""
    return [*DROP_CAPS, *cmd] if ROOT else cmd


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "atlaspatch_assets.cli", *args]


def job_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "reliability.dagster_job", *args]


def run(cmd: list[str], child_env: dict[str, str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def events(output: Path) -> list[dict[str, Any]]:
    cat = Catalog(output / "catalog")
    return cat.read(EVENTS).to_pylist() if cat.exists() else []


def slide_paths(output: Path) -> dict[str, str]:
    """slide id → path, from the catalog."""
    return Catalog(output / "catalog").slide_paths()


def temporaries(folder: Path) -> list[Path]:
    """Hidden temporaries of atomic writes anywhere under `folder` (store, catalog, GeoJSON …)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".") and (TMP_MARK in p.name or ".tmp" in p.name))


def dagster_records(home: Path, run_id: str) -> list[Any]:
    """Every event-log record of a run, as the UI reads them."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_records_for_run(run_id, limit=100_000).records)


class Child:
    """A child process whose output (stdout + stderr merged) is collected by a thread, so the test
    can wait for a line (e.g. the patches bar) and then signal it."""

    def __init__(self, cmd: list[str], child_env: dict[str, str]):
        import threading

        self.proc = subprocess.Popen(
            cmd, env=child_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
        )
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        import codecs

        assert self.proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            with self._lock:
                self.text += decoder.decode(chunk, final=not chunk)
            if not chunk:
                return

    def wait_for(self, pattern: str, timeout: float = 300) -> Any:
        """The first match of `pattern` in the plain output (see `plain`)."""
        import re
        import time

        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = rx.search(self.plain)
            if m:
                return m
            if self.proc.poll() is not None:
                self._thread.join(5)
                m = rx.search(self.plain)
                if m:
                    return m
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.text[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(10)
        return rc

    @property
    def plain(self) -> str:
        """The output without terminal control sequences; carriage returns count as line ends."""
        import re

        with self._lock:
            text = self.text
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
