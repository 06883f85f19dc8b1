"""Patient embeddings as readers see them: one HDF5 file a case at `RunLayout.patient_path(name, case_id)`,
a (D,) vector whose attrs (and the file's) say the case, its slides and the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .base import json_attr
from .h5 import _decode
from .layout import RunLayout

PATIENT_VECTOR = "features"  # (D,) in each patient file


@dataclass(frozen=True)
class PatientFile:
    path: Path
    vector: np.ndarray  # (D,) as stored
    attrs: dict[str, Any]  # the vector's attrs, then the file's (the file's win)

    @property
    def case_id(self) -> str:
        return str(self.attrs.get("case_id") or self.path.stem)

    @property
    def slide_ids(self) -> list[str]:
        ids = json_attr(self.attrs.get("slide_ids")) or []
        if isinstance(ids, (str, bytes)):
            ids = [ids]
        return [s.decode() if isinstance(s, bytes) else str(s) for s in ids]


def patient_paths(layout: RunLayout, name: str) -> list[Path]:
    """The patient files of embedding `name` in this run folder (hidden temporaries left out)."""
    pattern = layout.patient_path(name, "*")  # folder and file name pattern from the one definition
    return sorted(p for p in pattern.parent.glob(pattern.name) if not p.name.startswith("."))


def read_patient(path: str | Path) -> PatientFile:
    """The stored vector and attrs; OSError (unreadable) or ValueError (no vector) otherwise."""
    p = Path(path)
    with h5py.File(p, "r") as f:
        if PATIENT_VECTOR not in f:
            raise ValueError(f"no `{PATIENT_VECTOR}` dataset")
        ds = f[PATIENT_VECTOR]
        attrs = {k: _decode(v) for k, v in ds.attrs.items()} | {k: _decode(v) for k, v in f.attrs.items()}
        return PatientFile(p, np.asarray(ds[()]), attrs)
