"""Per-slide HDF5 store, written atomically: new file beside the old one, then os.replace.

HDF5 is not crash-safe when modified in place, so every update copies the objects it keeps
into a hidden temporary file, writes the new datasets and renames it over the old file. A
per-slide file lock serializes concurrent writers (two stages writing one slide both survive).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .base import AttrsUpdate, DatasetWrite, SlideStore
from .files import TMP_MARK, temp_name


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


class H5SlideStore(SlideStore):
    """One slide's HDF5 file (`patches/<slide_id>.h5`)."""

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

    def _read_sorted_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f[name][rows] if len(rows) else f[name][:0]

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
        update_attrs: AttrsUpdate | None = None,
    ) -> None:
        with self.lock():
            self._cleanup_stale_temps()
            tmp = temp_name(self.path)
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
                    extra = dict(file_attrs or {})
                    if update_attrs is not None:
                        extra.update(update_attrs({k: _decode(v) for k, v in dst.attrs.items()}))
                    for k, v in extra.items():
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
