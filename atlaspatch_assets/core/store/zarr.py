"""Per-slide Zarr v3 store (`zarr/<slide_id>.zarr/`): one directory per array, readable with plain
`zarr.open_group` (no project code), holding exactly the datasets and attributes of the HDF5 store.

    <slide_id>.zarr/zarr.json                 root group; its attributes are the file attrs
    <slide_id>.zarr/coords/{zarr.json,c/…}    one array (metadata + attrs + chunks) per dataset
    <slide_id>.zarr/features/zarr.json        plain groups for the "/" in dataset names
    <slide_id>.zarr/features/<encoder>/…

A write is staged, then committed:

1. Outside the lock, every new array is written (compressed, fsynced) into a hidden staging folder
   beside the store, `.<slide_id>.zarr.tmp-<pid>-<random>/` — concurrent writers stage in parallel.
2. Under the per-slide file lock, the writer recovers what killed writers left (below), computes the
   new file attributes from the current ones, and writes a journal (`commit.json`: which staged
   array goes where, what to delete, the final attributes) into its staging folder, atomically.
3. Each array directory is renamed into place (the old one moved into the staging folder), then the
   root `zarr.json` is replaced (atomically) — the group metadata last. The journal is removed,
   the lock released and the staging folder (with the old arrays) deleted.

A killed writer leaves no half-written array visible (arrays only appear by a rename of a complete
directory) and never touches arrays it was not writing. Its staging folder stays hidden; the next
writer of the slide deletes it (no journal: nothing was committed) or finishes the commit from the
journal (killed between renames: every array of that write and its attributes end up in place, as
if the commit had not been interrupted). A journal can only exist while its writer holds the lock,
so under the lock every journal found is a dead writer's. Two writers of different arrays stage in
parallel and commit one after the other; neither rewrites the other's arrays.

Metadata is not consolidated: each array's `zarr.json` moves with its chunks in one rename, so it
can never disagree with them, and a plain `zarr.open_group` finds every array by listing folders.
A reader racing a commit may see some of that commit's arrays before the others (never a partial
array); stages key their reuse on per-array recipe hashes, so that is harmless.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .base import AttrsUpdate, DatasetWrite, SlideStore, attr_view, json_native
from .files import TMP_MARK, is_orphan, temp_name, write_file_atomic

JOURNAL = "commit.json"
GROUP_META = "zarr.json"
CHUNK_BYTES = 2 << 20  # ~2 MiB uncompressed per chunk: whole rows, cheap row ranges, few files
# zstd through Blosc (multi-threaded, byte shuffle): ~13 % smaller on real patch features, and
# fast to decode (benchmarks/bench_store.py).
COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_rows: int | None = None) -> tuple[int, ...]:
    """Whole rows (full extent on the other axes), ~CHUNK_BYTES per chunk, at most `chunk_rows` rows."""
    if not shape:
        return ()
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(1, CHUNK_BYTES // row_bytes)
    if chunk_rows:
        rows = min(rows, chunk_rows)
    return (max(1, min(rows, shape[0])), *(max(1, d) for d in shape[1:]))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of a staged tree before it is renamed into place."""
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ZarrSlideStore(SlideStore):
    """One slide's Zarr v3 group (`zarr/<slide_id>.zarr/`)."""

    def exists(self) -> bool:
        return (self.path / GROUP_META).is_file()

    def _group(self) -> Any:
        return zarr.open_group(self.path, mode="r", zarr_format=3, use_consolidated=False)

    # -- reading ---------------------------------------------------------------------------
    def _raw_attrs(self) -> dict[str, Any]:
        if not self.exists():
            return {}
        return json.loads((self.path / GROUP_META).read_text()).get("attributes", {})

    def attrs(self) -> dict[str, Any]:
        return {k: attr_view(v) for k, v in self._raw_attrs().items()}

    def _array_meta(self, name: str) -> dict[str, Any] | None:
        p = self.path / name / GROUP_META
        if not self.exists() or not p.is_file():
            return None
        meta = json.loads(p.read_text())
        return meta if meta.get("node_type") == "array" else None

    def has(self, name: str) -> bool:
        return self._array_meta(name) is not None

    def read(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        if not self.exists():
            raise KeyError(f"no store at {self.path}")
        arr = self._group()[name]
        if not isinstance(arr, zarr.Array):
            raise KeyError(f"{name} is a group, not a dataset")
        return np.asarray(arr[...]), {k: attr_view(v) for k, v in arr.attrs.items()}

    def _read_sorted_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        arr = self._group()[name]
        return np.asarray(arr.get_orthogonal_selection((rows, *(slice(None),) * (arr.ndim - 1))))

    def dataset_attrs(self, name: str) -> dict[str, Any]:
        meta = self._array_meta(name)
        return {} if meta is None else {k: attr_view(v) for k, v in meta.get("attributes", {}).items()}

    def names(self) -> list[str]:
        if not self.exists():
            return []
        return sorted(n for n, node in self._group().members(max_depth=None) if isinstance(node, zarr.Array))

    # -- writing ---------------------------------------------------------------------------
    def write(
        self,
        datasets: Mapping[str, DatasetWrite],
        file_attrs: Mapping[str, Any] | None = None,
        delete: Iterable[str] = (),
        update_attrs: AttrsUpdate | None = None,
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stage = temp_name(self.path)
        stage.mkdir()
        try:
            arrays = []
            for i, (name, dw) in enumerate(datasets.items()):
                _write_array(stage / f"new{i}", dw)
                arrays.append([f"new{i}", name])
            _fsync_tree(stage)
            with self.lock():
                self._recover()
                current = self._raw_attrs()
                attrs = {**current, **{k: json_native(v) for k, v in (file_attrs or {}).items()}}
                if update_attrs is not None:
                    extra = update_attrs({k: attr_view(v) for k, v in current.items()})
                    attrs.update({k: json_native(v) for k, v in extra.items()})
                plan = {"arrays": arrays, "delete": [d for d in delete if d not in datasets], "attrs": attrs}
                write_file_atomic(stage / JOURNAL, json.dumps(plan).encode())
                self._apply(stage, plan)
                (stage / JOURNAL).unlink()
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # staged leftovers and the replaced arrays

    def _recover(self) -> None:
        """Under the lock: finish the commits of killed writers (journal), delete their staging."""
        for p in sorted(self.path.parent.glob(f".{self.path.name}{TMP_MARK}*")):
            if (p / JOURNAL).is_file():  # only a lock holder has one: its writer died mid-commit
                self._apply(p, json.loads((p / JOURNAL).read_text()))
                (p / JOURNAL).unlink()
                shutil.rmtree(p, ignore_errors=True)
            elif is_orphan(p):  # staging of a dead writer that never committed
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _apply(self, stage: Path, plan: Mapping[str, Any]) -> None:
        """Rename the staged arrays into place, delete, then the root attributes (idempotent)."""
        self.path.mkdir(exist_ok=True)
        for src_name, name in plan["arrays"]:
            src, dst = stage / src_name, self.path / name
            if not src.exists():
                continue  # moved by an earlier, interrupted run of this commit
            self._ensure_groups(stage, name)
            if dst.exists():
                self._move(dst, stage / f"old-{src_name}")
            self._move(src, dst)
        for i, name in enumerate(plan["delete"]):
            dst = self.path / name
            if dst.exists():
                self._move(dst, stage / f"deleted{i}-{uuid.uuid4().hex[:6]}")
        _write_group(self.path, stage, plan["attrs"])

    def _ensure_groups(self, stage: Path, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = self.path.joinpath(*parts[:i])
            if not (d / GROUP_META).is_file():
                d.mkdir(exist_ok=True)
                _write_group(d, stage, {})

    @staticmethod
    def _move(src: Path, dst: Path) -> None:  # every rename of a commit (a seam for crash tests)
        os.rename(src, dst)


def _write_array(path: Path, dw: DatasetWrite) -> None:
    data = np.ascontiguousarray(dw.data)
    zarr.create_array(
        store=str(path),
        data=data,
        chunks=chunk_shape(data.shape, data.dtype.itemsize, dw.chunk_rows),
        compressors=COMPRESSOR,
        attributes={k: json_native(v) for k, v in dw.attrs.items()},
        zarr_format=3,
    )


def _write_group(folder: Path, stage: Path, attrs: Mapping[str, Any]) -> None:
    """A group's `zarr.json` (made by zarr itself in the staging folder), atomically replaced."""
    tmp = stage / f"group-{uuid.uuid4().hex[:8]}"
    zarr.create_group(str(tmp), attributes=dict(attrs), zarr_format=3)
    _fsync_tree(tmp)
    os.replace(tmp / GROUP_META, folder / GROUP_META)
    shutil.rmtree(tmp, ignore_errors=True)
