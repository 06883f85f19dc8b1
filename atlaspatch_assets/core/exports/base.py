"""What a layout module provides, and the context every layout writes in.

A layout is one module with one `Layout` subclass instance, listed in `api.LAYOUTS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..store import RunLayout
from .commit import Plan

if TYPE_CHECKING:
    from .report import ExportReport
    from .source import SlideData


@dataclass
class ExportContext:
    """One export request, resolved: where from, where to, what."""

    layout: Layout
    dest: Path
    run: RunLayout
    encoder: str
    slide_encoder: str | None
    exported_at: str
    level_downsamples: Callable[[str], list[float] | None]
    wanted: Sequence[str] = ()  # the slide ids exported
    slides_arg: Sequence[str] | None = None  # as requested (None: all)
    force: bool = False
    run_params: dict[str, Any] = field(default_factory=dict)  # geometry, recipe, mask of the first slide read


class Layout(ABC):
    name: ClassVar[str]  # the --layout value
    title: ClassVar[str]  # the project's name, in messages
    summary: ClassVar[str]  # the folders it writes (CLI help)
    slide_embeddings: ClassVar[bool] = True  # has a place for --slide-encoder
    dest_per_encoder: ClassVar[bool] = True  # default dest <run>/exports/<layout>/<encoder>, else .../<layout>

    def default_dest(self, run: RunLayout, encoder: str) -> Path:
        d = run.exports_dir / self.name
        return d / encoder if self.dest_per_encoder else d

    @abstractmethod
    def plan(self, slide: SlideData, ctx: ExportContext, fingerprint: str) -> tuple[list[Plan], Path]:
        """The slide's files in rename order, and the one whose recorded fingerprint says they are current."""

    @abstractmethod
    def exported_fingerprint(self, marker: Path) -> str | None:
        """The fingerprint recorded in an exported marker file (None: absent or unreadable)."""

    def finish(self, ctx: ExportContext, report: ExportReport) -> None:  # noqa: B027 - optional hook
        """Run-level files after the slides (e.g. slide2vec's process_list.csv)."""
