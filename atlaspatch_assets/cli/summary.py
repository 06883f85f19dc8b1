"""CLI presentation: a rich progress bar while slides run, and the summary table after."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_STYLE = {"done": "green", "skipped": "cyan", "failed": "red"}


class ProgressReporter:
    def __init__(self, console: Console, total: int, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            console=console,
            transient=False,
        )
        self.total = total
        self.task: Any = None
        self.patch_task: Any = None

    def __enter__(self) -> ProgressReporter:
        if self.enabled:
            self.progress.start()
            self.task = self.progress.add_task("slides", total=self.total, last="")
        return self

    def advance(self, outcome: Any) -> None:
        if self.enabled:
            style = _STYLE.get(outcome.status, "")
            self.progress.update(self.task, advance=1, last=f"[{style}]{escape(outcome.slide_id)} {outcome.status}")
            if self.patch_task is not None:
                self.progress.update(self.patch_task, visible=False)

    def patches(self, slide_id: str, asset: str, done: int, total: int) -> None:
        """Patches done within the slide in progress (feature extraction)."""
        if not self.enabled:
            return
        if self.patch_task is None:
            self.patch_task = self.progress.add_task("patches", total=total, last="")
        self.progress.update(
            self.patch_task, completed=done, total=total, visible=True, last=f"{escape(slide_id)} {asset}"
        )

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.enabled:
            self.progress.stop()


def print_summary(console: Console, outcomes: Sequence[Any], root: Any) -> None:
    t = Table(title="atlaspatch summary", show_lines=False)
    for col, kw in [
        ("slide", {}),
        ("status", {}),
        ("patches", {"justify": "right"}),
        ("tissue", {"justify": "right"}),
        ("mpp", {"justify": "right"}),
        ("s", {"justify": "right"}),
        ("reason / notes", {"overflow": "fold"}),
    ]:
        t.add_column(col, **kw)
    for o in outcomes:
        style = _STYLE.get(o.status, "")
        note = escape(o.reason if o.status == "failed" else "; ".join(o.warnings))
        t.add_row(
            escape(o.slide_id),
            f"[{style}]{o.status}[/{style}]",
            "" if o.num_patches is None else str(o.num_patches),
            "" if o.tissue_fraction is None else f"{o.tissue_fraction:.1%}",
            "" if o.mpp is None else f"{o.mpp:.4g}",
            f"{o.seconds:.1f}",
            note,
        )
    console.print(t)
    for o in outcomes:  # full reasons, one line each (never folded), easy to grep
        if o.status == "failed":
            console.print(f"[red]FAILED[/red] {escape(o.path)}: {escape(o.reason)}", soft_wrap=True, highlight=False)
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("done", "skipped", "failed")}
    console.print(
        f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed → {root}",
        soft_wrap=True,
        highlight=False,
    )
