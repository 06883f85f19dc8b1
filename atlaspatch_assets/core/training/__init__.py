"""Training data (Dagster-free): patch stores (PNG, HDF5, LMDB) and their Dataset, a multi-slide tile
dataset read straight from the slides, feature-bag datasets for MIL, and label CSVs.

Names are imported on first use, so the writers (and the Dagster assets using them) do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Labels": "labels",
    "LabelError": "labels",
    "read_labels": "labels",
    "PatchStoreParams": "patch_export",
    "PatchExport": "patch_export",
    "PatchExportReport": "patch_export",
    "export_patches": "patch_export",
    "PatchStoreDataset": "patch_dataset",
    "PatchStoreError": "patch_stores",
    "STORE_KINDS": "patch_stores",
    "open_patch_store": "patch_stores",
    "TileSlide": "tiles",
    "SlideTileDataset": "tiles",
    "tile_slides_from_run": "tiles",
    "seed_worker": "tiles",
    "TileStats": "tiles",
    "FeatureBagDataset": "bags",
    "collate_bags": "bags",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
