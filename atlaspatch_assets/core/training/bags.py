"""Feature bags for multiple-instance learning (CLAM / ABMIL style): one bag per slide, or per patient
from a manifest, holding the stored `features/<encoder>` rows, their coordinates and a label.

Stores are read only through `RunLayout` / `SlideStore`. A patient manifest is the one of
`atlaspatch encode-patient` (`case_id,slide_path`), read by `stages.embeddings.read_manifest`; its
slide paths are mapped to slide ids through the catalog. What cannot be a bag (no features of the
encoder, stale features, 0 patches, no label) is an error listing the ids (`missing="error"`, the
default) or is left out, logged and listed in `skipped` (`missing="skip"`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..catalog import Catalog
from ..errors import UsageError
from ..store import RunLayout
from .labels import Labels, as_labels

log = logging.getLogger("atlaspatch.training")
MAX_LISTED = 10


@dataclass(frozen=True)
class Bag:
    bag_id: str  # slide id, or case id
    slide_ids: tuple[str, ...]
    label: Any = None


class FeatureBagDataset(Dataset):
    """Bags of patch features; item = dict(id, features (n, D) float tensor, coords (n, 2) int64 level-0 (x, y),
    patch_slide (n,) index into slide_ids, slide_ids, n[, label]).

    Args:
        run: a run folder (or output root) or its `RunLayout`.
        encoder: the patch encoder whose `features/<encoder>` form the bags.
        labels: label CSV (or `Labels`) keyed by slide id, or by case id with `manifest`.
        slide_ids: only these slides (without `manifest`).
        manifest: `case_id,slide_path` CSV: one bag per case, the rows of all its slides.
        max_patches: random subsample of at most this many rows per bag (drawn per item and epoch).
        seed: subsampling seed (`set_epoch` draws another subsample).
        missing: `error` (default) or `skip` for ids that cannot be bags.
        dtype: torch dtype of `features`.
        transform: optional callable on each item dict.
    """

    def __init__(
        self,
        run: str | Path | RunLayout,
        encoder: str,
        labels: str | Path | Labels | None = None,
        slide_ids: Sequence[str] | None = None,
        manifest: str | Path | None = None,
        max_patches: int | None = None,
        seed: int = 0,
        missing: str = "error",
        dtype: torch.dtype = torch.float32,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ):
        from ..exports.run import resolve_layout

        if missing not in ("error", "skip"):
            raise UsageError(f"missing must be 'error' or 'skip' (got {missing!r})")
        if max_patches is not None and max_patches < 1:
            raise UsageError(f"max_patches must be >= 1 (got {max_patches})")
        self.layout = run if isinstance(run, RunLayout) else resolve_layout(run, encoder)
        self.encoder, self.max_patches, self.seed, self.dtype = encoder, max_patches, int(seed), dtype
        self.transform = transform
        self.epoch = 0
        self.skipped: dict[str, str] = {}
        bags = self._case_bags(manifest) if manifest is not None else self._slide_bags(slide_ids)
        lab = as_labels(labels)
        if lab is not None:
            lab.check_known(self._known, "case" if manifest else "slide")
            bags = [Bag(b.bag_id, b.slide_ids, lab.get(b.bag_id)) for b in bags]
            for b in bags:
                if b.bag_id not in lab:
                    self.skipped[b.bag_id] = f"no label in {lab.path}"
        self.labels = lab
        for b in bags:
            if b.bag_id not in self.skipped:
                why = self._problem(b)
                if why:
                    self.skipped[b.bag_id] = why
        if self.skipped and missing == "error":
            ids = sorted(self.skipped)
            more = f" … and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
            shown = "; ".join(f"{i}: {self.skipped[i]}" for i in ids[:MAX_LISTED])
            raise UsageError(f"{len(ids)} bag(s) cannot be used: {shown}{more} (missing='skip' leaves them out)")
        for i, why in self.skipped.items():
            log.warning(f"{i}: left out of the feature bags: {why}")
        self.bags = [b for b in bags if b.bag_id not in self.skipped]

    # -- bags ----------------------------------------------------------------------------------
    def _slide_bags(self, slide_ids: Sequence[str] | None) -> list[Bag]:
        stored = self.layout.slide_ids()
        self._known = set(stored)  # a label CSV may label slides not selected here
        ids = list(dict.fromkeys(slide_ids)) if slide_ids is not None else stored
        unknown = sorted(set(ids) - set(stored))
        if unknown:
            raise UsageError(f"unknown slide id {', '.join(unknown[:MAX_LISTED])} (no store in {self.layout.root})")
        return [Bag(s, (s,)) for s in ids]

    def _case_bags(self, manifest: str | Path) -> list[Bag]:
        from ..stages.embeddings import read_manifest

        m = read_manifest(manifest)
        self._known = set(m.cases) | set(m.bad)
        catalog = Catalog(self.layout.catalog_dir)
        by_path = {os.path.realpath(p): s for s, p in (catalog.slide_paths() if catalog.exists() else {}).items()}
        stored = set(self.layout.slide_ids())
        self.skipped.update({c: f"manifest: {why}" for c, why in m.bad.items()})
        bags = []
        for case, paths in sorted(m.cases.items()):
            ids = [by_path.get(os.path.realpath(p)) for p in paths]
            lost = [p for p, s in zip(paths, ids, strict=True) if s is None or s not in stored]
            if lost:
                self.skipped[case] = f"slide(s) not processed in {self.layout.root.name}: {', '.join(lost)}"
                continue
            bags.append(Bag(case, tuple(s for s in ids if s is not None)))
        return bags

    def _problem(self, b: Bag) -> str | None:
        """Why a bag cannot be read (None when it can); cheap: attributes only."""
        for sid in b.slide_ids:
            store = self.layout.store(sid)
            if not store.has_features(self.encoder):
                have = ", ".join(store.encoders()) or "none"
                return f"{sid} has no features/{self.encoder} (stored: {have})"
            coords_hash = store.coords_recipe_hash()
            feats_hash = store.feature_attrs(self.encoder).get("coords_recipe_hash")
            if coords_hash and feats_hash and coords_hash != feats_hash:
                return f"{sid}: features/{self.encoder} were computed for other coordinates (recompute them)"
        if all(self.layout.store(s).num_patches() == 0 for s in b.slide_ids):
            return "0 patches"
        return None

    @property
    def ids(self) -> list[str]:
        return [b.bag_id for b in self.bags]

    def set_epoch(self, epoch: int) -> None:
        """Draw another subsample per bag (with `max_patches`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.bags[i]
        feats, coords, which = [], [], []
        for k, sid in enumerate(b.slide_ids):
            store = self.layout.store(sid)
            f, _ = store.features(self.encoder)
            c = store.coords()
            if f.ndim != 2 or len(f) != len(c):
                raise ValueError(f"{sid}: features/{self.encoder} has {len(f)} rows, coords {len(c)} (stale features)")
            feats.append(np.asarray(f))
            coords.append(c)
            which.append(np.full(len(c), k, np.int64))
        f, c, w = np.concatenate(feats), np.concatenate(coords), np.concatenate(which)
        if self.max_patches is not None and len(f) > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            keep = np.sort(rng.choice(len(f), self.max_patches, replace=False))
            f, c, w = f[keep], c[keep], w[keep]
        item: dict[str, Any] = {
            "id": b.bag_id,
            "features": torch.from_numpy(np.ascontiguousarray(f)).to(self.dtype),
            "coords": torch.from_numpy(c.astype(np.int64)),
            "patch_slide": torch.from_numpy(w),
            "slide_ids": list(b.slide_ids),
            "n": len(f),
        }
        if b.label is not None:
            item["label"] = b.label
        return self.transform(item) if self.transform else item


def collate_bags(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Variable-size bags → zero-padded `features` (B, N_max, D), `coords` (B, N_max, 2), `patch_slide`
    (B, N_max, -1 = padding), `mask` (B, N_max) True on real rows, `lengths` (B,), `label` (B,), `id`,
    `slide_ids` (lists)."""
    lengths = torch.tensor([int(b["n"]) for b in batch], dtype=torch.int64)
    n_max = int(lengths.max()) if len(batch) else 0
    d = batch[0]["features"].shape[1] if batch else 0
    feats = batch[0]["features"].new_zeros((len(batch), n_max, d)) if batch else torch.zeros(0, 0, 0)
    coords = torch.zeros((len(batch), n_max, 2), dtype=torch.int64)
    which = torch.full((len(batch), n_max), -1, dtype=torch.int64)
    mask = torch.zeros((len(batch), n_max), dtype=torch.bool)
    for k, b in enumerate(batch):
        n = int(b["n"])
        feats[k, :n], coords[k, :n], which[k, :n], mask[k, :n] = b["features"], b["coords"], b["patch_slide"], True
    out: dict[str, Any] = {
        "features": feats,
        "coords": coords,
        "patch_slide": which,
        "mask": mask,
        "lengths": lengths,
        "id": [b["id"] for b in batch],
        "slide_ids": [b["slide_ids"] for b in batch],
    }
    if batch and all("label" in b for b in batch):
        out["label"] = torch.tensor([b["label"] for b in batch])
    return out
