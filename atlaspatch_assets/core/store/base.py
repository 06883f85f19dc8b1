"""One slide's store: the backend interface (read / atomic write under a per-slide lock) and the
typed accessors every reader uses (coords, mask, features of an encoder, slide embeddings).

Readers never name datasets: `store.coords()`, `store.features("uni_v1")`; writers build
`DatasetWrite`s under the names of `layout`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from ..errors import SlideError
from . import layout as L


class StoreMissingError(SlideError):
    """Something a stage needs is not stored (yet) for this slide."""

    stage = "store"


@dataclass
class DatasetWrite:
    data: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    compression: str | None = None
    chunk_rows: int | None = None  # chunk along axis 0 (e.g. --write-batch rows)


AttrsUpdate = Callable[[dict[str, Any]], Mapping[str, Any]]
LOCK_TIMEOUT_ENV = "ATLASPATCH_LOCK_TIMEOUT"


def lock_timeout() -> float:
    """Seconds a writer waits for another writer of the same slide ($ATLASPATCH_LOCK_TIMEOUT, 600);
    running out is a transient error (retried), not a failure of the slide."""
    try:
        return max(0.0, float(os.environ.get(LOCK_TIMEOUT_ENV, "600")))
    except ValueError:
        return 600.0


def json_attr(v: Any) -> Any:
    """Attributes holding JSON (recipes, parameters) come back as dicts/lists."""
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _flat_numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(i, (int, float)) for i in v)


def json_native(v: Any) -> Any:
    """An attribute value as JSON-native data (what backends with JSON metadata, Zarr, store):
    dicts and lists stay structured (readable in `zarr.json`), numpy values become Python ones."""
    if v is None:
        return ""  # HDF5 cannot hold None; every backend stores ""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    if isinstance(v, (dict, list, tuple)):
        return json.loads(json.dumps(v, sort_keys=True, default=str))
    return v


def attr_view(v: Any) -> Any:
    """A stored attribute as `SlideStore.attrs()`/`dataset_attrs()` return it, whatever the backend
    (HDF5's rules, so callers are format-agnostic): a flat list of numbers is a list (numpy's type
    promotion), any other dict or list a JSON string with sorted keys, numpy scalars Python ones.
    (A >= 2-d numeric array attribute would read back as a JSON string from Zarr; none is stored.)"""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    if _flat_numbers(v):
        return np.asarray(v).tolist()
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


class SlideStore(ABC):
    """A slide's store at `path` (backend-specific primitives + shared typed accessors).

    Writers of one slide serialize on a file lock beside the store (`.<name>.lock`).
    """

    def __init__(self, path: str | Path, slide_id: str | None = None):
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # -- backend primitives ---------------------------------------------------------------
    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def attrs(self) -> dict[str, Any]:
        """File attributes ({} when the store does not exist)."""

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def read(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        """(data, attrs) of a dataset; KeyError/OSError when absent."""

    def read_rows(self, name: str, rows: np.ndarray | list[int]) -> np.ndarray:
        """Rows `rows` (axis 0, any order, repeats allowed) of a dataset, reading only their chunks."""
        idx = np.asarray(rows, np.int64)
        want, inverse = np.unique(idx, return_inverse=True)  # the backends read sorted, unique rows
        return self._read_sorted_rows(name, want)[inverse.reshape(idx.shape)]

    def _read_sorted_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.read(name)[0][rows]  # a backend without partial reads

    @abstractmethod
    def dataset_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of a dataset ({} when absent)."""

    @abstractmethod
    def names(self) -> list[str]:
        """All dataset names."""

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """The per-slide writer lock (`timeout` default: $ATLASPATCH_LOCK_TIMEOUT, 600 s)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=lock_timeout() if timeout is None else timeout):
            yield

    @abstractmethod
    def write(
        self,
        datasets: Mapping[str, DatasetWrite],
        file_attrs: Mapping[str, Any] | None = None,
        delete: Iterable[str] = (),
        update_attrs: AttrsUpdate | None = None,
    ) -> None:
        """Replace/add `datasets` and file attrs, keep everything else; atomic, under the lock.

        `update_attrs(current file attrs)` returns more file attrs computed under the lock, so
        read-modify-write attributes (e.g. `feature_sets`) never lose a concurrent writer's entry.
        """

    # -- typed accessors ------------------------------------------------------------------
    def _need(self, name: str, what: str) -> tuple[np.ndarray, dict[str, Any]]:
        if not self.has(name):
            raise StoreMissingError(f"no {what} stored in {self.path}", slide=self.slide_id)
        return self.read(name)

    def has_coords(self) -> bool:
        return self.has(L.COORDS)

    def coords(self) -> np.ndarray:
        """int32 (N, 2) level-0 (x, y)."""
        data, _ = self._need(L.COORDS, "patch coordinates")
        return np.asarray(data, np.int32).reshape(-1, 2)

    def coords_attrs(self) -> dict[str, Any]:
        return self.dataset_attrs(L.COORDS)

    def tissue_fraction(self) -> np.ndarray:
        """float32 (N,); NaN when the store predates it."""
        if not self.has(L.TISSUE_FRACTION):
            return np.full(len(self.coords()), np.nan, np.float32)
        data, _ = self.read(L.TISSUE_FRACTION)
        return np.asarray(data, np.float32).reshape(-1)

    def num_patches(self) -> int | None:
        n = self.attrs().get("num_patches")
        return None if n is None or not self.has_coords() else int(n)

    def coords_recipe_hash(self) -> str | None:
        return (self.attrs().get("recipe_hash") or None) if self.has_coords() else None

    def has_mask(self) -> bool:
        return self.has(L.MASK)

    def mask(self) -> tuple[np.ndarray, dict[str, Any]]:
        data, attrs = self._need(L.MASK, "tissue mask")
        return np.asarray(data, np.uint8), attrs

    def mask_attrs(self) -> dict[str, Any]:
        return self.dataset_attrs(L.MASK)

    def thumbnail_jpeg(self) -> np.ndarray | None:
        return self.read(L.THUMBNAIL)[0] if self.has(L.THUMBNAIL) else None

    def has_features(self, encoder: str) -> bool:
        return self.has(L.features_name(encoder))

    def features(self, encoder: str) -> tuple[np.ndarray, dict[str, Any]]:
        return self._need(L.features_name(encoder), f"features/{encoder}")

    def feature_attrs(self, encoder: str) -> dict[str, Any]:
        return self.dataset_attrs(L.features_name(encoder))

    def encoders(self) -> list[str]:
        """Patch encoders whose features are stored."""
        prefix = L.FEATURES + "/"
        return sorted(n[len(prefix) :] for n in self.names() if n.startswith(prefix))

    def has_slide_features(self, name: str) -> bool:
        return self.has(L.slide_features_name(name))

    def slide_features(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        return self._need(L.slide_features_name(name), f"slide_features/{name}")

    def slide_feature_attrs(self, name: str) -> dict[str, Any]:
        return self.dataset_attrs(L.slide_features_name(name))

    def slide_feature_names(self) -> list[str]:
        prefix = L.SLIDE_FEATURES + "/"
        return sorted(n[len(prefix) :] for n in self.names() if n.startswith(prefix))

    def recipe_hash_of(self, asset: str) -> str | None:
        """The stored recipe hash of an asset's output (`tissue_mask`, `patch_coords`, `features/x`…)."""
        if asset == "tissue_mask":
            return self.mask_attrs().get("recipe_hash") or None
        if asset == "patch_coords":
            return self.coords_recipe_hash()
        return self.dataset_attrs(asset).get("recipe_hash") or None

    def read_all(self) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Every dataset with its attrs (conversion, comparison)."""
        for name in self.names():
            data, attrs = self.read(name)
            yield name, data, attrs
