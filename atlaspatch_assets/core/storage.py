"""Per-slide HDF5 store, written atomically: new file beside the old one, then os.replace.

HDF5 is not crash-safe when modified in place, so every update copies the objects it keeps
into a hidden temporary file, writes the new datasets and renames it over the old file. A
per-slide file lock serializes concurrent writers (two stages writing one slide both survive).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from filelock import FileLock

TMP_MARK = ".tmp-"


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able recipe (geometry + parameters)."""
    blob = json.dumps(recipe, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class DatasetWrite:
    data: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    compression: str | None = None
    chunk_rows: int | None = None  # chunk along axis 0 (e.g. --write-batch rows)


def _attr_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)) and not (
        isinstance(v, (list, tuple)) and v and all(isinstance(i, (int, float)) for i in v)
    ):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, Path):
        return str(v)
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_temps(path: Path) -> None:
    """Delete hidden temp files of `path` whose writer process is gone (killed mid-write)."""
    for p in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` via a hidden temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class SlideStore:
    """One slide's HDF5 file (`patches/<slide_id>.h5`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    @contextmanager
    def lock(self, timeout: float = 600.0) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=timeout):
            yield

    def exists(self) -> bool:
        return self.path.is_file()

    # -- reading ---------------------------------------------------------------------------
    def attrs(self) -> dict[str, Any]:
        if not self.exists():
            return {}
        with h5py.File(self.path, "r") as f:
            return {k: _decode(v) for k, v in f.attrs.items()}

    def has(self, name: str) -> bool:
        if not self.exists():
            return False
        with h5py.File(self.path, "r") as f:
            return name in f

    def read(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        with h5py.File(self.path, "r") as f:
            ds = f[name]
            return ds[()], {k: _decode(v) for k, v in ds.attrs.items()}

    def dataset_attrs(self, name: str) -> dict[str, Any]:
        if not self.exists():
            return {}
        with h5py.File(self.path, "r") as f:
            if name not in f:
                return {}
            return {k: _decode(v) for k, v in f[name].attrs.items()}

    def names(self) -> list[str]:
        if not self.exists():
            return []
        out: list[str] = []
        with h5py.File(self.path, "r") as f:
            f.visit(lambda n: out.append(n) if isinstance(f[n], h5py.Dataset) else None)
        return out

    # -- writing ---------------------------------------------------------------------------
    def write(
        self,
        datasets: Mapping[str, DatasetWrite],
        file_attrs: Mapping[str, Any] | None = None,
        delete: Iterable[str] = (),
    ) -> None:
        """Replace/add `datasets` (and file attrs), keep everything else; atomic and locked."""
        with self.lock():
            self._cleanup_stale_temps()
            tmp = self.path.with_name(f".{self.path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            drop = set(datasets) | set(delete)
            try:
                with h5py.File(tmp, "w", libver="latest") as dst:
                    if self.exists():
                        with h5py.File(self.path, "r") as src:
                            _copy_except(src, dst, drop)
                            for k, v in src.attrs.items():
                                dst.attrs[k] = v
                    for name, dw in datasets.items():
                        if name in dst:
                            del dst[name]
                        chunks = None
                        if dw.chunk_rows and dw.data.ndim >= 1 and len(dw.data):
                            chunks = (min(dw.chunk_rows, len(dw.data)), *dw.data.shape[1:])
                        ds = dst.create_dataset(name, data=dw.data, compression=dw.compression, chunks=chunks)
                        for k, v in dw.attrs.items():
                            ds.attrs[k] = _attr_value(v)
                    for k, v in (file_attrs or {}).items():
                        dst.attrs[k] = _attr_value(v)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def _cleanup_stale_temps(self) -> None:
        """Remove temp files left by killed writers (we hold the lock: none is live)."""
        for p in self.path.parent.glob(f".{self.path.name}{TMP_MARK}*"):
            p.unlink(missing_ok=True)


def _copy_except(src: h5py.Group, dst: h5py.Group, drop: set[str], prefix: str = "") -> None:
    for k in src:
        name = f"{prefix}{k}"
        if name in drop:
            continue
        obj = src[k]
        if isinstance(obj, h5py.Group):
            if any(d.startswith(name + "/") for d in drop):
                g = dst.require_group(k)
                for ak, av in obj.attrs.items():
                    g.attrs[ak] = av
                _copy_except(obj, g, drop, name + "/")
            else:
                src.copy(obj, dst, name=k)
        else:
            src.copy(obj, dst, name=k)
