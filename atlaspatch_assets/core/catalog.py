"""Append-only Parquet provenance catalog under `<output>/catalog/`.

Layout (hive-free, one flat folder per table)::

    <output>/catalog/
      .compact.lock                          compactors serialize on this file lock
      slides/<time_ns>-<pid>-<uuid>.parquet  one file per append
      events/<time_ns>-<pid>-<uuid>.parquet
      events/<time_ns>-compact-<uuid>.parquet  written by `compact`, replaces many small files
      events/.<name>.<pid>@<host>.tmp        in-flight writes (hidden: ignored by every reader);
                                             one left by a killed writer is removed by the next
                                             writer of that table on the same host

Every append is one new Parquet file with a unique name, written to a hidden temp file and
renamed, so concurrent writers (threads, processes, hosts on a shared POSIX filesystem) never
lose or tear rows. Readers need none of this code::

    duckdb.sql("select * from read_parquet('<output>/catalog/events/*.parquet')")
    pandas.read_parquet("<output>/catalog/events")      # pyarrow skips names starting with '.' or '_'

Compaction (`compact`) guarantees, with writers running at any time:

* no row is ever lost: the merged file is written (temp + fsync + rename) *before* the files it
  merged are unlinked, and it unlinks exactly the files it listed first; files appended while it
  runs are never touched. Two compactors serialize on `<catalog>/.compact.lock`.
* the merged file records the names it replaces in its Parquet footer
  (`atlaspatch.compacted_from`). `Catalog.read` ignores a listed file that is still present, and
  re-reads when a compaction overlapped its directory listing, so readers of this class never see
  a duplicate nor miss a row. Events also carry a unique `event_id` and are de-duplicated on it.
* readers outside this code (DuckDB, pandas) may see the merged rows twice for the few
  milliseconds between the rename and the unlinks (or, after a crash in exactly that window,
  until the next compaction, which deletes the leftovers), and may get a transient "file not
  found" if a file is unlinked between their listing and their read: retry. De-duplicate with
  `select * from read_parquet(...) qualify row_number() over (partition by event_id) = 1`
  for an exact answer at any instant (rows of old files have a null event_id; compaction fills it).

Files written before a column was added lack it; pyarrow/DuckDB/pandas infer the schema from one
file, so run `atlaspatch catalog-compact` once after upgrading (or `union_by_name=true` in DuckDB).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs as pafs

SLIDES = "slides"
EVENTS = "events"
TABLES = (SLIDES, EVENTS)
STATUSES = ("done", "failed", "skipped")
# Display order of the known assets; others follow alphabetically.
ASSET_ORDER = ("inbox", "tissue_mask", "patch_coords")
INTAKE_ASSETS = frozenset({"inbox"})  # the new-slides sensor: not a processing stage

LOCK_NAME = ".compact.lock"
COMPACT_MARK = "-compact-"
LINEAGE_KEY = b"atlaspatch.compacted_from"
PROCESS_LIST_COLUMNS = ("sample_id", "status", "error")  # slide2vec's process_list.csv

_SCHEMAS: dict[str, pa.Schema] = {
    SLIDES: pa.schema(
        [
            ("slide_id", pa.string()),
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.float64()),
            ("fingerprint", pa.string()),
            ("vendor", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("levels", pa.int32()),
            ("mpp", pa.float64()),
            ("mpp_source", pa.string()),
            ("objective", pa.float64()),
            ("time", pa.timestamp("us", tz="UTC")),
        ]
    ),
    EVENTS: pa.schema(
        [
            ("slide_id", pa.string()),
            ("asset", pa.string()),
            ("status", pa.string()),  # done | failed | skipped
            ("error", pa.string()),
            ("recipe_hash", pa.string()),
            ("parameters", pa.string()),  # JSON
            ("output_path", pa.string()),
            ("rows", pa.int64()),
            ("dim", pa.int64()),
            ("seconds", pa.float64()),
            ("run_id", pa.string()),
            ("versions", pa.string()),  # JSON
            ("weights_hash", pa.string()),
            ("time", pa.timestamp("us", tz="UTC")),
            # added later (null in older files):
            ("event_id", pa.string()),  # uuid4 hex, unique per event (de-duplication key)
            ("host", pa.string()),
            ("pid", pa.int64()),
            ("run_folder", pa.string()),  # <mag>x_<patch>px_<overlap>px_overlap: outputs of one geometry
        ]
    ),
}

_HOST = socket.gethostname()
_SWEPT: set[str] = set()  # table folders this process already cleared of dead writers' temporaries
_LOCAL_FS = pafs.LocalFileSystem()
# compacted file path → the names it replaces (files are immutable and names unique)
_LINEAGE: dict[str, tuple[str, ...]] = {}


class CatalogReadError(RuntimeError):
    pass


@dataclass
class CompactionResult:
    table: str
    files_before: int  # visible data files when compaction started
    files_merged: int  # of those, merged into `path`
    files_removed: int  # unlinked (merged + leftovers of an interrupted compaction)
    rows: int  # rows in the merged file
    path: Path | None = None  # the new file (None: nothing to merge)
    stale_temps_removed: int = 0
    removed: list[str] = field(default_factory=list, repr=False)


def fingerprint(path: str | Path) -> str:
    """Cheap content fingerprint: size + mtime + the first and last 64 KiB."""
    import hashlib

    p = Path(path)
    st = p.stat()
    h = hashlib.sha1(f"{st.st_size}".encode())
    with open(p, "rb") as fh:
        h.update(fh.read(65536))
        if st.st_size > 65536:
            fh.seek(max(0, st.st_size - 65536))
            h.update(fh.read(65536))
    return h.hexdigest()[:16]


def schema(table: str) -> pa.Schema:
    return _SCHEMAS[table]


def _is_data_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(
    d: Path, name: str, tbl: pa.Table, durable: bool = False, kv: Mapping[str, str] | None = None
) -> Path:
    """`tbl` as `d/name`, all or nothing: a hidden temporary (ignored by every reader), then a rename."""
    tmp = d / f".{name}.{os.getpid()}@{_HOST}.tmp"  # whose it is: a dead writer's is swept (_sweep_orphans)
    try:
        with open(tmp, "wb") as fh:
            with pq.ParquetWriter(fh, tbl.schema) as w:
                w.write_table(tbl)
                if kv:  # footer key-value metadata (not copied into the Arrow schema blob)
                    w.add_key_value_metadata(dict(kv))
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, d / name)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync_dir(d)
    return d / name


def append_file(d: Path, tbl: pa.Table, durable: bool = False) -> Path:
    """One append of an append-only Parquet table folder: a new file with a unique, time-ordered name."""
    d.mkdir(parents=True, exist_ok=True)
    if str(d) not in _SWEPT:  # once per process and folder: temporaries of killed writers
        _sweep_orphans(d)
        _SWEPT.add(str(d))
    name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
    return write_parquet_atomic(d, name, tbl, durable)


class Catalog:
    def __init__(self, root: str | Path, fsync: bool = False):
        """`fsync=True` makes each append durable across power loss (a few ms per event)."""
        self.root = Path(root)
        self.fsync = fsync

    # -- writing ----------------------------------------------------------------------------

    def append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write `rows` as one new Parquet file (all or nothing). Returns its path."""
        if not rows:
            return None
        schema = _SCHEMAS[table]
        now = datetime.now(timezone.utc)
        defaults: dict[str, Any] = {"time": now}
        if table == EVENTS:
            defaults.update(host=_HOST, pid=os.getpid())
        cols: dict[str, list[Any]] = {f.name: [] for f in schema}
        for r in rows:
            for f in schema:
                v = r.get(f.name)
                if v is None:
                    v = uuid.uuid4().hex if f.name == "event_id" and table == EVENTS else defaults.get(f.name)
                elif isinstance(v, (dict, list)):
                    v = json.dumps(v, sort_keys=True, default=str)
                cols[f.name].append(v)
        tbl = pa.table(cols, schema=schema)
        return append_file(self.root / table, tbl, durable=self.fsync)

    def record_event(self, **row: Any) -> None:
        self.append(EVENTS, [row])

    def _write_atomic(
        self, d: Path, name: str, tbl: pa.Table, durable: bool, kv: Mapping[str, str] | None = None
    ) -> Path:
        return write_parquet_atomic(d, name, tbl, durable, kv)

    # -- reading ----------------------------------------------------------------------------

    def files(self, table: str) -> list[str]:
        """Names of the visible data files of `table`, sorted (≈ write order)."""
        try:
            with os.scandir(self.root / table) as it:
                return sorted(e.name for e in it if _is_data_file(e.name))
        except FileNotFoundError:
            return []

    def exists(self) -> bool:
        return any(self.files(t) for t in TABLES)

    def _sources_of(self, table: str, name: str) -> tuple[str, ...]:
        """Files a compacted file replaces (from its footer); () if it is gone or not compacted."""
        path = self.root / table / name
        key = str(path.absolute())
        if key not in _LINEAGE:
            try:
                md = pq.read_metadata(path).metadata or {}
            except FileNotFoundError:
                return ()  # merged again by a later compaction (then a reader re-lists)
            _LINEAGE[key] = tuple(json.loads(md.get(LINEAGE_KEY, b"[]")))
        return _LINEAGE[key]

    def _superseded(self, table: str, names: Iterable[str]) -> set[str]:
        """Listed files whose rows are already in a listed compacted file (leftovers)."""
        names = list(names)
        out: set[str] = set()
        for n in names:
            if COMPACT_MARK in n:
                out.update(self._sources_of(table, n))
        return out & set(names)

    def _read_files(self, table: str, names: Sequence[str], columns: Sequence[str] | None) -> pa.Table:
        schema = _SCHEMAS[table]
        if not names:
            t = schema.empty_table()
            return t.select(list(columns)) if columns else t
        d = self.root / table
        dataset = ds.FileSystemDataset.from_paths(
            [str(d / n) for n in names], schema=schema, format=ds.ParquetFileFormat(), filesystem=_LOCAL_FS
        )
        return dataset.to_table(columns=list(columns) if columns else None)

    def read(self, table: str, columns: Sequence[str] | None = None, retries: int = 20) -> pa.Table:
        """The whole table (optionally some columns): each row once, even during a compaction.

        Files are read in name order with `pyarrow.dataset` (multi-threaded). Files missing a
        later-added column give nulls there.
        """
        want = list(columns) if columns else None
        if want and table == EVENTS and "event_id" not in want:
            want.append("event_id")
        for attempt in range(retries):
            names = self.files(table)
            stale = self._superseded(table, names)
            live = [n for n in names if n not in stale]
            try:
                t = self._read_files(table, live, want)
            except OSError:
                if all((self.root / table / n).exists() for n in live):
                    raise  # not a compaction race: a real I/O problem
                time.sleep(0.005 * (attempt + 1))
                continue
            # A compaction may have renamed its merged file in *while* we listed (and unlinked
            # its sources, which we then never saw): detect a new compacted file and re-read.
            before = set(names)
            if any(COMPACT_MARK in n and n not in before for n in self.files(table)):
                time.sleep(0.005 * (attempt + 1))
                continue
            t = _dedup_events(t) if table == EVENTS else t
            if columns and table == EVENTS and "event_id" not in columns:
                t = t.drop_columns(["event_id"])
            return t
        raise CatalogReadError(f"{self.root / table}: kept changing under concurrent compactions")

    def slide_paths(self) -> dict[str, str]:
        """slide_id → path (latest registration wins)."""
        t = self.read(SLIDES, columns=["slide_id", "path", "time"]).sort_by("time")
        return dict(zip(t.column("slide_id").to_pylist(), t.column("path").to_pylist(), strict=True))

    def latest_state(self, slide: str | Sequence[str] | None = None, failed_only: bool = False) -> pa.Table:
        """The latest event per (slide_id, asset, run_folder) by `time` (ties: the later-written row).

        Outputs of different geometries live in different run folders: a slide done at 20x and
        failed at 40x has one row for each. Events without a run folder (intake, older files)
        form their own group.

        Sorted by slide_id, then asset (pipeline order). `failed_only` keeps rows whose latest
        status is `failed` (an asset that failed and later succeeded is not failed). Events
        without a slide_id (inbox files not yet bound to a slide) are left out.
        """
        t = self.read(EVENTS)
        t = t.filter(pc.is_valid(t["slide_id"]))  # e.g. inbox events of files not bound to a slide yet
        if slide is not None:
            ids = [slide] if isinstance(slide, str) else list(slide)
            t = t.filter(pc.is_in(t["slide_id"], value_set=pa.array(ids, pa.string())))
        if t.num_rows:
            t = t.append_column("_i", pa.array(range(t.num_rows), pa.int64()))
            t = t.sort_by([("time", "ascending"), ("_i", "ascending")])
            t = t.append_column("_j", pa.array(range(t.num_rows), pa.int64()))
            t = t.append_column("_r", pc.fill_null(t["run_folder"], ""))
            last = t.group_by(["slide_id", "asset", "_r"]).aggregate([("_j", "max")])
            t = t.take(last["_j_max"]).drop_columns(["_i", "_j", "_r"])
            order = pa.array([_asset_rank(a) for a in t["asset"].to_pylist()], pa.string())
            t = (
                t.append_column("_o", order)
                .append_column("_r", pc.fill_null(t["run_folder"], ""))
                .sort_by([("_r", "ascending"), ("slide_id", "ascending"), ("_o", "ascending")])
                .drop_columns(["_o", "_r"])
            )
        if failed_only:
            t = t.filter(pc.equal(t["status"], "failed"))
        return t

    # -- process_list.csv --------------------------------------------------------------------

    def process_list(
        self, state: pa.Table | None = None, paths: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """One row per slide (registered or with events), slide2vec-style.

        `status`: see `slide_status` (failed | done | skipped, or pending for a registered
        slide that no stage has processed yet). `error`: the failed assets' errors. Extra
        columns: path, num_patches, updated, run_id, and `status_<asset>` per asset.
        """
        state = self.latest_state() if state is None else state
        paths = self.slide_paths() if paths is None else paths
        assets = sorted(set(state["asset"].to_pylist()) - {None}, key=_asset_rank)
        per_slide: dict[str, list[dict[str, Any]]] = {}
        for r in state.to_pylist():
            per_slide.setdefault(r["slide_id"], []).append(r)
        out = []
        for sid in sorted(set(paths) | set(per_slide)):
            rows = per_slide.get(sid, [])
            status = slide_status(rows)
            errors = [f"{r['asset']}: {r['error'] or 'failed (no message)'}" for r in rows if r["status"] == "failed"]
            coords = next((r for r in rows if r["asset"] == "patch_coords" and r["status"] != "failed"), None)
            newest = max(rows, key=lambda r: r["time"]) if rows else None
            rec: dict[str, Any] = {
                "sample_id": sid,
                "status": status,
                "error": " | ".join(errors),
                "path": paths.get(sid, ""),
                "num_patches": "" if coords is None or coords["rows"] is None else coords["rows"],
                "updated": newest["time"].isoformat(timespec="seconds") if newest else "",
                "run_id": (newest["run_id"] or "") if newest else "",
            }
            by_asset = {r["asset"]: r["status"] for r in rows}
            for a in assets:
                rec[f"status_{a}"] = by_asset.get(a, "")
            out.append(rec)
        return out

    def write_process_list(self, path: str | Path, rows: list[dict[str, Any]] | None = None) -> Path:
        """Write process_list.csv atomically (`sample_id,status,error` first, then extras)."""
        import csv
        import io

        rows = self.process_list() if rows is None else rows
        header = list(PROCESS_LIST_COLUMNS)
        for r in rows:
            header += [k for k in r if k not in header]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n", restval="")
        w.writeheader()
        w.writerows(rows)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- compaction -------------------------------------------------------------------------

    def lock(self, timeout: float = -1) -> Any:
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCK_NAME), timeout=timeout)

    def compact(self, table: str, timeout: float = -1, tmp_max_age: float = 3600.0) -> CompactionResult:
        """Merge every current file of `table` into one new file, then delete exactly those.

        Safe with concurrent writers (their new files are not listed, so not touched), readers
        (see the module doc) and other compactors (file lock; `timeout` seconds, -1 = wait).
        Also removes leftovers of an interrupted compaction and hidden temp files older than
        `tmp_max_age` seconds (crashed writers).
        """
        if table not in _SCHEMAS:
            raise KeyError(table)
        d = self.root / table
        with self.lock(timeout):
            names = self.files(table)
            stale = self._superseded(table, names)
            live = [n for n in names if n not in stale]
            result = CompactionResult(table, len(names), 0, 0, 0)
            result.stale_temps_removed = _sweep_temps(d, tmp_max_age)
            if len(live) > 1:
                t = self._read_files(table, live, None)
                if table == EVENTS:
                    t = _dedup_events(t)
                    # old files have no event_id: give their rows one, so DuckDB can de-duplicate
                    ids = t["event_id"]
                    if ids.null_count:
                        filled = [v if v is not None else uuid.uuid4().hex for v in ids.to_pylist()]
                        t = t.set_column(t.schema.get_field_index("event_id"), "event_id", pa.array(filled))
                t = t.sort_by("time")  # stable: ties keep write order
                # It lists every file this compaction deletes (leftovers too), so a crash at any
                # point of the unlinks below leaves only files a present compacted file supersedes.
                replaced = live + sorted(stale)
                prefix = live[-1].split("-", 1)[0]  # sorts with its newest source, before later appends
                name = f"{prefix}{COMPACT_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
                lineage = {LINEAGE_KEY.decode(): json.dumps(replaced)}
                result.path = self._write_atomic(d, name, t, durable=True, kv=lineage)
                result.files_merged, result.rows = len(live), t.num_rows
                to_remove = replaced
            else:
                # leftovers only; plain files before compacted ones (whose lineage lists them)
                to_remove = sorted(stale, key=lambda n: (COMPACT_MARK in n, n))
            for n in to_remove:
                self._unlink(d / n)
                _LINEAGE.pop(str((d / n).absolute()), None)
            result.files_removed, result.removed = len(to_remove), to_remove
            if to_remove:
                _fsync_dir(d)
            return result

    def compact_all(self, timeout: float = -1) -> dict[str, CompactionResult]:
        return {t: self.compact(t, timeout=timeout) for t in TABLES}

    def maybe_compact(self, min_files: int = 500) -> dict[str, CompactionResult]:
        """Compact the tables holding at least `min_files` files, unless a compaction is running.

        Cheap when there is nothing to do (one directory listing per table); never waits for the
        lock (filelock.Timeout is an OSError) and never raises an OSError (busy, read-only or full
        catalog: logged, nothing lost). Meant for the end of a run.
        """
        out: dict[str, CompactionResult] = {}
        for t in TABLES:
            if len(self.files(t)) >= min_files:
                try:
                    out[t] = self.compact(t, timeout=0)
                except OSError as e:
                    logging.getLogger("atlaspatch").info(f"catalog compaction of {t} skipped: {e}")
        return out

    @staticmethod
    def _unlink(path: Path) -> None:  # a seam for tests simulating a crash
        path.unlink(missing_ok=True)


def slide_status(latest: Sequence[Mapping[str, Any]]) -> str:
    """One slide's status from its latest event per asset (rows of `latest_state`).

    failed if any asset's latest event failed; else skipped if every processing stage was
    skipped (reused); else done. Intake events (the inbox sensor's asset "inbox") do not make a
    slide done: with no processing stage yet it is `pending`.
    """
    statuses = [r["status"] for r in latest]
    if "failed" in statuses:
        return "failed"
    stages = [r["status"] for r in latest if r["asset"] not in INTAKE_ASSETS]
    if not stages:
        return "pending"
    return "skipped" if all(s == "skipped" for s in stages) else "done"


def _asset_rank(asset: str | None) -> str:
    a = asset or ""
    return f"{ASSET_ORDER.index(a):03d}" if a in ASSET_ORDER else f"999{a}"


def _dedup_events(t: pa.Table) -> pa.Table:
    """Keep the first row of each non-null event_id (rows without one are kept)."""
    if "event_id" not in t.column_names or t.num_rows == 0:
        return t
    ids = t["event_id"]
    non_null = t.num_rows - ids.null_count
    if pc.count_distinct(ids, mode="only_valid").as_py() == non_null:
        return t  # the common case: nothing to do
    idx = pa.array(range(t.num_rows), pa.int64())
    keyed = pa.table({"event_id": ids, "_i": idx}).filter(pc.is_valid(ids))
    first = keyed.group_by("event_id").aggregate([("_i", "min")])["_i_min"]
    keep = pa.concat_arrays([first.combine_chunks(), idx.filter(pc.is_null(ids).combine_chunks())])
    return t.take(pc.take(keep, pc.sort_indices(keep)))  # original order


def _sweep_orphans(d: Path) -> int:
    """Remove hidden temp files of writers on this host whose process is gone (killed mid-write);
    other hosts' temporaries are left to the age-based sweep of `compact`."""
    from .store.files import _pid_alive

    n = 0
    try:
        names = [e.name for e in os.scandir(d) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return 0
    for name in names:
        stem, at, host = name[: -len(".tmp")].rpartition("@")  # host names may hold dots, never '@'
        owner = stem.rpartition(".")[2]
        if at and host == _HOST and owner.isdigit() and not _pid_alive(int(owner)):
            (d / name).unlink(missing_ok=True)
            n += 1
    return n


def _sweep_temps(d: Path, max_age: float) -> int:
    """Remove hidden temp files older than `max_age` seconds (left by killed writers)."""
    n = 0
    cutoff = time.time() - max_age
    try:
        it = list(os.scandir(d))
    except FileNotFoundError:
        return 0
    for e in it:
        if e.name.startswith(".") and e.name.endswith(".tmp"):
            try:
                if e.stat().st_mtime < cutoff:
                    os.unlink(e.path)
                    n += 1
            except FileNotFoundError:
                pass
    return n
