"""Append-only Parquet provenance catalog under `<output>/catalog/`.

Every append is one new Parquet file with a unique name, written to a hidden temp file and
renamed, so concurrent writers never lose or tear rows. Readers (DuckDB, pandas, pyarrow)
see `catalog/<table>/*.parquet` as one table.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SLIDES = "slides"
EVENTS = "events"

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
        ]
    ),
}


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


class Catalog:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        if not rows:
            return None
        schema = _SCHEMAS[table]
        now = datetime.now(timezone.utc)
        cols: dict[str, list[Any]] = {f.name: [] for f in schema}
        for r in rows:
            for f in schema:
                v = r.get(f.name)
                if f.name == "time" and v is None:
                    v = now
                elif isinstance(v, (dict, list)):
                    v = json.dumps(v, sort_keys=True, default=str)
                cols[f.name].append(v)
        tbl = pa.table(cols, schema=schema)
        d = self.root / table
        d.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = d / f".{name}.tmp"
        pq.write_table(tbl, tmp)
        os.replace(tmp, d / name)
        return d / name

    def read(self, table: str) -> pa.Table:
        d = self.root / table
        files = sorted(str(p) for p in d.glob("*.parquet")) if d.is_dir() else []
        if not files:
            return _SCHEMAS[table].empty_table()
        return pa.concat_tables([pq.read_table(f, schema=_SCHEMAS[table]) for f in files])

    def slide_paths(self) -> dict[str, str]:
        """slide_id → path (latest registration wins)."""
        t = self.read(SLIDES).sort_by("time")
        return dict(zip(t.column("slide_id").to_pylist(), t.column("path").to_pylist(), strict=True))

    def record_event(self, **row: Any) -> None:
        self.append(EVENTS, [row])
