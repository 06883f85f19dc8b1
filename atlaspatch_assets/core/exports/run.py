"""Locating the run folder to export (through `RunLayout`), and probes of its stores that never raise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import RunLayout
from .report import ExportUsageError


def run_layout(path: Path) -> RunLayout | None:
    """The layout of `path` when it is a run folder: named as one (`<mag>x_<patch>px_<overlap>px_overlap`)
    and holding the slide stores' folder."""
    try:
        layout = RunLayout.from_run_dir(path)
    except ValueError:
        return None
    if layout.root != path or not layout.patches_dir.is_dir():
        return None  # e.g. "20.0x_…": the layout would name another folder
    return layout


def is_run_dir(path: Path) -> bool:
    return run_layout(path) is not None


def has_features(layout: RunLayout, slide_id: str, encoder: str) -> bool:
    try:
        return layout.store(slide_id).has_features(encoder)
    except OSError:  # unreadable store: it fails on its own when exported
        return False


def has_slide_features(layout: RunLayout, slide_id: str, name: str) -> bool:
    try:
        return layout.store(slide_id).has_slide_features(name)
    except OSError:
        return False


def store_attrs(layout: RunLayout, slide_id: str) -> dict[str, Any]:
    try:
        return layout.store(slide_id).attrs()
    except OSError:
        return {}


def resolve_layout(path: str | Path, encoder: str | None = None) -> RunLayout:
    """The run folder of `path`: a run folder, its slide stores' folder, or an output root holding one.

    With several run folders under an output root, the one(s) holding `features/<encoder>` are kept; still
    ambiguous → ExportUsageError listing them.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportUsageError(f"no such folder: {p}")
    if not p.is_dir():
        raise ExportUsageError(
            f"not a folder: {p} (give the output root or a <mag>x_<patch>px_<overlap>px_overlap run)"
        )
    p = p.resolve()
    parent = run_layout(p.parent)
    if parent is not None and parent.patches_dir == p:
        return parent
    own = run_layout(p)
    if own is not None:
        return own
    runs = [lay for c in sorted(p.iterdir()) if c.is_dir() and (lay := run_layout(c)) is not None]
    if not runs:
        raise ExportUsageError(
            f"no run folder under {p}: expected <mag>x_<patch>px_<overlap>px_overlap/patches/ "
            "(run `atlaspatch process` first, or give the run folder itself)"
        )
    if len(runs) > 1 and encoder:
        with_enc = [r for r in runs if any(has_features(r, s, encoder) for s in r.slide_ids())]
        runs = with_enc or runs
    if len(runs) > 1:
        names = ", ".join(r.root.name for r in runs)
        raise ExportUsageError(f"several run folders under {p} ({names}): give the one to export")
    return runs[0]


def resolve_run_dir(path: str | Path, encoder: str | None = None) -> tuple[Path, Path]:
    """(run_dir, output_root) of `resolve_layout`."""
    layout = resolve_layout(path, encoder)
    return layout.root, layout.output
