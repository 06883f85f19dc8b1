"""Label CSVs for training: one label per slide (or per case), checked against the ids a run knows.

Columns: an id column (`slide_id`, `case_id`, `slide` or `id`, or the one named) and a label column
(`label`, or the one named). Integer labels stay integers, other numbers become floats, and text labels
become class indices in sorted order (`Labels.classes` names them).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

ID_COLUMNS = ("slide_id", "case_id", "slide", "id")
MAX_LISTED = 10  # ids named in one error message


class LabelError(UsageError):
    """A label CSV that cannot be used as it is (missing columns, conflicting rows, unknown ids)."""


def _listed(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    more = f" … and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return ", ".join(ids[:MAX_LISTED]) + more


def _typed(raw: dict[str, str]) -> tuple[dict[str, Any], list[str] | None]:
    """Labels as int, float or class index (with the class names)."""
    for kind in (int, float):
        try:
            return {k: kind(v) for k, v in raw.items()}, None
        except ValueError:
            continue
    classes = sorted(set(raw.values()))
    index = {c: i for i, c in enumerate(classes)}
    return {k: index[v] for k, v in raw.items()}, classes


@dataclass
class Labels:
    """id → label read from `path`; `raw` keeps the text, `classes` the names of text labels."""

    path: Path
    id_column: str
    label_column: str
    values: dict[str, Any]
    raw: dict[str, str] = field(default_factory=dict)
    classes: list[str] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __len__(self) -> int:
        return len(self.values)

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def check_known(self, known: Iterable[str], what: str = "slide") -> None:
        """LabelError naming the ids of the CSV that `known` (the run's slide or case ids) lacks."""
        unknown = set(self.values) - set(known)
        if unknown:
            raise LabelError(
                f"{self.path}: {len(unknown)} {what} id(s) not in the run: {_listed(unknown)} "
                f"(column {self.id_column!r}; check the ids or the run folder)"
            )

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids of `ids` without a label."""
        return sorted(i for i in ids if i not in self.values)


def read_labels(path: str | Path, id_column: str | None = None, label_column: str = "label") -> Labels:
    """Read a label CSV; LabelError for a missing file or column, an empty label or conflicting rows."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LabelError(f"label CSV not found: {p}")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().lower(): c for c in reader.fieldnames or [] if c}
        id_key = cols.get(id_column.lower()) if id_column else next((cols[c] for c in ID_COLUMNS if c in cols), None)
        lab_key = cols.get(label_column.lower())
        if id_key is None or lab_key is None:
            want = id_column or "/".join(ID_COLUMNS)
            raise LabelError(f"{p}: needs columns {want} and {label_column} (found {reader.fieldnames})")
        raw: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            key, value = (row.get(id_key) or "").strip(), (row.get(lab_key) or "").strip()
            if not key and not value:
                continue
            if not key or not value:
                raise LabelError(f"{p}:{line}: empty {'id' if not key else 'label'}")
            if raw.get(key, value) != value:
                raise LabelError(f"{p}:{line}: {key!r} labelled both {raw[key]!r} and {value!r}")
            raw[key] = value
    values, classes = _typed(raw)
    return Labels(p, id_key, lab_key, values, raw, classes)


def as_labels(labels: str | Path | Labels | None, id_column: str | None = None) -> Labels | None:
    """A `Labels` from a path (read), a `Labels` (as is) or None."""
    if labels is None or isinstance(labels, Labels):
        return labels
    return read_labels(labels, id_column)
