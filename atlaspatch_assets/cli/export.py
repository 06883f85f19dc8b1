"""`atlaspatch export`: write a run folder's stores in the slide2vec, TRIDENT or CLAM layout.

Wired into the `atlaspatch` group with `main.add_command(export_command)`.

Exit codes: 0 every slide exported (or already up to date, or empty: 0 patches), 1 any slide (or patient) failed,
2 usage error (unknown layout, no run folder, unknown slide, encoder absent from every slide).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import click
from rich.markup import escape

from ..core.exports import LAYOUTS, ExportUsageError, export
from .options import CONTEXT

_STYLE = {"done": "green", "skipped": "cyan", "failed": "red"}


def _split(values: tuple[str, ...]) -> list[str] | None:
    out = [s for v in values for s in re.split(r"[,\s]+", v) if s]
    return list(dict.fromkeys(out)) or None


@click.command("export", context_settings=CONTEXT)
@click.argument("output_or_run_dir", type=click.Path(file_okay=False))
@click.option(
    "--layout",
    type=click.Choice(list(LAYOUTS), case_sensitive=False),
    required=True,
    help="; ".join(f"{lay.name}: {lay.summary}" for lay in LAYOUTS.values()),
)
@click.option("--encoder", required=True, help="Patch encoder whose features/<encoder> to export, e.g. uni_v1")
@click.option(
    "--slide-encoder",
    default=None,
    help=f"Also export slide_features/<name> ({', '.join(n for n, lay in LAYOUTS.items() if lay.slide_embeddings)})",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=None,
    help="Destination folder  [default: <run>/exports/<layout>/<encoder> ("
    + ", ".join(f"{n}: <run>/exports/{n}" for n, lay in LAYOUTS.items() if not lay.dest_per_encoder)
    + ")]",
)
@click.option("--slides", "slides", multiple=True, metavar="A,B", help="Only these slide ids (comma separated)")
@click.option("--force", is_flag=True, help="Rewrite files that are already exported and up to date")
def export_command(
    output_or_run_dir: str,
    layout: str,
    encoder: str,
    slide_encoder: str | None,
    dest: str | None,
    slides: tuple[str, ...],
    force: bool,
) -> None:
    """Export OUTPUT_OR_RUN_DIR (an output root or a <mag>x_<patch>px_<overlap>px_overlap run folder).

    Each slide is written completely or not at all; a slide without features/<encoder> is reported as
    failed (with what to run) and gets no file; a slide with 0 patches gets empty files and is skipped.
    """
    from rich.console import Console

    console = Console(highlight=False)
    try:
        report = export(output_or_run_dir, layout, dest, encoder, slide_encoder, _split(slides), force)
    except ExportUsageError as e:
        raise click.UsageError(str(e)) from e
    _print_report(console, report)
    sys.exit(0 if report.ok else 1)


def _print_report(console: Any, report: Any) -> None:
    from rich.table import Table

    t = Table(title=f"atlaspatch export ({report.layout}, {escape(report.encoder)})", show_lines=False)
    for col, kw in [
        ("slide", {"overflow": "fold"}),
        ("status", {}),
        ("patches", {"justify": "right"}),
        ("dim", {"justify": "right"}),
        ("files", {"justify": "right"}),
        ("error", {"overflow": "fold"}),
    ]:
        t.add_column(col, **kw)
    for s in report.slides:
        style = _STYLE.get(s.status, "")
        t.add_row(
            escape(s.slide_id),
            f"[{style}]{s.status}[/{style}]" if style else escape(s.status),
            "" if s.num_patches is None else str(s.num_patches),
            "" if s.dim is None else str(s.dim),
            str(len(s.files)) if s.files else "",
            escape(s.error),
        )
    console.print(t)
    for s in report.failed:  # the full reason on one line each (never folded), easy to grep
        console.print(f"[red]FAILED[/red] {escape(s.error)}", soft_wrap=True)
    for s in report.slides:
        if s.status == "skipped" and s.error:  # skipped for a reason (0 patches), not as up to date
            console.print(f"[cyan]SKIPPED[/cyan] {escape(s.error)}", soft_wrap=True)
    for p in report.patients:
        style = _STYLE.get(p.status, "")
        line = f"patient {escape(p.patient_id)}: [{style}]{p.status}[/{style}]"
        if p.error:
            line += f" {escape(p.error)}"
        console.print(line, soft_wrap=True)
    c = report.counts()
    msg = f"{len(report.slides)} slides: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
    if report.patients:
        msg += f"; {len(report.patients)} patients"
    msg += f" → {escape(str(report.dest))}"
    console.print(msg, soft_wrap=True)
    for f in report.files:
        console.print(f"  wrote {escape(f)}", soft_wrap=True)
