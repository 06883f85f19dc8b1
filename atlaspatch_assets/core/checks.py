"""Checks of one slide's stored outputs (the Dagster asset checks evaluate these per partition)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .store import SlideStore


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    severity: str = "error"  # error | warn
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def has_tissue(store: SlideStore) -> CheckResult:
    attrs = store.mask_attrs()
    if not attrs:
        return CheckResult(False, "error", "no tissue mask stored")
    fraction = float(attrs.get("tissue_fraction", 0.0))
    if fraction <= 0:
        return CheckResult(False, "warn", "the mask finds no tissue", {"tissue_fraction": 0.0})
    return CheckResult(True, metadata={"tissue_fraction": round(fraction, 4)})


def has_patches(store: SlideStore) -> CheckResult:
    n = store.num_patches()
    if n is None:
        return CheckResult(False, "error", "no patch coordinates stored")
    if n == 0:
        return CheckResult(False, "warn", "0 patches", {"patches": 0})
    return CheckResult(True, metadata={"patches": n})


def features_match_patches(store: SlideStore, encoder: str) -> CheckResult:
    if not store.has_features(encoder):
        return CheckResult(False, "error", f"no features/{encoder} stored")
    feats, _ = store.features(encoder)
    n = store.num_patches()
    if n is None or feats.shape[0] != n:
        return CheckResult(False, "error", f"{feats.shape[0]} rows for {n} patches", {"rows": int(feats.shape[0])})
    if not np.isfinite(feats).all():
        return CheckResult(False, "error", "non-finite values", {"rows": int(feats.shape[0])})
    return CheckResult(True, metadata={"rows": int(feats.shape[0]), "dim": int(feats.shape[1])})


CheckFn = Callable[[SlideStore], CheckResult]


def checks_for(asset: str) -> dict[str, CheckFn]:
    """Check name → function for an asset (`tissue_mask`, `patch_coords`, `features/<enc>`)."""
    if asset == "tissue_mask":
        return {"has_tissue": has_tissue}
    if asset == "patch_coords":
        return {"has_patches": has_patches}
    if asset.startswith("features/"):
        enc = asset.split("/", 1)[1]
        return {"rows_match_patches_and_finite": lambda s: features_match_patches(s, enc)}
    return {}
