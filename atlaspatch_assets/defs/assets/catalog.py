"""The `catalog` asset: compacts `<output>/catalog/` and publishes its state as Dagster metadata.

Unpartitioned, no upstream dependencies (every stage appends to the catalog itself); materialize
it whenever a summary is wanted (after a backfill, or on a schedule). Each materialization:
compacts both tables (safe while other runs write), writes `<output>/process_list.csv`, and
records counts per asset × status, the number of slides, links to the catalog folder and the CSV,
and a table of the latest failures.
"""

from collections import Counter
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from ...core.catalog import EVENTS, SLIDES, STATUSES
from ...core.tables import Tables
from ..resources import StoreResource

MAX_FAILURES = 20


def _md_cell(v: Any) -> str:
    return str(v if v is not None else "").replace("|", "\\|").replace("\n", " ").strip()


@asset(
    group_name="catalog",
    kinds={"python", "parquet"},
    description=(
        "Provenance catalog (<output>/catalog, Parquet: slides, events): compacted, with the latest "
        "state per slide × asset and process_list.csv; links the tables (<output>/tables)."
    ),
)
def catalog(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
    cat = store.catalog
    tables = Tables(store.layout.tables_dir)
    compaction = cat.compact_all()
    for name, r in compaction.items():
        if r.path is not None:
            context.log.info(f"catalog/{name}: merged {r.files_merged} files ({r.rows} rows) into {r.path.name}")

    state = cat.latest_state()
    plist = cat.process_list(state)
    csv_path = cat.write_process_list(Path(store.output_dir) / "process_list.csv", plist)

    rows = state.to_pylist()
    per_asset: dict[str, Counter[str]] = {}
    for r in rows:
        per_asset.setdefault(r["asset"], Counter())[r["status"]] += 1
    slide_status = Counter(p["status"] for p in plist)

    schema = TableSchema(columns=[TableColumn("asset", "string")] + [TableColumn(s, "int") for s in STATUSES])
    counts_table = MetadataValue.table(
        records=[TableRecord({"asset": a, **{s: c.get(s, 0) for s in STATUSES}}) for a, c in per_asset.items()],
        schema=schema,
    )

    failures = sorted((r for r in rows if r["status"] == "failed"), key=lambda r: r["time"], reverse=True)
    if failures:
        lines = ["| slide | asset | error | time (UTC) | run |", "|---|---|---|---|---|"]
        for r in failures[:MAX_FAILURES]:
            when = r["time"].strftime("%Y-%m-%d %H:%M:%S") if r["time"] else ""
            run = (r["run_id"] or "")[:8]
            lines.append(
                f"| {_md_cell(r['slide_id'])} | {_md_cell(r['asset'])} | {_md_cell(r['error'])} | {when} | {run} |"
            )
        if len(failures) > MAX_FAILURES:
            lines.append(f"\n… and {len(failures) - MAX_FAILURES} more (see process_list.csv)")
        failures_md = "\n".join(lines)
    else:
        failures_md = "No failures."

    metadata: dict[str, Any] = {
        "catalog_dir": MetadataValue.path(str(cat.root)),
        "process_list": MetadataValue.path(str(csv_path)),
        "slides": len(plist),
        **{f"slides_{s}": slide_status.get(s, 0) for s in (*STATUSES, "pending")},
        "events": cat.read(EVENTS, columns=["slide_id"]).num_rows,
        "status_counts": counts_table,
        "latest_failures": MetadataValue.md(failures_md),
        "files": MetadataValue.json({t: len(cat.files(t)) for t in (SLIDES, EVENTS)}),
        "compacted_files": sum(r.files_merged for r in compaction.values()),
        "tables_dir": MetadataValue.path(str(tables.root)),  # embeddings, patch summary (Parquet)
        "table_rows": MetadataValue.json(tables.counts()),
    }
    for a, c in per_asset.items():
        for s in STATUSES:
            metadata[f"{a}.{s}"] = c.get(s, 0)
    metadata["dagster/row_count"] = metadata["events"]
    return MaterializeResult(metadata=metadata)
