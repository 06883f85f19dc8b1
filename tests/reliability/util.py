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
