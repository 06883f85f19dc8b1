"""Slide-level errors: a failure is data (one line: slide, stage, reason, what to do)."""

from __future__ import annotations


class SlideError(Exception):
    """A deterministic failure of one slide at one stage; never retried."""

    stage = "slide"

    def __init__(self, reason: str, *, slide: str | None = None, stage: str | None = None):
        super().__init__(reason)
        self.reason = " ".join(str(reason).split())  # always one line
        self.slide = slide
        if stage:
            self.stage = stage

    def one_line(self) -> str:
        """`<slide>: [<stage>] <reason>`, parameter references unrendered (see core.params.render_refs)."""
        who = f"{self.slide}: " if self.slide else ""
        return f"{who}[{self.stage}] {self.reason}"

    def __str__(self) -> str:
        from .params import render_refs

        return render_refs(self.one_line())


class SlideOpenError(SlideError):
    stage = "open"


class SlideTooLargeError(SlideOpenError):
    """The file cannot be read in bounded memory (e.g. a huge PNG/JPEG or one huge compressed strip)."""


class MissingMppError(SlideError):
    stage = "mpp"


class GeometryError(SlideError):
    stage = "geometry"


class SegmentationError(SlideError):
    stage = "segmentation"


class ReadError(SlideError):
    stage = "read"


class UsageError(ValueError):
    """Invalid user options (CLI exit code 2); `raw` may hold parameter references."""

    @property
    def raw(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        from .params import render_refs

        return render_refs(self.raw)
