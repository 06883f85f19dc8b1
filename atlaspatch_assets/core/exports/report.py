"""What an export says back: usage errors (nothing written), per-slide errors, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlideError, UsageError


class ExportUsageError(UsageError):
    """Invalid export request (CLI exit code 2): unknown layout, no run folder, encoder absent everywhere."""


class SlideExportError(SlideError):
    stage = "export"


def describe(e: BaseException, with_type: bool = True) -> str:
    """`Type: message` of an I/O error, without quoting bytes of the file (undecodable text)."""
    msg = "undecodable text" if isinstance(e, UnicodeError) else str(e)
    return f"{type(e).__name__}: {msg}" if with_type else msg


@dataclass
class SlideExport:
    slide_id: str
    status: str  # done | skipped (up to date, or 0 patches: empty files) | failed
    error: str = ""  # why it failed, or why it has 0 patches
    files: list[str] = field(default_factory=list)
    num_patches: int | None = None
    dim: int | None = None


@dataclass
class PatientExport:
    patient_id: str
    status: str
    error: str = ""
    files: list[str] = field(default_factory=list)
    num_slides: int = 0


@dataclass
class ExportReport:
    layout: str
    source: Path
    run_dir: Path
    dest: Path
    encoder: str
    slide_encoder: str | None
    slides: list[SlideExport] = field(default_factory=list)
    patients: list[PatientExport] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # process_list.csv, config.yaml
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[SlideExport]:
        return [s for s in self.slides if s.status == "failed"]

    @property
    def failed_patients(self) -> list[PatientExport]:
        return [p for p in self.patients if p.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.failed_patients

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "skipped": 0, "failed": 0}
        for s in self.slides:
            out[s.status] = out.get(s.status, 0) + 1
        return out

    def by_slide(self) -> dict[str, SlideExport]:
        return {s.slide_id: s for s in self.slides}
