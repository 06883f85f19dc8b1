"""`atlaspatch status` and `atlaspatch catalog-compact`: read and maintain `<output>/catalog/`.

Wired into the `atlaspatch` group with `main.add_command(status_command)` and
`main.add_command(compact_command)`.

`status` exit codes: 0 no shown slide failed, 1 any shown slide failed, 2 no catalog / unknown slide.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.markup import escape

from .options import CONTEXT, output_option
from .summary import shorten

_STYLE = {"done": "green", "skipped": "cyan", "failed": "red", "pending": "yellow"}


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def output_size(r: dict[str, Any]) -> str:
    """What an event's row count means, with its unit."""
    asset, n, dim = r["asset"] or "", r["rows"], r["dim"]
    if asset.startswith(("slide_features/", "patient_features/")):
        return f"dim {dim}" if dim else ""
    if n is None:
        return ""
    unit = "px" if asset == "tissue_mask" else "patches" if asset == "patch_coords" or "/" in asset else ""
    return f"{n:,} {unit}".strip()


def _catalog(output: str) -> Any:
    from ..core.catalog import Catalog

    return Catalog(Path(output) / "catalog")


@click.command("status", context_settings=CONTEXT)
@output_option()
@click.option("--slide", "slides", multiple=True, metavar="ID", help="Only this slide id (repeatable)")
@click.option("--failed", is_flag=True, help="Only (slide, asset) pairs whose latest event failed")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write process_list.csv (all slides)  [default: <output>/process_list.csv]",
)
@click.option("--no-csv", is_flag=True, help="Do not write process_list.csv")
def status_command(output: str, slides: tuple[str, ...], failed: bool, csv_path: str | None, no_csv: bool) -> None:
    """Latest state per slide × asset from the catalog; writes a slide2vec-style process_list.csv.

    process_list.csv (columns sample_id,status,error, then extras) always lists every slide,
    whatever --slide/--failed show.
    """
    from rich.table import Table

    from ..core.catalog import slide_status
    from ..core.tables import Tables

    console = _console()
    cat = _catalog(output)
    if not cat.exists():
        console.print(
            f"[red]no catalog[/red] under {escape(str(cat.root))} (run `atlaspatch segment-and-get-coords` first)"
        )
        sys.exit(2)
    state, paths = cat.latest_state(), cat.slide_paths()
    if not no_csv:
        plist = cat.process_list(state, paths)
        csv_out = cat.write_process_list(csv_path or Path(output) / "process_list.csv", plist)
    known = set(state["slide_id"].to_pylist()) | set(paths)
    unknown = [s for s in slides if s not in known]
    if unknown:
        console.print(f"[red]unknown slide id[/red] {escape(', '.join(unknown))} (not in {escape(str(cat.root))})")
        sys.exit(2)

    rows = [
        r
        for r in state.to_pylist()
        if (not slides or r["slide_id"] in slides) and (not failed or r["status"] == "failed")
    ]
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:  # one table per run folder: each geometry's outputs are separate
        by_run.setdefault(r.get("run_folder") or "", []).append(r)
    for run in sorted(by_run):
        title = (
            f"{run}  ({escape(str(Path(output) / run))})" if run else "not tied to a run folder (intake, older events)"
        )
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
        t.add_column("slide", no_wrap=True)
        t.add_column("asset", no_wrap=True)
        t.add_column("status", no_wrap=True)
        t.add_column("output", justify="right", no_wrap=True)
        t.add_column("s", justify="right", no_wrap=True)
        t.add_column("time (UTC)", no_wrap=True)
        for r in by_run[run]:
            style = _STYLE.get(r["status"], "")
            t.add_row(
                escape(shorten(r["slide_id"] or "", 22)),
                escape(r["asset"] or ""),
                f"[{style}]{r['status']}[/{style}]" if style else escape(str(r["status"])),
                escape(output_size(r)),
                "" if r["seconds"] is None else f"{r['seconds']:.1f}",
                r["time"].strftime("%Y-%m-%d %H:%M") if r["time"] else "",
            )
        console.print(t)
    console.print("[dim]output: patches (patch_coords, features), mask pixels (tissue_mask), vector length (dim)[/dim]")
    for r in rows:  # full reasons, one line each (never folded), easy to grep
        if r["status"] == "failed":
            where = f" ({r['run_folder']})" if r.get("run_folder") else ""
            line = f"{r['slide_id']} {r['asset']}{where}: {r['error'] or 'no message'}"
            console.print(f"[red]FAILED[/red] {escape(line)}", soft_wrap=True)

    full: dict[str, list[dict[str, Any]]] = {}
    for r in state.to_pylist():
        full.setdefault(r["slide_id"], []).append(r)
    shown_ids = {r["slide_id"] for r in rows}  # a shown slide's status uses all its assets
    counts = Counter(slide_status(full[s]) for s in shown_ids)
    n_failed = counts["failed"]
    msg = f"{len(shown_ids)} slides: " + ", ".join(
        f"{counts[s]} {s}" for s in ("done", "skipped", "failed", "pending") if counts[s] or s != "pending"
    )
    if not no_csv:
        msg += f" → {escape(str(csv_out))}"
    tables = Tables.of_output(output)  # the lakehouse tables beside the catalog (rows appended so far)
    if rows_per_table := {k: n for k, n in tables.counts().items() if n}:
        listed = ", ".join(f"{k} {n} rows" for k, n in rows_per_table.items())
        console.print(f"tables {escape(str(tables.root))}: {listed}", soft_wrap=True)
    console.print(msg, soft_wrap=True)
    sys.exit(1 if n_failed else 0)


@click.command("catalog-compact", context_settings=CONTEXT)
@output_option()
@click.option(
    "--timeout",
    type=float,
    default=-1,
    show_default=True,
    help="Seconds to wait for another compaction (-1 = wait)",
)
def compact_command(output: str, timeout: float) -> None:
    """Merge the catalog's small Parquet files (one per event) into one file per table.

    Safe while pipelines write: rows appended meanwhile are kept in their own files; no row is lost.
    """
    console = _console()
    cat = _catalog(output)
    if not cat.exists():
        console.print(f"[red]no catalog[/red] under {escape(str(cat.root))}")
        sys.exit(2)
    try:
        results = cat.compact_all(timeout=timeout)
    except TimeoutError as e:  # filelock.Timeout subclasses TimeoutError
        console.print(f"[red]another compaction holds the lock[/red]: {escape(str(e))}")
        sys.exit(1)
    for name, r in results.items():
        if r.path is None:
            note = f"{r.files_before} file(s), nothing to merge"
            if r.files_removed:
                note += f"; removed {r.files_removed} leftover file(s) of an interrupted compaction"
        else:
            note = f"{r.files_merged} files → 1 ({r.rows} rows) {r.path.name}"
            if r.files_removed > r.files_merged:
                note += f"; removed {r.files_removed - r.files_merged} leftover file(s)"
        if r.stale_temps_removed:
            note += f"; removed {r.stale_temps_removed} stale temp file(s)"
        console.print(f"{name}: {escape(note)}", soft_wrap=True)
