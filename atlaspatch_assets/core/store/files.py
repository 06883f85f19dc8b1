"""Atomic file and folder writes: a hidden temporary beside the target, then a rename.

Temporaries are named `.<name>.tmp-<pid>-<random>`; a writer killed mid-write leaves one behind,
which the next writer of the same target (or `remove_orphan_temps` on its folder) deletes once
its pid is gone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """A hidden temporary beside `path`, tagged with this process's pid."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphan(p: Path) -> bool:
    pid = p.name.rsplit(TMP_MARK, 1)[-1].split("-", 1)[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def remove_orphan_temps(path: Path) -> None:
    """Delete hidden temporaries of `path` whose writer process is gone (killed mid-write)."""
    for p in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        if is_orphan(p):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def remove_orphans_in(folder: Path, dirs: bool = True) -> int:
    """Delete every orphaned temporary directly inside `folder` (files only unless `dirs`); returns how many."""
    n = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for p in entries:
        if p.name.startswith(".") and TMP_MARK in p.name and (dirs or not p.is_dir()) and is_orphan(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` via a hidden temporary + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dir_atomic(target: Path, files: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
    """Fill a hidden sibling folder, then swap it in: never a half-filled folder at `target`.

    `files` may be a lazy iterable of (name, bytes), so large folders stream through one file at a time.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(target)
    tmp = temp_name(target)
    tmp.mkdir()
    try:
        for name, data in files.items() if isinstance(files, Mapping) else files:
            (tmp / name).write_bytes(data)
        if target.exists():
            old = temp_name(target)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
