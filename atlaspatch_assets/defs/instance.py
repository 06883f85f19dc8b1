"""The Dagster instance a process outside `dagster dev` (the CLI, scripts) runs on."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DagsterInstance
from filelock import FileLock

LOCK_NAME = ".atlaspatch-instance.lock"


def open_instance() -> DagsterInstance:
    """The $DAGSTER_HOME instance when set (runs visible in the UI), else an ephemeral one.

    Creating an instance on a fresh home creates its SQLite schema; two processes doing that at
    once (two CLI runs, a CLI run beside a script) race on alembic's version row and one fails.
    The creation is serialized by a file lock in the home; later openers find the schema there.
    """
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return DagsterInstance.ephemeral()
    Path(home).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(home) / LOCK_NAME), timeout=300):
        return DagsterInstance.get()
