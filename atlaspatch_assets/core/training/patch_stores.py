"""Training patch stores: PNG folders, HDF5 files and an LMDB database, one writer and one reader per
kind behind one small interface (`patch_dataset.PatchStoreDataset` is the torch Dataset over any of them;
this module does not import torch, so the CLI and the Dagster assets load fast).

On disk (DEST = `--dest`, default `<run>/patch_stores/<kind>/`):

    png    DEST/index.json  DEST/<slide_id>/<slide_id>_x<x>_y<y>.png  + patches.csv (one row per patch)
           + export.json (slide metadata and fingerprint); the folder is swapped in whole (`write_dir_atomic`)
    hdf5   DEST/index.json  DEST/<slide_id>.h5: patches uint8 (N, H, W, 3) chunked one patch per chunk,
           coords int32 (N, 2), slide_id (N,), tissue_fraction float32 (N,), index int64 (N,) (row in the
           slide store's coords), label (N,) when labelled; slide metadata and fingerprint in the file attrs;
           written to a hidden temporary and renamed
    lmdb   DEST/data.mdb: `patch/<slide_id>/<k:08d>` → PNG or JPEG bytes, `meta/<slide_id>/<k:08d>` → JSON
           record (slide_id, x, y, level, size, mpp, tissue_fraction, index, label), `slide/<slide_id>` →
           JSON done record (n, fingerprint, metadata), written last

A slide is part of a store only once complete: PNG/HDF5 by the rename, LMDB by its done record (a
slide's first transaction deletes its old records and done record; readers list slides by done
record, so an interrupted slide is invisible and redone on the next export). `index.json` (PNG,
HDF5) lists the complete slides; the files stay the truth (`PatchStore.rebuild_index`).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from filelock import FileLock

from ... import __version__
from ..errors import UsageError
from ..geometry import PatchGeometry
from ..store.files import fsync_file, remove_orphan_temps, temp_name, write_dir_atomic, write_file_atomic
from ..visualization import png_bytes

log = logging.getLogger("atlaspatch.training")

STORE_VERSION = 1
INDEX = "index.json"
LMDB_DATA = "data.mdb"
MAX_MAP_DOUBLINGS = 40  # MapFullError: double the map this many times at most per transaction
LMDB_TXN_BYTES = 64 << 20  # encoded bytes per LMDB write transaction (bounds the writer's memory)


class PatchStoreError(UsageError):
    """The store as a whole cannot be used (unwritable destination, another kind of store there)."""


# -- what one slide contributes ------------------------------------------------------------------


@dataclass
class SlidePatches:
    """One slide's patches for a store: per-patch metadata, a stream of pixel batches and a fingerprint."""

    slide_id: str
    wsi_path: str
    geometry: PatchGeometry
    coords: np.ndarray  # int32 (n, 2) level-0 top-left
    index: np.ndarray  # int64 (n,) rows in the slide store's coords
    tissue_fraction: np.ndarray  # float32 (n,)
    fingerprint: str
    batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # (positions, uint8 (B, H, W, 3)), in order
    label: Any = None
    label_raw: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (recipe hash, exported_at, …)

    @property
    def n(self) -> int:
        return int(len(self.coords))

    def slide_meta(self) -> dict[str, Any]:
        """Metadata shared by every patch of the slide (stored once per slide)."""
        g = self.geometry
        meta = {
            "slide_id": self.slide_id,
            "wsi_path": self.wsi_path,
            "level": g.read_level,
            "read_size": g.read_size,
            "size": g.patch_size,
            "size_level0": g.patch_size_level0,
            "mpp": g.target_mpp,
            "slide_mpp": g.slide_mpp,
            "n": self.n,
            "fingerprint": self.fingerprint,
            "software_version": __version__,
            **self.extra,
        }
        if self.label is not None:
            meta.update(label=self.label, label_name=self.label_raw)
        return meta

    def record(self, k: int) -> dict[str, Any]:
        """Patch k's metadata: slide, x, y, level, size, mpp, tissue fraction, index, label."""
        g = self.geometry
        rec = {
            "slide_id": self.slide_id,
            "x": int(self.coords[k, 0]),
            "y": int(self.coords[k, 1]),
            "level": g.read_level,
            "size": g.patch_size,
            "mpp": g.target_mpp,
            "tissue_fraction": float(self.tissue_fraction[k]),
            "index": int(self.index[k]),
        }
        if self.label is not None:
            rec["label"] = self.label
        return rec

    def patch_name(self, k: int) -> str:
        """The seed's PNG name: `<slide>_x<x>_y<y>.png`."""
        return f"{self.slide_id}_x{int(self.coords[k, 0])}_y{int(self.coords[k, 1])}.png"


# -- image codecs ----------------------------------------------------------------------------------


def encode_image(rgb: np.ndarray, encoding: str, quality: int = 95) -> bytes:
    if encoding == "png":
        return png_bytes(rgb)
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=int(quality), colorspace="RGB")


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 of PNG or JPEG bytes; ValueError for anything else or a corrupt image."""
    if data[:2] == b"\xff\xd8":
        import simplejpeg

        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("not a decodable PNG/JPEG image")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


# -- the interface -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideEntry:
    """A complete slide of a store: `n` patches, the fingerprint it was written with."""

    slide_id: str
    n: int
    fingerprint: str


class PatchReader(ABC):
    """Random access to one store's patches (one per process: opened lazily, never pickled open)."""

    def __init__(self, root: Path, entries: Sequence[SlideEntry]):
        self.root = root
        self.entries = list(entries)
        self.offsets = np.cumsum([0] + [e.n for e in self.entries], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[SlideEntry, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"patch {i} out of range (0..{len(self) - 1})")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.entries[s], int(i - self.offsets[s])

    @abstractmethod
    def get(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(RGB uint8 (H, W, 3), metadata record) of patch i."""

    def close(self) -> None:  # noqa: B027 -- optional: most readers hold nothing to release
        """Release open files."""


class PatchStore(ABC):
    """One kind of patch store at `root`: per-slide atomic writes, skip by fingerprint, a reader."""

    kind: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, root: str | Path, **options: Any):
        self.root = Path(root)
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @abstractmethod
    def prepare(self) -> None:
        """Create the store (or check the one there) before any slide: PatchStoreError when it cannot be written."""

    @abstractmethod
    def write_slide(self, sp: SlidePatches) -> list[str]:
        """Replace the slide's patches, atomically; returns the paths written."""

    @abstractmethod
    def remove_slide(self, slide_id: str) -> None:
        """Drop a slide (e.g. its coordinates now have 0 patches)."""

    @abstractmethod
    def entries(self) -> list[SlideEntry]:
        """The complete slides, sorted by id."""

    @abstractmethod
    def exported_fingerprint(self, slide_id: str) -> str | None:
        """The fingerprint the slide was written with (None when absent or incomplete)."""

    @abstractmethod
    def reader(self, entries: Sequence[SlideEntry]) -> PatchReader: ...

    def fingerprint_options(self) -> dict[str, Any]:
        """Options that change what is stored (part of each slide's fingerprint)."""
        return {}

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = temp_name(self.root / ".write-probe")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise PatchStoreError(
                f"cannot write the {self.kind} patch store at {self.root}: {e.strerror or e} "
                "(read-only or full disk, or not a folder: choose another --dest)"
            ) from e


# -- PNG and HDF5: one file/folder per slide plus index.json ------------------------------------------


class IndexedStore(PatchStore):
    """A file or folder per slide, renamed into place, and `index.json` listing the complete ones."""

    @abstractmethod
    def slide_path(self, slide_id: str) -> Path: ...

    @abstractmethod
    def read_fingerprint(self, slide_id: str) -> tuple[str, int] | None:
        """(fingerprint, n) from the slide's own file, None when absent or unreadable."""

    @property
    def index_path(self) -> Path:
        return self.root / INDEX

    def prepare(self) -> None:
        self._check_writable()
        kind = detect_kind(self.root)
        if kind not in (None, self.kind):
            raise PatchStoreError(f"{self.root} holds a {kind} patch store, not {self.kind}: choose another --dest")
        if not self.index_path.exists():
            self._update_index({})

    def _load_index(self) -> dict[str, Any]:
        try:
            data = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {"kind": self.kind, "version": STORE_VERSION, "slides": {}}
        return data if isinstance(data, dict) and isinstance(data.get("slides"), dict) else {"slides": {}}

    def _update_index(self, changes: dict[str, SlideEntry | None]) -> None:
        """Apply `changes` (slide → entry, None = remove) under the store's lock (concurrent exporters)."""
        with FileLock(str(self.root / f".{INDEX}.lock"), timeout=600):
            index = self._load_index()
            slides = index["slides"]
            for sid, e in changes.items():
                if e is None:
                    slides.pop(sid, None)
                else:
                    slides[sid] = {"n": e.n, "fingerprint": e.fingerprint, "path": self.slide_path(sid).name}
            index.update(kind=self.kind, version=STORE_VERSION, slides=dict(sorted(slides.items())))
            write_file_atomic(self.index_path, (json.dumps(index, indent=1) + "\n").encode())

    def note(self, sp: SlidePatches) -> None:
        """Make sure the index lists a slide that is already stored (a crash between rename and index update)."""
        listed = self._load_index()["slides"].get(sp.slide_id) or {}
        if listed.get("fingerprint") != sp.fingerprint:
            self._update_index({sp.slide_id: SlideEntry(sp.slide_id, sp.n, sp.fingerprint)})

    def entries(self) -> list[SlideEntry]:
        slides = self._load_index()["slides"]
        return [SlideEntry(s, int(v["n"]), str(v["fingerprint"])) for s, v in sorted(slides.items())]

    def exported_fingerprint(self, slide_id: str) -> str | None:
        got = self.read_fingerprint(slide_id)
        return got[0] if got else None

    def rebuild_index(self) -> list[SlideEntry]:
        """Rewrite index.json from the slides' own files (the truth)."""
        found = {}
        for p in sorted(self.root.iterdir()):
            sid = self.slide_id_of(p)
            got = self.read_fingerprint(sid) if sid else None
            if sid and got:
                found[sid] = SlideEntry(sid, got[1], got[0])
        stale: dict[str, SlideEntry | None] = {s: None for s in self._load_index()["slides"] if s not in found}
        self._update_index({**stale, **found})
        return self.entries()

    @abstractmethod
    def slide_id_of(self, path: Path) -> str | None:
        """The slide id of an entry of the store's folder (None: not a slide's file)."""

    def remove_slide(self, slide_id: str) -> None:
        path = self.slide_path(slide_id)
        self._update_index({slide_id: None})
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class PngStore(IndexedStore):
    kind = "png"
    summary = "a folder of <slide>_x<x>_y<y>.png per slide (+ patches.csv)"
    CSV = "patches.csv"
    META = "export.json"
    COLUMNS = ("file", "slide_id", "x", "y", "level", "size", "mpp", "tissue_fraction", "index", "label")

    def slide_path(self, slide_id: str) -> Path:
        return self.root / slide_id

    def slide_id_of(self, path: Path) -> str | None:
        return path.name if path.is_dir() and not path.name.startswith(".") else None

    def read_fingerprint(self, slide_id: str) -> tuple[str, int] | None:
        try:
            meta = json.loads((self.slide_path(slide_id) / self.META).read_text())
            return str(meta["fingerprint"]), int(meta["n"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _files(self, sp: SlidePatches) -> Iterator[tuple[str, bytes]]:
        for pos, batch in sp.batches():
            for k, rgb in zip(pos.tolist(), batch, strict=True):
                yield sp.patch_name(k), png_bytes(rgb)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.COLUMNS)
        for k in range(sp.n):
            r = sp.record(k)
            w.writerow([sp.patch_name(k), *(r.get(c, "") for c in self.COLUMNS[1:])])
        yield self.CSV, buf.getvalue().encode()
        yield self.META, (json.dumps(sp.slide_meta(), indent=1, default=str) + "\n").encode()  # last: the seal

    def write_slide(self, sp: SlidePatches) -> list[str]:
        write_dir_atomic(self.slide_path(sp.slide_id), self._files(sp))
        self._update_index({sp.slide_id: SlideEntry(sp.slide_id, sp.n, sp.fingerprint)})
        return [str(self.slide_path(sp.slide_id))]

    def reader(self, entries: Sequence[SlideEntry]) -> PatchReader:
        return PngReader(self.root, entries)


class PngReader(PatchReader):
    """Each slide's patches.csv is read on first use, as column arrays (not a dict per patch)."""

    def __init__(self, root: Path, entries: Sequence[SlideEntry]):
        super().__init__(root, entries)
        self._columns: dict[str, dict[str, np.ndarray]] = {}

    def _manifest(self, slide_id: str) -> dict[str, np.ndarray]:
        cols = self._columns.get(slide_id)
        if cols is None:
            with open(self.root / slide_id / PngStore.CSV, newline="") as fh:
                rows = list(csv.reader(fh))
            header, body = rows[0], rows[1:]
            cols = self._columns[slide_id] = {h: np.array([r[j] for r in body]) for j, h in enumerate(header)}
        return cols

    def get(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        e, k = self.locate(i)
        c = self._manifest(e.slide_id)
        rgb = decode_image((self.root / e.slide_id / str(c["file"][k])).read_bytes())
        meta: dict[str, Any] = {"slide_id": e.slide_id}
        for name, kind in (("x", int), ("y", int), ("level", int), ("size", int), ("mpp", float)):
            meta[name] = kind(c[name][k])
        meta.update(tissue_fraction=float(c["tissue_fraction"][k]), index=int(c["index"][k]))
        if str(c["label"][k]) != "":
            meta["label"] = _number(str(c["label"][k]))
        return rgb, meta


def _number(s: str) -> int | float:
    try:
        return int(s)
    except ValueError:
        return float(s)


class H5Store(IndexedStore):
    kind = "hdf5"
    summary = "one HDF5 file per slide: patches (N, H, W, 3) + coords, slide ids, tissue fraction"

    def fingerprint_options(self) -> dict[str, Any]:
        return {"compression": self.options.get("compression") or "none"}

    def slide_path(self, slide_id: str) -> Path:
        return self.root / f"{slide_id}.h5"

    def slide_id_of(self, path: Path) -> str | None:
        return path.stem if path.suffix == ".h5" and not path.name.startswith(".") else None

    def read_fingerprint(self, slide_id: str) -> tuple[str, int] | None:
        import h5py

        path = self.slide_path(slide_id)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                return str(f.attrs["fingerprint"]), int(f["patches"].shape[0])
        except (OSError, KeyError, ValueError):
            return None

    def write_slide(self, sp: SlidePatches) -> list[str]:
        import h5py

        path = self.slide_path(sp.slide_id)
        remove_orphan_temps(path)
        tmp = temp_name(path)
        comp = self.options.get("compression")
        comp = None if comp in (None, "", "none") else comp
        n = sp.n
        try:
            f = h5py.File(tmp, "w")
            error: BaseException | None = None
            try:
                _reserve(tmp, _h5_bound(sp))  # a full disk fails here, before HDF5 writes a byte of data
                self._fill(f, sp, comp)
            except BaseException as e:
                # Drop the frames holding the failing file's datasets now, while the file is open: freed
                # after a failed close (disk full), HDF5 objects can crash the process.
                error = e.with_traceback(None)
            try:
                f.close()
            except Exception as e:
                error = error or e.with_traceback(None)
            if error is not None:
                raise error
            h5py.File(tmp, "r+").close()  # reopened, HDF5 truncates the file to its data (drops the reserve)
            fsync_file(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._update_index({sp.slide_id: SlideEntry(sp.slide_id, n, sp.fingerprint)})
        return [str(path)]

    def _fill(self, f: Any, sp: SlidePatches, comp: str | None) -> None:
        import h5py

        ps, n = sp.geometry.patch_size, sp.n
        d = f.create_dataset(
            "patches",
            (n, ps, ps, 3),
            np.uint8,
            chunks=(1, ps, ps, 3) if n else None,  # one patch per chunk: a random read decodes one
            compression=comp if n else None,
        )
        d.attrs["axes"] = "NHWC"
        for pos, batch in sp.batches():
            d[int(pos[0]) : int(pos[-1]) + 1] = batch
        f.create_dataset("coords", data=sp.coords.astype(np.int32).reshape(-1, 2))
        f.create_dataset("slide_id", data=[sp.slide_id] * n, dtype=h5py.string_dtype())
        f.create_dataset("tissue_fraction", data=sp.tissue_fraction.astype(np.float32))
        f.create_dataset("index", data=sp.index.astype(np.int64))
        if sp.label is not None:
            f.create_dataset("label", data=np.full(n, sp.label))
        for k, v in sp.slide_meta().items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
        f.attrs["kind"] = self.kind

    def reader(self, entries: Sequence[SlideEntry]) -> PatchReader:
        return H5Reader(self.root, entries, int(self.options.get("max_open_files") or 64))


def _h5_bound(sp: SlidePatches) -> int:
    """Bytes a slide's HDF5 file can take at most: the raw patches (compression may add ~0.1 %), per-patch
    metadata and chunk index, and slack for the file's own structures."""
    ps = sp.geometry.patch_size
    return int(sp.n * ps * ps * 3 * 1.01) + sp.n * 1024 + (1 << 20)


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate `nbytes` of disk for `path` now (ENOSPC / EFBIG here, not inside HDF5's writes: HDF5
    handles a write failure badly, up to crashing the process when its objects are freed)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        log.debug(f"{path}: no space reservation ({e}); a full disk surfaces in HDF5's writes")
    finally:
        os.close(fd)


class H5Reader(PatchReader):
    """Per-slide files opened on demand, at most `max_open` at once (LRU)."""

    def __init__(self, root: Path, entries: Sequence[SlideEntry], max_open: int = 64):
        super().__init__(root, entries)
        self.max_open = max(1, max_open)
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _file(self, slide_id: str) -> Any:
        import h5py

        f = self._open.get(slide_id)
        if f is None:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            f = self._open[slide_id] = h5py.File(self.root / f"{slide_id}.h5", "r")
        self._open.move_to_end(slide_id)
        return f

    def get(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        e, k = self.locate(i)
        f = self._file(e.slide_id)
        a = f.attrs
        x, y = (int(v) for v in f["coords"][k])
        meta: dict[str, Any] = {
            "slide_id": e.slide_id,
            "x": x,
            "y": y,
            "level": int(a["level"]),
            "size": int(a["size"]),
            "mpp": float(a["mpp"]),
            "tissue_fraction": float(f["tissue_fraction"][k]),
            "index": int(f["index"][k]),
        }
        if "label" in f:
            meta["label"] = f["label"][k].item()
        return np.asarray(f["patches"][k]), meta

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


# -- LMDB ---------------------------------------------------------------------------------------------


def _lmdb_key(prefix: str, slide_id: str, k: int | None = None) -> bytes:
    return (f"{prefix}/{slide_id}" + ("" if k is None else f"/{k:08d}")).encode()


class LmdbStore(PatchStore):
    kind = "lmdb"
    summary = "one LMDB database: a PNG/JPEG value and a JSON metadata record per patch"

    def fingerprint_options(self) -> dict[str, Any]:
        enc = self.options.get("encoding") or "png"
        return {"encoding": enc, **({"quality": int(self.options.get("quality") or 95)} if enc == "jpeg" else {})}

    def _open(self, readonly: bool = False) -> Any:
        import lmdb

        map_size = int(self.options.get("map_size_mb") or 1024) << 20
        return lmdb.open(str(self.root), map_size=map_size, readonly=readonly, lock=True, readahead=False, max_dbs=0)

    def prepare(self) -> None:
        self._check_writable()
        kind = detect_kind(self.root)
        if kind not in (None, self.kind):
            raise PatchStoreError(f"{self.root} holds a {kind} patch store, not {self.kind}: choose another --dest")
        try:
            env = self._open()
        except Exception as e:
            raise PatchStoreError(f"cannot open the LMDB patch store at {self.root}: {e}") from e
        env.close()

    def _commit(self, env: Any, puts: Sequence[tuple[bytes, bytes]], delete_slide: str | None = None) -> None:
        """One write transaction (atomic); on MapFullError the map is doubled and the transaction redone."""
        import lmdb

        for _ in range(MAX_MAP_DOUBLINGS):
            try:
                with env.begin(write=True) as txn:
                    if delete_slide is not None:
                        txn.delete(_lmdb_key("slide", delete_slide))  # first: the slide is incomplete from now on
                        for prefix in ("patch", "meta"):
                            _delete_prefix(txn, _lmdb_key(prefix, delete_slide) + b"/")
                    for k, v in puts:
                        txn.put(k, v)
                return
            except lmdb.MapFullError:
                size = int(env.info()["map_size"]) * 2
                log.info(f"{self.root}: LMDB map full, growing it to {size >> 20} MiB")
                env.set_mapsize(size)
        raise lmdb.MapFullError(f"{self.root}: map still full after {MAX_MAP_DOUBLINGS} doublings")

    def write_slide(self, sp: SlidePatches) -> list[str]:
        import lmdb

        try:
            return self._write_slide(sp)
        except lmdb.Error as e:  # disk full, I/O error…: an OSError like the other kinds' (one-line failure)
            raise OSError(f"LMDB {e}") from e

    def _write_slide(self, sp: SlidePatches) -> list[str]:
        enc = self.fingerprint_options()
        env = self._open()
        try:
            self._commit(env, [], delete_slide=sp.slide_id)
            puts: list[tuple[bytes, bytes]] = []
            size = 0
            for pos, batch in sp.batches():
                for k, rgb in zip(pos.tolist(), batch, strict=True):
                    value = encode_image(rgb, enc["encoding"], enc.get("quality", 95))
                    puts.append((_lmdb_key("patch", sp.slide_id, k), value))
                    puts.append((_lmdb_key("meta", sp.slide_id, k), json.dumps(sp.record(k)).encode()))
                    size += len(value)
                if size >= LMDB_TXN_BYTES:
                    self._commit(env, puts)
                    puts, size = [], 0
            meta = {**sp.slide_meta(), **enc}
            puts.append((_lmdb_key("slide", sp.slide_id), json.dumps(meta, default=str).encode()))
            self._commit(env, puts)  # the done record commits with the last patches
        finally:
            env.close()
        return [str(self.root / LMDB_DATA)]

    def remove_slide(self, slide_id: str) -> None:
        if not (self.root / LMDB_DATA).exists():
            return
        env = self._open()
        try:
            self._commit(env, [], delete_slide=slide_id)
        finally:
            env.close()

    def _records(self) -> dict[str, dict[str, Any]]:
        if not (self.root / LMDB_DATA).exists():
            return {}
        env = self._open(readonly=True)
        try:
            with env.begin() as txn:
                cur = txn.cursor()
                prefix = b"slide/"
                out = {}
                if cur.set_range(prefix):
                    for k, v in cur:
                        if not k.startswith(prefix):
                            break
                        out[k[len(prefix) :].decode()] = json.loads(v)
                return out
        finally:
            env.close()

    def entries(self) -> list[SlideEntry]:
        return [SlideEntry(s, int(r["n"]), str(r["fingerprint"])) for s, r in sorted(self._records().items())]

    def exported_fingerprint(self, slide_id: str) -> str | None:
        if not (self.root / LMDB_DATA).exists():
            return None
        env = self._open(readonly=True)
        try:
            with env.begin() as txn:
                v = txn.get(_lmdb_key("slide", slide_id))
        finally:
            env.close()
        return None if v is None else str(json.loads(v).get("fingerprint"))

    def reader(self, entries: Sequence[SlideEntry]) -> PatchReader:
        return LmdbReader(self.root, entries, bool(self.options.get("lock", True)))


def _delete_prefix(txn: Any, prefix: bytes) -> None:
    cur = txn.cursor()
    if not cur.set_range(prefix):
        return
    while cur.key().startswith(prefix):
        if not cur.delete():
            break


class LmdbReader(PatchReader):
    def __init__(self, root: Path, entries: Sequence[SlideEntry], lock: bool = True):
        super().__init__(root, entries)
        import lmdb

        self.env = lmdb.open(str(root), readonly=True, lock=lock, readahead=False, meminit=False, max_dbs=0)

    def get(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        import lmdb

        e, k = self.locate(i)
        try:
            value, meta = self._values(e.slide_id, k)
        except lmdb.MapResizedError:  # a writer grew the map since this reader opened it
            self.env.set_mapsize(0)
            value, meta = self._values(e.slide_id, k)
        if value is None or meta is None:
            raise KeyError(f"{self.root}: patch {k} of {e.slide_id} is missing (slide re-exported meanwhile?)")
        return decode_image(value), json.loads(meta)

    def _values(self, slide_id: str, k: int) -> tuple[bytes | None, bytes | None]:
        with self.env.begin() as txn:
            return txn.get(_lmdb_key("patch", slide_id, k)), txn.get(_lmdb_key("meta", slide_id, k))

    def close(self) -> None:
        self.env.close()


# -- kinds, detection ---------------------------------------------------------------------------------

STORES: dict[str, type[PatchStore]] = {c.kind: c for c in (PngStore, H5Store, LmdbStore)}
STORE_KINDS = tuple(STORES)


def detect_kind(root: str | Path) -> str | None:
    """The kind of the patch store at `root` (None when there is none)."""
    root = Path(root)
    if (root / LMDB_DATA).is_file():
        return "lmdb"
    try:
        kind = json.loads((root / INDEX).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in STORES else None


def open_patch_store(root: str | Path, kind: str | None = None, **options: Any) -> PatchStore:
    """The store at `root` (its kind detected unless given)."""
    kind = kind or detect_kind(root)
    if kind is None:
        raise PatchStoreError(f"no patch store at {root} (write one with `atlaspatch export-patches`)")
    if kind not in STORES:
        raise PatchStoreError(f"unknown patch store kind {kind!r}; choose one of {', '.join(STORES)}")
    return STORES[kind](root, **options)
