"""`atlaspatch export-patches`: a run's stored coordinates → a training patch store (PNG, HDF5, LMDB).

Options are derived from `core.training.patch_export.PatchStoreParams`. Exit codes: 0 every slide
done or skipped, 1 any slide failed, 2 usage error (no run folder, unknown slide, label CSV naming
slides the run lacks, unwritable destination).
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from ..core.params import render_refs
from ..core.training.patch_export import PatchStoreParams
from .options import cli_ref, options_for, params_from

if TYPE_CHECKING:
    from rich.console import Console

    from ..core.training.patch_export import PatchExportReport

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_STYLE = {"done": "green", "skipped": "cyan", "failed": "red"}


@click.command("export-patches", context_settings=CONTEXT)
@click.argument("output_or_run_dir", type=click.Path(file_okay=False))
@options_for(PatchStoreParams)
@click.option("--slides", "slides", multiple=True, metavar="A,B", help="Only these slide ids (comma separated)")
def export_patches_command(output_or_run_dir: str, slides: tuple[str, ...], **kw: object) -> None:
    """Write the patches of OUTPUT_OR_RUN_DIR's stored coordinates (at the run's geometry) into a patch store.

    Each slide is written completely or not at all and can be appended later; an unchanged slide is skipped.
    """
    from rich.console import Console

    from ..core.catalog import Catalog
    from ..core.errors import UsageError
    from ..core.exports.run import resolve_layout
    from ..core.stages import StageEnv
    from ..core.training.patch_export import PatchExport

    console = Console(highlight=False)
    params = params_from(PatchStoreParams, kw)
    wanted = [s for v in slides for s in re.split(r"[,\s]+", v) if s] or None
    try:
        layout = resolve_layout(output_or_run_dir)
        env = StageEnv(layout=layout, catalog=Catalog(layout.catalog_dir), render=cli_ref)
        report = PatchExport(layout, params, env).run(wanted)
    except UsageError as e:
        raise click.UsageError(render_refs(" ".join(str(e).split()), cli_ref)) from e
    _print_report(console, report)
    sys.exit(0 if report.ok else 1)


def _print_report(console: Console, report: PatchExportReport) -> None:
    from rich.table import Table

    t = Table(title=f"atlaspatch export-patches ({report.kind})")
    t.add_column("slide", overflow="fold")
    t.add_column("status")
    t.add_column("patches", justify="right")
    t.add_column("reason / notes", overflow="fold")
    for o in report.outcomes:
        style = _STYLE.get(o.status, "")
        rows = "" if o.rows is None else str(o.rows)
        t.add_row(escape(o.slide_id), f"[{style}]{o.status}[/{style}]", rows, escape(o.reason or "; ".join(o.warnings)))
    console.print(t)
    for o in report.outcomes:
        if not o.ok:  # the full reason on one line each, easy to grep
            console.print(f"[red]FAILED[/red] {escape(o.reason)}", soft_wrap=True)
    c = report.counts()
    done = f"{len(report.outcomes)} slides: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
    console.print(f"{done} → {escape(str(report.dest))}", soft_wrap=True)
