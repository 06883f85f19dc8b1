"""Lakehouse tables beside the catalog: embeddings and patch statistics as append-only Parquet.

    <output>/tables/
      slide_embeddings/<time_ns>-<pid>-<uuid>.parquet     one row per slide × slide encoder
      patient_embeddings/<time_ns>-<pid>-<uuid>.parquet   one row per case × slide encoder
      patch_summary/<time_ns>-<pid>-<uuid>.parquet        one row per slide (after coords / features)

Rows are appended by the stages (through `StageEnv.record`, right after the catalog event of a
`done` result), read back from what the store holds, with the catalog's atomic one-file-per-append
writer: concurrent writers never lose or tear rows. A recomputed result appends a new row; the
current value is the latest row per key (`time`), e.g. in DuckDB::

    select * from read_parquet('<output>/tables/slide_embeddings/*.parquet')
    qualify row_number() over (partition by slide_id, encoder order by time desc) = 1

pandas (`pandas.read_parquet("<output>/tables/slide_embeddings")`) and pyarrow read them too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from .catalog import append_file
from .params import recipe_hash
from .store import RunLayout, json_attr
from .store.layout import TABLES_DIR

SLIDE_EMBEDDINGS = "slide_embeddings"
PATIENT_EMBEDDINGS = "patient_embeddings"
PATCH_SUMMARY = "patch_summary"

_VECTOR = pa.list_(pa.float32())
_TIME = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    SLIDE_EMBEDDINGS: pa.schema(
        [
            ("slide_id", pa.string()),
            ("encoder", pa.string()),  # the slide_features/<name> name, e.g. mean_uni_v1, titan
            ("slide_encoder", pa.string()),
            ("patch_encoder", pa.string()),
            ("dim", pa.int32()),
            ("vector", _VECTOR),
            ("recipe_hash", pa.string()),
            ("run_dir", pa.string()),
            ("store_path", pa.string()),
            ("weights_hash", pa.string()),  # the slide encoder's (null: pooling)
            ("patch_weights_hash", pa.string()),  # the patch encoder's, whose features it encoded
            ("run_id", pa.string()),
            ("time", _TIME),
        ]
    ),
    PATIENT_EMBEDDINGS: pa.schema(
        [
            ("case_id", pa.string()),
            ("encoder", pa.string()),
            ("slide_encoder", pa.string()),
            ("patch_encoder", pa.string()),
            ("aggregation", pa.string()),
            ("slide_ids", pa.list_(pa.string())),
            ("dim", pa.int32()),
            ("vector", _VECTOR),
            ("recipe_hash", pa.string()),  # of the case's slide recipes + aggregation
            ("run_dir", pa.string()),
            ("path", pa.string()),
            ("weights_hash", pa.string()),
            ("run_id", pa.string()),
            ("time", _TIME),
        ]
    ),
    PATCH_SUMMARY: pa.schema(
        [
            ("slide_id", pa.string()),
            ("patches", pa.int64()),
            ("tissue_area_mm2", pa.float64()),  # tissue mask fraction × slide area (level-0 mpp)
            ("mean_tissue_fraction", pa.float64()),  # over the kept patches (null: no patch)
            ("encoders", pa.list_(pa.string())),  # patch encoders with features stored
            ("patch_size", pa.int32()),
            ("target_mpp", pa.float64()),
            ("mpp", pa.float64()),
            ("coords_recipe_hash", pa.string()),
            ("run_dir", pa.string()),
            ("store_path", pa.string()),
            ("store_format", pa.string()),
            ("run_id", pa.string()),
            ("time", _TIME),
        ]
    ),
}
TABLES = tuple(SCHEMAS)
KEYS = {
    SLIDE_EMBEDDINGS: ("slide_id", "encoder"),
    PATIENT_EMBEDDINGS: ("case_id", "encoder"),
    PATCH_SUMMARY: ("slide_id",),
}

log = logging.getLogger("atlaspatch")


class Tables:
    """The tables folder of an output root (`RunLayout.tables_dir`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of_output(cls, output: str | Path) -> Tables:
        """The tables of an output root (beside `catalog/`)."""
        return cls(Path(output) / TABLES_DIR)

    def path(self, table: str) -> Path:
        return self.root / table

    def append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """`rows` as one new Parquet file of `table` (all or nothing); `time` defaults to now."""
        if not rows:
            return None
        schema = SCHEMAS[table]
        now = datetime.now(timezone.utc)
        cols = {f.name: [r.get(f.name, now if f.name == "time" else None) for r in rows] for f in schema}
        return append_file(self.path(table), pa.table(cols, schema=schema))

    def files(self, table: str) -> list[Path]:
        d = self.path(table)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))

    def count(self, table: str) -> int:
        """Rows appended so far (from the Parquet footers: no data read)."""
        files = self.files(table)
        return ds.dataset([str(p) for p in files], format="parquet").count_rows() if files else 0

    def counts(self) -> dict[str, int]:
        return {t: self.count(t) for t in TABLES}

    def read(self, table: str) -> pa.Table:
        """Every row (append order)."""
        files = self.files(table)
        if not files:
            return SCHEMAS[table].empty_table()
        return ds.dataset([str(p) for p in files], schema=SCHEMAS[table], format="parquet").to_table()

    def latest(self, table: str) -> pa.Table:
        """The latest row per key (slide_id × encoder, case_id × encoder, slide_id)."""
        t = self.read(table)
        if t.num_rows == 0:
            return t
        t = t.append_column("_i", pa.array(np.arange(t.num_rows), pa.int64()))
        t = t.sort_by([("time", "ascending"), ("_i", "ascending")])
        t = t.append_column("_j", pa.array(np.arange(t.num_rows), pa.int64()))
        keys = list(KEYS[table])
        last = t.group_by(keys).aggregate([("_j", "max")])["_j_max"]
        return t.take(last).sort_by([(k, "ascending") for k in keys]).drop_columns(["_i", "_j"])


def tables_of(layout: RunLayout) -> Tables:
    return Tables(layout.tables_dir)


# -- rows from what is stored ---------------------------------------------------------------------


def _str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def slide_embedding_row(layout: RunLayout, slide_id: str, name: str) -> dict[str, Any]:
    store = layout.store(slide_id)
    vector, a = store.slide_features(name)
    v = np.asarray(vector, np.float32).reshape(-1)
    return {
        "slide_id": slide_id,
        "encoder": name,
        "slide_encoder": _str(a.get("slide_encoder")),
        "patch_encoder": _str(a.get("patch_encoder") or a.get("source_patch_encoder")),
        "dim": int(v.shape[0]),
        "vector": v,
        "recipe_hash": _str(a.get("recipe_hash")),
        "run_dir": str(layout.root),
        "store_path": str(store.path),
        "weights_hash": _str(a.get("weights_sha256")),
        "patch_weights_hash": _str(store.feature_attrs(str(a.get("patch_encoder") or "")).get("weights_sha256")),
    }


def patient_embedding_row(layout: RunLayout, path: str | Path) -> dict[str, Any]:
    from .store.patients import read_patient

    p = read_patient(path)
    a = p.attrs
    slide_hashes = json_attr(a.get("slide_recipe_hashes")) or []
    v = np.asarray(p.vector, np.float32).reshape(-1)
    recipe = {"encoder": a.get("encoder"), "aggregation": a.get("aggregation"), "slides": p.slide_ids}
    return {
        "case_id": p.case_id,
        "encoder": _str(a.get("encoder")),
        "slide_encoder": _str(a.get("slide_encoder")),
        "patch_encoder": _str(a.get("patch_encoder")),
        "aggregation": _str(a.get("aggregation")),
        "slide_ids": p.slide_ids,
        "dim": int(v.shape[0]),
        "vector": v,
        "recipe_hash": recipe_hash({**recipe, "slide_recipes": slide_hashes}),
        "run_dir": str(layout.root),
        "path": str(p.path),
        "weights_hash": _str(a.get("weights_sha256")),
    }


def patch_summary_row(layout: RunLayout, slide_id: str) -> dict[str, Any]:
    store = layout.store(slide_id)
    a = store.attrs()
    frac = store.tissue_fraction() if store.has_coords() else np.zeros(0, np.float32)
    mpp, w, h = a.get("mpp"), a.get("level0_width"), a.get("level0_height")
    mask_fraction = store.mask_attrs().get("tissue_fraction")
    area = None
    if None not in (mpp, w, h, mask_fraction):
        area = float(mask_fraction) * float(w) * float(h) * float(mpp) ** 2 / 1e6
    return {
        "slide_id": slide_id,
        "patches": int(len(frac)),
        "tissue_area_mm2": area,
        "mean_tissue_fraction": float(np.nanmean(frac)) if len(frac) and not np.isnan(frac).all() else None,
        "encoders": store.encoders(),
        "patch_size": a.get("patch_size"),
        "target_mpp": a.get("target_mpp"),
        "mpp": mpp,
        "coords_recipe_hash": _str(store.coords_recipe_hash()),
        "run_dir": str(layout.root),
        "store_path": str(store.path),
        "store_format": layout.format,
    }


def record_outcome(layout: RunLayout, asset: str, key: str, written: Sequence[str], run_id: str | None) -> None:
    """The table rows of a stage's `done` result (read back from the store); other assets add none.

    A failure here is logged, never raised: the result is stored and its catalog event written.
    """
    tables = tables_of(layout)
    try:
        if asset.startswith("slide_features/"):
            row = slide_embedding_row(layout, key, asset.split("/", 1)[1])
            tables.append(SLIDE_EMBEDDINGS, [{**row, "run_id": run_id}])
        elif asset.startswith("patient_features/") and written:
            tables.append(PATIENT_EMBEDDINGS, [{**patient_embedding_row(layout, written[0]), "run_id": run_id}])
        if asset == "patch_coords" or asset.startswith("features/"):
            tables.append(PATCH_SUMMARY, [{**patch_summary_row(layout, key), "run_id": run_id}])
    except Exception as e:  # a derived table must not fail a stored result
        log.warning(f"{key}: [{asset}] table row not written: {type(e).__name__}: {e}")
