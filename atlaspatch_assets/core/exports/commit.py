"""A slide's files written all or nothing, and the writers of the formats the layouts use.

Every file goes to a hidden temporary beside its target (the store's `temp_name`); only when all are
written and synced are they renamed into place, in plan order (payloads before the sidecar that
certifies them), so a reader never sees half of a slide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store.files import fsync_file, remove_orphan_temps, temp_name
from .report import describe

Writer = Callable[[Path], None]


@dataclass
class Plan:
    path: Path
    write: Writer


def commit(plans: Sequence[Plan]) -> list[Path]:
    """Write every file to a hidden temp beside its target, then rename all into place (in order).

    Nothing is renamed until every file is written; on any error all temps are removed and, if a rename
    failed midway, the files this commit created are removed again (files it replaced cannot come back).
    """
    temps: list[tuple[Path, Path, bool]] = []
    renamed: list[tuple[Path, bool]] = []
    try:
        for plan in plans:
            plan.path.parent.mkdir(parents=True, exist_ok=True)
            remove_orphan_temps(plan.path)
            tmp = temp_name(plan.path)
            temps.append((tmp, plan.path, plan.path.exists()))
            plan.write(tmp)
            fsync_file(tmp)
        for tmp, final, existed in temps:
            os.replace(tmp, final)
            renamed.append((final, existed))
    except BaseException:
        if len(renamed) < len(temps):
            for final, existed in renamed:
                if not existed:
                    final.unlink(missing_ok=True)
        raise
    finally:
        for tmp, _, _ in temps:
            tmp.unlink(missing_ok=True)
    return [p.path for p in plans]


def commit_or_skip(
    plans: Sequence[Plan], fingerprint: str, exported: Callable[[], str | None], force: bool
) -> tuple[str, str]:
    """("skipped", "") when every file exists and `exported()` reads `fingerprint` back (unless `force`),
    else commit: ("done", "") or ("failed", why) — disk full, permissions…: nothing of it is left."""
    if not force and all(p.path.is_file() for p in plans) and exported() == fingerprint:
        return "skipped", ""
    try:
        commit(plans)
    except Exception as e:
        return "failed", describe(e)
    return "done", ""


# -- serialization --------------------------------------------------------------------------------


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n").encode()


def plain(o: Any) -> Any:
    """YAML-safe copy (numpy scalars/arrays, tuples, paths → plain types)."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return o


# -- writers (each fills the temporary path it is given) ------------------------------------------


def bytes_writer(data: bytes) -> Writer:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def json_writer(obj: Any) -> Writer:
    return bytes_writer(json_bytes(obj))


def torch_writer(array: np.ndarray) -> Writer:
    def write(tmp: Path) -> None:
        import torch

        with open(tmp, "wb") as fh:
            torch.save(torch.from_numpy(np.ascontiguousarray(array, np.float32)), fh)

    return write


def save_npz(fh: Any, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez_compressed(fh, **arrays)


def npz_writer(arrays: Mapping[str, np.ndarray]) -> Writer:
    def write(tmp: Path) -> None:
        from . import save_npz as save  # looked up on the package per call: tests replace it to fake a full disk

        with open(tmp, "wb") as fh:
            save(fh, arrays)

    return write
