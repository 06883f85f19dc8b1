"""CLI presentation: a rich progress bar while slides run, and the summary table after."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_STYLE = {"done": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow", "not started": "dim"}


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


STATUSES = ("done", "skipped", "failed", "interrupted", "not started")
SLIDE_WIDTH = 22


def stage_of(reason: str) -> str:
    """`slide: [stage] why` → `stage`."""
    return reason.split("] ", 1)[0].rsplit("[", 1)[-1] if "[" in reason else "?"


def shorten_end(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def shorten(text: str, width: int) -> str:
    """`text` cut in the middle to `width` characters (ids keep their start and their end)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def print_summary(console: Console, outcomes: Sequence[Any], root: Any) -> None:
    """A table that fits 80 columns, then each failure once, in full, on one line."""
    t = Table(title="atlaspatch summary", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("slide", no_wrap=True, min_width=min(SLIDE_WIDTH, max((len(o.slide_id) for o in outcomes), default=5)))
    t.add_column("status", no_wrap=True, min_width=max((len(o.status) for o in outcomes), default=6))
    t.add_column("patches", justify="right", no_wrap=True, min_width=7)
    t.add_column("tissue", justify="right", no_wrap=True, min_width=6)
    t.add_column("mpp", justify="right", no_wrap=True, min_width=5)
    t.add_column("s", justify="right", no_wrap=True, min_width=4)
    t.add_column("notes", no_wrap=True)
    widths = [t.columns[0].min_width or 0, t.columns[1].min_width or 0, 7, 6, 5, 4]
    note_width = max(12, console.width - sum(widths) - 2 * len(widths) - 2)
    for o in outcomes:
        style = _STYLE.get(o.status, "")
        if o.status == "failed":
            note = f"[{stage_of(o.reason)}] failed ↓"
        else:
            note = "; ".join(o.warnings) or (o.reason if o.status == "interrupted" else "")
        t.add_row(
            escape(shorten(o.slide_id, SLIDE_WIDTH)),
            f"[{style}]{o.status}[/{style}]" if style else o.status,
            "" if o.num_patches is None else str(o.num_patches),
            "" if o.tissue_fraction is None else f"{o.tissue_fraction:.1%}",
            "" if o.mpp is None else f"{o.mpp:.3g}",
            f"{o.seconds:.1f}" if o.seconds else "",
            escape(shorten_end(note, note_width)),
        )
    console.print(t)
    for o in outcomes:  # each failure once, in full, one line (never folded), easy to grep
        if o.status in ("failed", "interrupted"):
            tag = "[red]FAILED[/red]" if o.status == "failed" else "[yellow]INTERRUPTED[/yellow]"
            console.print(f"{tag} {escape(o.path)}: {escape(o.reason)}", soft_wrap=True, highlight=False)
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in STATUSES}
    text = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    text += "".join(f", {counts[s]} {s}" for s in STATUSES[3:] if counts[s])
    console.print(f"{text} → {root}", soft_wrap=True, highlight=False)
