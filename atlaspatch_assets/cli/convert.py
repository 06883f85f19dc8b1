"""`atlaspatch convert RUN_DIR --to zarr|h5`: convert a run folder's per-slide stores, verified.

Exit codes: 0 every slide converted, 1 any slide failed (it keeps its source store), 2 usage error.
"""

from __future__ import annotations

import sys

import click
from rich.markup import escape

from ..core.store import STORE_FORMATS
from .options import CONTEXT


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


@click.command("convert", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", type=click.Choice(list(STORE_FORMATS)), required=True, help="Target store format")
@click.option("--keep-source", is_flag=True, help="Keep the source stores (by default removed once verified)")
def convert_command(run_dir: str, to: str, keep_source: bool) -> None:
    """Convert the per-slide stores of RUN_DIR (<mag>x_<patch>px_<overlap>px_overlap) to another format.

    Each slide is copied into a hidden temporary store, compared with its source array by array and
    attribute by attribute, and only then renamed into place (patches/<slide>.h5 <-> zarr/<slide>.zarr).
    """
    from rich.console import Console
    from rich.table import Table

    from ..core.store.convert import CONVERTED, ConvertUsageError, convert_run, summarize

    console = Console(highlight=False)
    try:
        results = convert_run(
            run_dir,
            to,
            keep_source,
            on_slide=lambda r: console.print(f"{escape(r.slide_id)}: {r.status}", style="dim"),
        )
    except ConvertUsageError as e:
        raise click.UsageError(str(e)) from e
    t = Table(title=f"convert → {to}")
    for col, kw in [
        ("slide", {"overflow": "fold"}),
        ("status", {}),
        ("arrays", {"justify": "right"}),
        ("MB before", {"justify": "right"}),
        ("MB after", {"justify": "right"}),
        ("store / reason", {"overflow": "fold"}),
    ]:
        t.add_column(col, **kw)
    for r in results:
        ok = r.status == CONVERTED
        t.add_row(
            escape(r.slide_id),
            f"[green]{r.status}[/green]" if ok else f"[red]{r.status}[/red]",
            str(r.arrays) if ok else "",
            _mb(r.source_bytes) if r.source_bytes else "",
            _mb(r.target_bytes) if ok else "",
            escape(r.target if ok else r.reason),
        )
    console.print(t)
    for r in results:
        if r.status != CONVERTED:
            console.print(f"[red]FAILED[/red] {escape(r.slide_id)}: {escape(r.reason)}", soft_wrap=True)
    counts = summarize(results)
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + (" (sources kept)" if keep_source else ""))
    sys.exit(1 if counts["failed"] else 0)
