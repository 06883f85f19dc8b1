"""`PatchStoreDataset`: the `torch.utils.data.Dataset` over a patch store of any kind (PNG, HDF5, LMDB)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .patch_stores import PatchReader, PatchStoreError, open_patch_store


class PatchStoreDataset(Dataset):
    """`torch.utils.data.Dataset` over a patch store (any kind): item = dict(image, slide_id, x, y, level,
    size, mpp, tissue_fraction, index[, label]).

    `image` is RGB uint8 (H, W, 3) (numpy; the default collate stacks it into a tensor), or `transform(image)`.
    The slide list is read once here; files and databases are opened lazily in each process (DataLoader
    workers, fork or spawn) and never pickled open. Slides written after the dataset was made are not seen.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[np.ndarray], Any] | None = None,
        slide_ids: Sequence[str] | None = None,
        **options: Any,
    ):
        self.store = open_patch_store(root, **options)
        entries = self.store.entries()
        if slide_ids is not None:
            unknown = sorted(set(slide_ids) - {e.slide_id for e in entries})
            if unknown:
                raise PatchStoreError(f"{root}: no complete slide {', '.join(unknown)} in this patch store")
            entries = [e for e in entries if e.slide_id in set(slide_ids)]
        self.entries = entries
        self.transform = transform
        self._len = sum(e.n for e in entries)
        self._reader: PatchReader | None = None
        self._pid = -1

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide_id for e in self.entries]

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, -1  # each process opens its own files
        return state

    def _get_reader(self) -> PatchReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = self.store.reader(self.entries)  # a forked copy's handles are left alone
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        rgb, meta = self._get_reader().get(int(i))
        return {"image": self.transform(rgb) if self.transform else rgb, **meta}

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None
