"""Exported HDF5 files (TRIDENT, CLAM): `features` + `coords` datasets, the fingerprint on `features`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .base import Layout
from .commit import Writer, json_default

Datasets = Mapping[str, tuple[np.ndarray, Mapping[str, Any]]]


def h5_attr(v: Any) -> Any:
    """An attribute value h5py stores and the other projects read: JSON for dicts and mixed lists."""
    if v is None:
        return ""
    if isinstance(v, dict) or (isinstance(v, (list, tuple)) and not all(isinstance(i, (int, float)) for i in v)):
        return json.dumps(v, sort_keys=True, default=json_default)
    if isinstance(v, Path):
        return str(v)
    return v


def h5_writer(datasets: Datasets) -> Writer:
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for name, (data, attrs) in datasets.items():
                ds = f.create_dataset(name, data=data)
                for k, v in attrs.items():
                    ds.attrs[k] = h5_attr(v)

    return write


def features_coords_writer(
    features: np.ndarray, feature_attrs: Mapping[str, Any], coords: np.ndarray, coords_attrs: Mapping[str, Any]
) -> Writer:
    """The file both projects read: `features` (N, D) or (D,) and `coords` (N, 2), in that order."""
    return h5_writer({"features": (features, feature_attrs), "coords": (coords, coords_attrs)})


def h5_fingerprint(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            v = f["features"].attrs.get("export_fingerprint")
    except (OSError, KeyError):
        return None
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))


class H5Layout(Layout):
    """A layout whose marker is an exported .h5 file (the fingerprint is an attr of its `features`)."""

    def exported_fingerprint(self, marker: Path) -> str | None:
        return h5_fingerprint(marker)
