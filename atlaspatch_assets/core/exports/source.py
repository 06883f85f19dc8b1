"""One slide as an export reads it: everything through its `SlideStore`, checked before any file is written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..store import RunLayout, SlideStore, StoreMissingError, features_name, json_attr, slide_features_name
from .report import SlideExportError, describe


@dataclass
class SlideData:
    store: SlideStore
    attrs: dict[str, Any]
    coords: np.ndarray  # int32 (N, 2)
    coords_attrs: dict[str, Any]
    tissue_fraction: np.ndarray  # float32 (N,)
    features: np.ndarray  # float32 (N, D)
    feature_attrs: dict[str, Any]
    stored_dtype: str
    mask_attrs: dict[str, Any]
    slide_features: np.ndarray | None = None  # float32 (D,)
    slide_feature_attrs: dict[str, Any] = field(default_factory=dict)
    empty_reason: str = ""  # 0 patches: why; its files are written empty and it is reported `skipped`

    @property
    def slide_id(self) -> str:
        return self.store.slide_id

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def recipe(self) -> dict[str, Any]:
        r = json_attr(self.attrs.get("recipe"))
        return r if isinstance(r, dict) else {}

    @property
    def wsi_path(self) -> str:
        return str(self.attrs.get("wsi_path") or "")

    @cached_property
    def geometry(self) -> dict[str, Any]:
        """Patch geometry from the file attrs, completed from the coords attrs of older stores."""
        a, ca = self.attrs, self.coords_attrs
        ps = int(a.get("patch_size") or ca.get("target_patch_size") or 0)
        step = int(a.get("step_size") or ps)
        ps0 = int(a.get("patch_size_level0") or ca.get("patch_size_level0") or 0)
        ds = ca.get("downsample") or [1.0, 1.0]
        return {
            "patch_size": ps,
            "step_size": step,
            "overlap": int(a.get("overlap", ps - step)),
            "target_mpp": float(a.get("target_mpp") or 0.0),
            "target_magnification": float(a.get("target_magnification") or ca.get("target_magnification") or 0.0),
            "slide_mpp": float(a.get("mpp") or 0.0),
            "level0_magnification": float(a.get("level0_magnification") or ca.get("level0_magnification") or 0.0),
            "patch_size_level0": ps0,
            "step_size_level0": int(a.get("step_size_level0") or ca.get("step_size_level0") or ps0),
            "read_level": int(ca.get("patch_level", 0)),
            "read_downsample": float(ds[0] if isinstance(ds, list) else ds),
            "read_size": int(ca.get("patch_size") or ps0),
            "level0_width": int(a.get("level0_width") or 0),
            "level0_height": int(a.get("level0_height") or 0),
        }


def process_hint(attrs: Mapping[str, Any], output: Path, encoder: str) -> str:
    """The `atlaspatch process` command that computes features/<encoder> for this slide's geometry."""
    wsi = str(attrs.get("wsi_path") or "<slide>")
    ps = attrs.get("patch_size")
    parts = ["atlaspatch process", _q(wsi), f"--feature-extractors {encoder}"]
    if ps:
        parts.append(f"--patch-size {int(ps)}")
        st = attrs.get("step_size")
        if st and int(st) != int(ps):
            parts.append(f"--step-size {int(st)}")
    mag = attrs.get("target_magnification")
    if mag:
        parts.append(f"--target-mag {float(mag):g}")
    parts.append(f"-o {_q(str(output))}")
    return " ".join(parts)


def _q(s: str) -> str:
    return f"'{s}'" if re.search(r"\s", s) else s


@dataclass(frozen=True)
class SlideRequest:
    """What to read of one slide, and what to say when it is not there."""

    run: RunLayout
    slide_id: str
    encoder: str
    slide_encoder: str | None
    catalog_note: str = ""  # the failed upstream assets, from the catalog
    coords_warning: str = ""  # why patch_coords found 0 patches, from the catalog

    def fail(self, reason: str) -> SlideExportError:
        if self.catalog_note:
            reason = f"{reason} (catalog: {self.catalog_note})"
        return SlideExportError(reason, slide=self.slide_id)


def load_slide(req: SlideRequest) -> SlideData:
    """Read and check everything one slide's export needs; SlideExportError with what to do otherwise."""
    store = req.run.store(req.slide_id)
    try:
        return _load(req, store)
    except SlideExportError:
        raise
    except StoreMissingError as e:  # removed between the check and the read
        raise req.fail(e.reason) from e
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise req.fail(f"cannot read {store.path}: {describe(e)}") from e


def _load(req: SlideRequest, store: SlideStore) -> SlideData:
    if not store.exists():
        raise req.fail(f"no store at {store.path}")
    attrs = store.attrs()
    hint = process_hint(attrs, req.run.output, req.encoder)
    if not store.has_coords():
        raise req.fail(
            f"no patch coordinates in {store.path}; run `atlaspatch segment-and-get-coords` (or `{hint}`) first"
        )
    coords = store.coords()
    n = len(coords)
    frac = store.tissue_fraction()
    if frac.shape != (n,):
        raise req.fail(f"tissue_fraction has shape {frac.shape}, coords has {n} rows: recompute the coordinates")
    empty = n == 0 and not store.has_features(req.encoder)
    feats, feature_attrs, stored_dtype = _no_features(req, hint) if empty else _features(req, store, attrs, n, hint)
    slide = SlideData(
        store=store,
        attrs=attrs,
        coords=coords,
        coords_attrs=store.coords_attrs(),
        tissue_fraction=frac,
        features=feats,
        feature_attrs=feature_attrs,
        stored_dtype=stored_dtype,
        mask_attrs=store.mask_attrs(),
    )
    se = req.slide_encoder
    if se and (n or store.has_slide_features(se)):  # 0 patches: no slide embedding is expected
        slide.slide_features, slide.slide_feature_attrs = _slide_features(req, store)
    if n == 0:
        slide.empty_reason = _empty_reason(req, slide)
    return slide


def _empty_reason(req: SlideRequest, slide: SlideData) -> str:
    why = req.coords_warning or "no patch passed the tissue filter"
    masks = req.run.geojson_path(req.slide_id).relative_to(req.run.root)
    missing = (
        f", no {slide_features_name(req.slide_encoder)}" if req.slide_encoder and slide.slide_features is None else ""
    )
    return f"0 patches ({why}): exported empty (0, {slide.dim}){missing}; check {masks} or lower --min-tissue-fraction"


def _no_features(req: SlideRequest, hint: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """Empty (0, D) features of a 0-patch slide that has none stored, D from the encoder registry."""
    try:
        from ..encoders import get_encoder_spec

        dim = int(get_encoder_spec(req.encoder).dim)
    except Exception as e:  # unknown encoder, or no features extra (torch) here
        raise req.fail(
            f"0 patches and no {features_name(req.encoder)} stored, and its dimension is unknown here "
            f"({type(e).__name__}); compute it with `{hint}`"
        ) from e
    return np.zeros((0, dim), np.float32), {}, ""


def _features(
    req: SlideRequest, store: SlideStore, attrs: Mapping[str, Any], n: int, hint: str
) -> tuple[np.ndarray, dict[str, Any], str]:
    """features/<encoder> as float32 (N, D), its attrs and its stored dtype; fails when absent or stale."""
    name = features_name(req.encoder)
    if not store.has_features(req.encoder):
        have = store.encoders()
        stored = f" (stored encoders: {', '.join(have)})" if have else " (no features stored)"
        raise req.fail(f"{name} missing in {store.path}{stored}; compute it with `{hint}`")
    feats, feature_attrs = store.features(req.encoder)
    stored_dtype = str(feats.dtype)
    if feats.ndim != 2 or feats.shape[0] != n:
        raise req.fail(
            f"{name} has shape {tuple(feats.shape)} but coords has {n} rows (stale features); "
            f"recompute with `{hint} --force`"
        )
    coords_hash, feats_coords = attrs.get("recipe_hash"), feature_attrs.get("coords_recipe_hash")
    if coords_hash and feats_coords and coords_hash != feats_coords:
        raise req.fail(
            f"{name} was computed for other coordinates (coords recipe {feats_coords}, now {coords_hash}); "
            f"recompute with `{hint} --force`"
        )
    feats = feats.astype(np.float32, copy=False)
    if not np.isfinite(feats).all():
        raise req.fail(f"{name} holds non-finite values; recompute with `{hint} --force`")
    return feats, feature_attrs, stored_dtype


def _slide_features(req: SlideRequest, store: SlideStore) -> tuple[np.ndarray, dict[str, Any]]:
    """slide_features/<slide encoder> as float32 (D,), computed from features/<encoder>."""
    se, enc = str(req.slide_encoder), features_name(req.encoder)
    sname = slide_features_name(se)
    if not store.has_slide_features(se):
        raise req.fail(
            f"{sname} missing in {store.path}; compute the slide embedding ({sname} asset, slide encoder "
            f"{se!r} over {enc}) first"
        )
    sv, sattrs = store.slide_features(se)
    sv = np.asarray(sv).astype(np.float32, copy=False)
    if sv.ndim != 1 or sv.size == 0 or not np.isfinite(sv).all():
        raise req.fail(f"{sname} has shape {tuple(sv.shape)} (expected (D,), finite): recompute it")
    source = sattrs.get("patch_encoder") or sattrs.get("source_patch_encoder")
    if source and source != req.encoder:
        raise req.fail(f"{sname} was computed from {features_name(source)}, not {enc}")
    return sv, sattrs
