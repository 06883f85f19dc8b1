"""Export a run folder's per-slide stores to the layouts other projects read.

Layouts (all coordinates level-0 pixels, rows in the store's order):

* ``slide2vec`` (its documented output layout)::

      <dest>/tile_embeddings/<sample_id>.pt           torch float32 (N, D)   + <sample_id>.meta.json
      <dest>/slide_embeddings/<sample_id>.pt          torch float32 (D,)     + .meta.json (--slide-encoder)
      <dest>/patient_embeddings/<patient_id>.pt       torch float32 (D,)     + .meta.json (patient_features/)
      <dest>/tiles/<sample_id>.coordinates.npz        x, y int64; tile_index int32; tissue_fractions float32
      <dest>/tiles/<sample_id>.coordinates.meta.json  provenance, slide, tiling, segmentation, filtering, artifact
      <dest>/process_list.csv                         sample_id,status,error
      <dest>/config.yaml                              the export parameters

* ``trident``: ``<dest>/features_<encoder>/<slide>.h5`` with ``features`` (N, D) and ``coords`` (N, 2) whose
  attrs are TRIDENT's (patch_size at the target magnification, patch_size_level0, level0_magnification,
  target_magnification, overlap, name, savetodir); with --slide-encoder also
  ``<dest>/slide_features_<slide_encoder>/<slide>.h5`` (``features`` (D,) + ``coords``).
* ``clam``: ``<dest>/h5_files/<slide>.h5`` (``features`` + ``coords`` with CLAM's patch_level/patch_size attrs)
  and ``<dest>/pt_files/<slide>.pt`` (torch float32 (N, D)).

A slide is exported completely or not at all: everything is read and checked first, then each file is
written to a hidden temporary file beside its target and all of the slide's files are renamed into place
(payloads before their ``.meta.json`` sidecars). A slide with 0 patches, without ``features/<encoder>``
(or ``slide_features/<slide_encoder>``), or whose features are stale gets a one-line error in the report
(and in ``process_list.csv``), and no file. A slide whose exported files already carry the same export
fingerprint (encoder, recipes, shapes) is ``skipped`` unless ``force``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .errors import SlideError, UsageError
from .store import TMP_MARK, remove_orphan_temps

LAYOUTS = ("slide2vec", "trident", "clam")
PROCESS_LIST_COLUMNS = ("sample_id", "status", "error")
EXPORT_VERSION = 1  # bump when the exported files change for the same inputs
SOFTWARE = "atlaspatch-assets"
SPACING_TOLERANCE = 0.05  # relative; matches the geometry's never-upsample tolerance
RUN_FOLDER = re.compile(r"^[0-9.]+x_\d+px_-?\d+px_overlap$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


class ExportUsageError(UsageError):
    """Invalid export request (CLI exit code 2): unknown layout, no run folder, encoder absent everywhere."""


class SlideExportError(SlideError):
    stage = "export"


@dataclass
class SlideExport:
    slide_id: str
    status: str  # done | skipped | failed
    error: str = ""
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


# -- locating the run folder ----------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (path / "patches").is_dir()


def resolve_run_dir(path: str | Path, encoder: str | None = None) -> tuple[Path, Path]:
    """(run_dir, output_root) for a run folder, its `patches/`, or an output root holding one run folder.

    With several run folders under an output root, the one(s) holding `features/<encoder>` are kept; still
    ambiguous → ExportUsageError listing them.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportUsageError(f"no such folder: {p}")
    if not p.is_dir():
        raise ExportUsageError(
            f"not a folder: {p} (give the output root or a <mag>x_<patch>px_<overlap>px_overlap run)"
        )
    p = p.resolve()
    if p.name == "patches" and is_run_dir(p.parent):
        p = p.parent
    if is_run_dir(p):
        return p, p.parent
    runs = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
    if not runs:
        raise ExportUsageError(
            f"no run folder under {p}: expected <mag>x_<patch>px_<overlap>px_overlap/patches/ "
            "(run `atlaspatch process` first, or give the run folder itself)"
        )
    if len(runs) > 1 and encoder:
        with_enc = [r for r in runs if any(_has_dataset(s, f"features/{encoder}") for s in _stores(r))]
        runs = with_enc or runs
    if len(runs) > 1:
        names = ", ".join(r.name for r in runs)
        raise ExportUsageError(f"several run folders under {p} ({names}): give the one to export")
    return runs[0], p


def _stores(run_dir: Path) -> list[Path]:
    return sorted(q for q in (run_dir / "patches").glob("*.h5") if not q.name.startswith("."))


def _has_dataset(path: Path, name: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return name in f and isinstance(f[name], h5py.Dataset)
    except OSError:
        return False


# -- reading one slide ----------------------------------------------------------------------------


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _attrs(obj: Any) -> dict[str, Any]:
    return {k: _decode(v) for k, v in obj.attrs.items()}


def _json_attr(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


@dataclass
class _Slide:
    slide_id: str
    store: Path
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

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def recipe(self) -> dict[str, Any]:
        r = _json_attr(self.attrs.get("recipe"))
        return r if isinstance(r, dict) else {}

    @property
    def wsi_path(self) -> str:
        return str(self.attrs.get("wsi_path") or "")


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


def _load_slide(
    store: Path,
    slide_id: str,
    encoder: str,
    slide_encoder: str | None,
    output: Path,
    catalog_note: str = "",
    coords_warning: str = "",
) -> _Slide:
    """Read and check everything one slide's export needs; SlideExportError with what to do otherwise."""

    def fail(reason: str) -> SlideExportError:
        if catalog_note:
            reason = f"{reason} (catalog: {catalog_note})"
        return SlideExportError(reason, slide=slide_id)

    if not store.is_file():
        raise fail(f"no store at {store}")
    try:
        with h5py.File(store, "r") as f:
            attrs = _attrs(f)
            if "coords" not in f:
                raise fail(
                    f"no patch coordinates in {store}; run `atlaspatch segment-and-get-coords` "
                    f"(or `{process_hint(attrs, output, encoder)}`) first"
                )
            coords = np.asarray(f["coords"][()], np.int32).reshape(-1, 2)
            coords_attrs = _attrs(f["coords"])
            n = len(coords)
            if n == 0:
                why = coords_warning or "no patch passed the tissue filter"
                raise SlideExportError(
                    f"0 patches ({why}): nothing to export; check masks/{slide_id}.geojson or lower "
                    "--min-tissue-fraction",
                    slide=slide_id,
                )
            frac = (
                np.asarray(f["tissue_fraction"][()], np.float32).reshape(-1)
                if "tissue_fraction" in f
                else np.full(n, np.nan, np.float32)
            )
            if frac.shape != (n,):
                raise fail(f"tissue_fraction has shape {frac.shape}, coords has {n} rows: recompute the coordinates")
            name = f"features/{encoder}"
            if name not in f or not isinstance(f[name], h5py.Dataset):
                have = sorted(f["features"].keys()) if isinstance(f.get("features"), h5py.Group) else []
                stored = f" (stored encoders: {', '.join(have)})" if have else " (no features stored)"
                raise fail(
                    f"{name} missing in {store}{stored}; compute it with `{process_hint(attrs, output, encoder)}`"
                )
            ds = f[name]
            feature_attrs = _attrs(ds)
            stored_dtype = str(ds.dtype)
            feats = np.asarray(ds[()])
            if feats.ndim != 2 or feats.shape[0] != n:
                raise fail(
                    f"{name} has shape {tuple(feats.shape)} but coords has {n} rows (stale features); "
                    f"recompute with `{process_hint(attrs, output, encoder)} --force`"
                )
            coords_hash, feats_coords = attrs.get("recipe_hash"), feature_attrs.get("coords_recipe_hash")
            if coords_hash and feats_coords and coords_hash != feats_coords:
                raise fail(
                    f"{name} was computed for other coordinates (coords recipe {feats_coords}, now {coords_hash}); "
                    f"recompute with `{process_hint(attrs, output, encoder)} --force`"
                )
            feats = feats.astype(np.float32, copy=False)
            if not np.isfinite(feats).all():
                raise fail(
                    f"{name} holds non-finite values; recompute with `{process_hint(attrs, output, encoder)} --force`"
                )
            mask_attrs = _attrs(f["tissue/mask"]) if "tissue/mask" in f else {}
            slide = _Slide(
                slide_id=slide_id,
                store=store,
                attrs=attrs,
                coords=coords,
                coords_attrs=coords_attrs,
                tissue_fraction=frac,
                features=feats,
                feature_attrs=feature_attrs,
                stored_dtype=stored_dtype,
                mask_attrs=mask_attrs,
            )
            if slide_encoder:
                sname = f"slide_features/{slide_encoder}"
                if sname not in f or not isinstance(f[sname], h5py.Dataset):
                    raise fail(
                        f"{sname} missing in {store}; compute the slide embedding ({sname} asset, slide encoder "
                        f"{slide_encoder!r} over features/{encoder}) first"
                    )
                sv = np.asarray(f[sname][()]).astype(np.float32, copy=False)
                sattrs = _attrs(f[sname])
                if sv.ndim != 1 or sv.size == 0 or not np.isfinite(sv).all():
                    raise fail(f"{sname} has shape {tuple(sv.shape)} (expected (D,), finite): recompute it")
                source = sattrs.get("patch_encoder") or sattrs.get("source_patch_encoder")
                if source and source != encoder:
                    raise fail(f"{sname} was computed from features/{source}, not features/{encoder}")
                slide.slide_features, slide.slide_feature_attrs = sv, sattrs
            return slide
    except SlideExportError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise fail(f"cannot read {store}: {type(e).__name__}: {e}") from e


# -- atomic multi-file commit ---------------------------------------------------------------------


Writer = Callable[[Path], None]


@dataclass
class _Plan:
    path: Path
    write: Writer


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def commit(plans: Sequence[_Plan]) -> list[Path]:
    """Write every file to a hidden temp beside its target, then rename all into place (in order).

    Nothing is renamed until every file is written; on any error all temps are removed and, if a rename
    failed midway, the files this commit created are removed again (files it replaced cannot come back).
    """
    temps: list[tuple[Path, Path, bool]] = []
    renamed: list[tuple[Path, bool]] = []
    try:
        for plan in plans:
            plan.path.parent.mkdir(parents=True, exist_ok=True)
            remove_orphan_temps(plan.path)
            tmp = plan.path.with_name(f".{plan.path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            temps.append((tmp, plan.path, plan.path.exists()))
            plan.write(tmp)
            _fsync(tmp)
        for tmp, final, existed in temps:
            os.replace(tmp, final)
            renamed.append((final, existed))
    except BaseException:
        if len(renamed) < len(temps):
            for final, existed in renamed:
                if not existed:
                    final.unlink(missing_ok=True)
        raise
    finally:
        for tmp, _, _ in temps:
            tmp.unlink(missing_ok=True)
    return [p.path for p in plans]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _bytes_writer(data: bytes) -> Writer:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def _torch_writer(array: np.ndarray) -> Writer:
    def write(tmp: Path) -> None:
        import torch

        with open(tmp, "wb") as fh:
            torch.save(torch.from_numpy(np.ascontiguousarray(array, np.float32)), fh)

    return write


def save_npz(fh: Any, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez_compressed(fh, **arrays)


def _npz_writer(arrays: Mapping[str, np.ndarray]) -> Writer:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            save_npz(fh, arrays)

    return write


def _h5_writer(datasets: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]]) -> Writer:
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for name, (data, attrs) in datasets.items():
                ds = f.create_dataset(name, data=data)
                for k, v in attrs.items():
                    ds.attrs[k] = _h5_attr(v)

    return write


def _h5_attr(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, dict) or (isinstance(v, (list, tuple)) and not all(isinstance(i, (int, float)) for i in v)):
        return json.dumps(v, sort_keys=True, default=_json_default)
    if isinstance(v, Path):
        return str(v)
    return v


# -- fingerprints (skip unchanged exports) --------------------------------------------------------


def _fingerprint(layout: str, slide: _Slide, encoder: str, slide_encoder: str | None) -> str:
    ident: dict[str, Any] = {
        "export_version": EXPORT_VERSION,
        "layout": layout,
        "encoder": encoder,
        "shape": [slide.n, slide.dim],
        "coords_recipe_hash": slide.attrs.get("recipe_hash", ""),
        "features_recipe_hash": slide.feature_attrs.get("recipe_hash", ""),
    }
    if not ident["features_recipe_hash"]:
        ident["features_sha256"] = hashlib.sha256(slide.features.tobytes()).hexdigest()
    if not ident["coords_recipe_hash"]:
        ident["coords_sha256"] = hashlib.sha256(slide.coords.tobytes()).hexdigest()
    if slide_encoder and slide.slide_features is not None:
        ident["slide_encoder"] = slide_encoder
        ident["slide_features_sha256"] = hashlib.sha256(slide.slide_features.tobytes()).hexdigest()
    blob = json.dumps(ident, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _json_fingerprint(path: Path) -> str | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return (meta.get("provenance") or {}).get("export_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _h5_fingerprint(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            v = f["features"].attrs.get("export_fingerprint")
            return _decode(v) if v is not None else None
    except (OSError, KeyError):
        return None


# -- per-layout plans ----------------------------------------------------------------------------


@dataclass
class _Ctx:
    layout: str
    dest: Path
    run_dir: Path
    output: Path
    encoder: str
    slide_encoder: str | None
    exported_at: str
    level_downsamples: Callable[[str], list[float] | None]


def _geometry(slide: _Slide) -> dict[str, Any]:
    a, ca = slide.attrs, slide.coords_attrs
    ps = int(a.get("patch_size") or ca.get("target_patch_size") or 0)
    step = int(a.get("step_size") or ps)
    ps0 = int(a.get("patch_size_level0") or ca.get("patch_size_level0") or 0)
    mpp = float(a.get("mpp") or 0.0)
    ds = ca.get("downsample") or [1.0, 1.0]
    read_ds = float(ds[0] if isinstance(ds, list) else ds)
    return {
        "patch_size": ps,
        "step_size": step,
        "overlap": int(a.get("overlap", ps - step)),
        "target_mpp": float(a.get("target_mpp") or 0.0),
        "target_magnification": float(a.get("target_magnification") or ca.get("target_magnification") or 0.0),
        "slide_mpp": mpp,
        "level0_magnification": float(a.get("level0_magnification") or ca.get("level0_magnification") or 0.0),
        "patch_size_level0": ps0,
        "step_size_level0": int(a.get("step_size_level0") or ca.get("step_size_level0") or ps0),
        "read_level": int(ca.get("patch_level", 0)),
        "read_downsample": read_ds,
        "read_size": int(ca.get("patch_size") or ps0),
        "level0_width": int(a.get("level0_width") or 0),
        "level0_height": int(a.get("level0_height") or 0),
    }


def _row_major(coords: np.ndarray) -> bool:
    if len(coords) < 2:
        return True
    key = coords[:, 1].astype(np.int64) * (int(coords[:, 0].max()) + 1) + coords[:, 0]
    return bool(np.all(np.diff(key) > 0))


def _encoder_provenance(slide: _Slide) -> dict[str, Any]:
    """features/<encoder> attrs (model id, weights sha256, precision, input size, library versions…)."""
    return {k: _json_attr(v) for k, v in slide.feature_attrs.items()}


def _provenance(slide: _Slide, ctx: _Ctx, fingerprint: str) -> dict[str, Any]:
    g = _geometry(slide)
    fa = slide.feature_attrs
    return {
        "software": SOFTWARE,
        "software_version": __version__,
        "store_software_version": slide.attrs.get("software_version", ""),
        "store_path": str(slide.store),
        "run_dir": str(ctx.run_dir),
        "slide_id": slide.slide_id,
        "wsi_path": slide.wsi_path,
        "mpp": g["slide_mpp"],
        "mpp_source": slide.attrs.get("mpp_source", ""),
        "vendor": slide.attrs.get("vendor", ""),
        "geometry": g,
        "coords_recipe_hash": slide.attrs.get("recipe_hash", ""),
        "features_recipe_hash": fa.get("recipe_hash", ""),
        "encoder": _encoder_provenance(slide),
        "weights_sha256": fa.get("weights_sha256", ""),
        "stored_dtype": slide.stored_dtype,
        "export_fingerprint": fingerprint,
        "exported_at": ctx.exported_at,
    }


def _coordinates_meta(slide: _Slide, ctx: _Ctx, npz_name: str, fingerprint: str) -> dict[str, Any]:
    g = _geometry(slide)
    recipe = slide.recipe
    ma = slide.mask_attrs
    params = _json_attr(ma.get("parameters")) or {}
    mds = ma.get("downsample")
    seg_ds = float(np.mean(mds)) if isinstance(mds, list) and mds else None
    req_spacing = g["target_mpp"]
    eff_spacing = g["patch_size_level0"] * g["slide_mpp"] / g["patch_size"] if g["patch_size"] else None
    within = bool(eff_spacing and req_spacing and abs(eff_spacing - req_spacing) / req_spacing <= SPACING_TOLERANCE)
    fast = bool(recipe.get("fast_mode", True))
    n = slide.n
    return {
        "provenance": {
            "sample_id": slide.slide_id,
            "image_path": slide.wsi_path,
            "mask_path": None,
            "backend": "atlaspatch",
            "requested_backend": "auto",
            "reader_path": slide.feature_attrs.get("reader_path", ""),
            "software": SOFTWARE,
            "software_version": __version__,
            "store_path": str(slide.store),
            "slide_id": slide.slide_id,
            "mpp_source": slide.attrs.get("mpp_source", ""),
            "vendor": slide.attrs.get("vendor", ""),
            "coords_recipe_hash": slide.attrs.get("recipe_hash", ""),
            "export_fingerprint": fingerprint,
            "exported_at": ctx.exported_at,
        },
        "slide": {
            "dimensions": [g["level0_width"], g["level0_height"]],
            "base_spacing_um": g["slide_mpp"],
            "level_downsamples": ctx.level_downsamples(slide.wsi_path),
            "level0_magnification": g["level0_magnification"],
            "objective_power": slide.attrs.get("objective_power"),
        },
        "tiling": {
            "requested_tile_size_px": g["patch_size"],
            "requested_spacing_um": req_spacing,
            "requested_magnification": g["target_magnification"],
            "effective_tile_size_px": g["patch_size"],
            "effective_spacing_um": round(eff_spacing, 6) if eff_spacing else None,
            "read_level": g["read_level"],
            "read_tile_size_px": g["read_size"],
            "read_spacing_um": round(g["slide_mpp"] * g["read_downsample"], 6),
            "tile_size_lv0": g["patch_size_level0"],
            "step_px_lv0": g["step_size_level0"],
            "step_size_px": g["step_size"],
            "overlap": round(g["overlap"] / g["patch_size"], 6) if g["patch_size"] else 0.0,
            "overlap_px": g["overlap"],
            "tolerance": SPACING_TOLERANCE,
            "min_tissue_fraction": recipe.get("min_tissue_fraction"),
            "is_within_tolerance": within,
            "n_tiles": n,
        },
        "segmentation": {
            "tissue_method": ma.get("method") or params.get("method"),
            "seg_downsample": seg_ds,
            "seg_spacing_um": ma.get("mpp"),
            "mask_path": None,
            "contours_geojson": str(ctx.run_dir / "masks" / f"{slide.slide_id}.geojson"),
            "parameters": params,
            "recipe_hash": ma.get("recipe_hash", ""),
            "tissue_fraction": ma.get("tissue_fraction"),
        },
        "filtering": {
            "min_tissue_fraction": recipe.get("min_tissue_fraction"),
            "fast_mode": fast,
            "filter_white": not fast,
            "filter_black": not fast,
            "white_threshold": recipe.get("white_thresh"),
            "black_threshold": recipe.get("black_thresh"),
            "fraction_threshold": None if fast else 0.7,
        },
        "artifact": {
            "coordinate_space": "level_0",
            "tile_order": "row_major" if _row_major(slide.coords) else "store_order",
            "coordinates_npz": npz_name,
            "n_tiles": n,
            "arrays": {
                "x": {"dtype": "int64", "shape": [n]},
                "y": {"dtype": "int64", "shape": [n]},
                "tile_index": {"dtype": "int32", "shape": [n]},
                "tissue_fractions": {"dtype": "float32", "shape": [n]},
            },
            "tile_embeddings": f"tile_embeddings/{slide.slide_id}.pt",
            "tile_embeddings_shape": [n, slide.dim],
            "tile_embeddings_dtype": "float32",
        },
    }


def _compatibility(slide: _Slide, encoder: str) -> dict[str, Any]:
    fa = slide.feature_attrs
    size = fa.get("input_size")
    mean, std = fa.get("mean"), fa.get("std")
    return {
        "encoder_name": encoder,
        "output_variant": "default",
        "precision": _short_dtype(str(fa.get("precision", "float32"))),
        "feature_dtype": "fp32",
        "requested_tile_size_px": _geometry(slide)["patch_size"],
        "encoder_input_size_px": size,
        "transform": {
            "normalize": {"mean": mean, "std": std} if mean is not None else None,
            "resize": {"size": [size, size], "interpolation": fa.get("interpolation")} if size else None,
            "center_crop": None,
        },
    }


def _short_dtype(s: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(s, s)


def _slide2vec_plans(slide: _Slide, ctx: _Ctx, fp: str) -> tuple[list[_Plan], Path]:
    sid, d = slide.slide_id, ctx.dest
    g = _geometry(slide)
    npz = d / "tiles" / f"{sid}.coordinates.npz"
    cmeta = d / "tiles" / f"{sid}.coordinates.meta.json"
    tile_pt = d / "tile_embeddings" / f"{sid}.pt"
    tile_meta = d / "tile_embeddings" / f"{sid}.meta.json"
    prov = _provenance(slide, ctx, fp)
    arrays = {
        "tile_index": np.arange(slide.n, dtype=np.int32),
        "x": slide.coords[:, 0].astype(np.int64),
        "y": slide.coords[:, 1].astype(np.int64),
        "tissue_fractions": slide.tissue_fraction.astype(np.float32),
    }
    tmeta = {
        "sample_id": sid,
        "artifact_type": "tile_embeddings",
        "backend": "atlaspatch",
        "coordinates_meta_path": str(cmeta),
        "coordinates_npz_path": str(npz),
        "encoder_level": "tile",
        "encoder_name": ctx.encoder,
        "feature_dim": slide.dim,
        "feature_dtype": "fp32",
        "format": "pt",
        "image_path": slide.wsi_path,
        "mask_path": None,
        "num_tiles": slide.n,
        "read_tile_size_px": g["read_size"],
        "requested_tile_size_px": g["patch_size"],
        "encoder_input_size_px": slide.feature_attrs.get("input_size"),
        "requested_spacing_um": g["target_mpp"],
        "tile_size_lv0": g["patch_size_level0"],
        "weights_sha256": slide.feature_attrs.get("weights_sha256", ""),
        "compatibility": _compatibility(slide, ctx.encoder),
        "provenance": prov,
    }
    plans = [
        _Plan(npz, _npz_writer(arrays)),
        _Plan(cmeta, _bytes_writer(_json_bytes(_coordinates_meta(slide, ctx, npz.name, fp)))),
        _Plan(tile_pt, _torch_writer(slide.features)),
    ]
    if ctx.slide_encoder and slide.slide_features is not None:
        sa = {k: _json_attr(v) for k, v in slide.slide_feature_attrs.items()}
        spt = d / "slide_embeddings" / f"{sid}.pt"
        smeta = {
            "sample_id": sid,
            "artifact_type": "slide_embeddings",
            "encoder_level": "slide",
            "encoder_name": ctx.slide_encoder,
            "tile_encoder": sa.get("patch_encoder") or sa.get("source_patch_encoder") or ctx.encoder,
            "feature_dim": int(slide.slide_features.shape[0]),
            "feature_dtype": "fp32",
            "format": "pt",
            "image_path": slide.wsi_path,
            "num_tiles": slide.n,
            "provenance": {**prov, "slide_encoder": sa},
        }
        plans += [
            _Plan(spt, _torch_writer(slide.slide_features)),
            _Plan(d / "slide_embeddings" / f"{sid}.meta.json", _bytes_writer(_json_bytes(smeta))),
        ]
    plans.append(_Plan(tile_meta, _bytes_writer(_json_bytes(tmeta))))  # the sidecar last: it certifies the rest
    return plans, tile_meta


def _trident_coords_attrs(slide: _Slide, savetodir: Path) -> dict[str, Any]:
    g = _geometry(slide)
    return {
        "patch_size": g["patch_size"],  # TRIDENT: at the target magnification
        "patch_size_level0": g["patch_size_level0"],
        "level0_magnification": g["level0_magnification"],
        "target_magnification": g["target_magnification"],
        "overlap": g["overlap"],
        "name": slide.slide_id,
        "savetodir": str(savetodir),
        "step_size_level0": g["step_size_level0"],
        "mpp": g["slide_mpp"],
        "target_mpp": g["target_mpp"],
    }


def _feature_h5_attrs(slide: _Slide, ctx: _Ctx, fp: str, savetodir: Path, encoder: str) -> dict[str, Any]:
    fa = slide.feature_attrs
    return {
        "name": slide.slide_id,
        "savetodir": str(savetodir),
        "encoder": encoder,
        "model_id": fa.get("model_id", ""),
        "weights_sha256": fa.get("weights_sha256", ""),
        "recipe_hash": fa.get("recipe_hash", ""),
        "software": SOFTWARE,
        "software_version": __version__,
        "wsi_path": slide.wsi_path,
        "export_fingerprint": fp,
        "exported_at": ctx.exported_at,
    }


def _trident_plans(slide: _Slide, ctx: _Ctx, fp: str) -> tuple[list[_Plan], Path]:
    sid = slide.slide_id
    fdir = ctx.dest / f"features_{ctx.encoder}"
    h5 = fdir / f"{sid}.h5"
    cattrs = _trident_coords_attrs(slide, ctx.dest)
    plans = [
        _Plan(
            h5,
            _h5_writer(
                {
                    "features": (slide.features, _feature_h5_attrs(slide, ctx, fp, fdir, ctx.encoder)),
                    "coords": (slide.coords, cattrs),
                }
            ),
        )
    ]
    if ctx.slide_encoder and slide.slide_features is not None:
        sdir = ctx.dest / f"slide_features_{ctx.slide_encoder}"
        sattrs = {**_feature_h5_attrs(slide, ctx, fp, sdir, ctx.slide_encoder), "patch_encoder": ctx.encoder}
        plans.insert(
            0,
            _Plan(
                sdir / f"{sid}.h5",
                _h5_writer({"features": (slide.slide_features, sattrs), "coords": (slide.coords, cattrs)}),
            ),
        )
    return plans, h5  # the patch-features file (written last) carries the fingerprint


def _clam_plans(slide: _Slide, ctx: _Ctx, fp: str) -> tuple[list[_Plan], Path]:
    sid = slide.slide_id
    h5 = ctx.dest / "h5_files" / f"{sid}.h5"
    ca = {k: v for k, v in slide.coords_attrs.items()}
    ca.setdefault("name", sid)
    if "level_dim" in ca:
        ca.setdefault("downsampled_level_dim", ca["level_dim"])
    fattrs = _feature_h5_attrs(slide, ctx, fp, h5.parent, ctx.encoder)
    plans = [
        _Plan(ctx.dest / "pt_files" / f"{sid}.pt", _torch_writer(slide.features)),
        _Plan(h5, _h5_writer({"features": (slide.features, fattrs), "coords": (slide.coords, ca)})),
    ]
    return plans, h5


_PLANNERS = {"slide2vec": _slide2vec_plans, "trident": _trident_plans, "clam": _clam_plans}


def _marker_fingerprint(layout: str, marker: Path) -> str | None:
    return _json_fingerprint(marker) if layout == "slide2vec" else _h5_fingerprint(marker)


# -- catalog --------------------------------------------------------------------------------------


def _catalog_state(output: Path, run_dir: Path, assets: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Latest catalog event per (slide, asset) of this run folder (events without an output path count)."""
    from .catalog import Catalog

    cat = Catalog(output / "catalog")
    if not cat.exists():
        return {}
    try:
        state = cat.latest_state().to_pylist()
    except Exception:  # an unreadable catalog must not block an export of valid stores
        return {}
    root = os.path.realpath(run_dir) + os.sep
    out: dict[str, list[dict[str, Any]]] = {}
    for r in state:
        path = r.get("output_path") or ""
        if path and not (path.startswith(root) or os.path.realpath(path).startswith(root)):
            continue  # an event of another run folder (other geometry) sharing this catalog
        if r.get("asset") not in assets:
            continue
        out.setdefault(r["slide_id"], []).append(r)
    return out


def _catalog_failures(rows: Iterable[Mapping[str, Any]]) -> str:
    """The failed assets' errors (latest events), one line."""
    bad = [f"{r['asset']} failed: {r.get('error') or 'no message'}" for r in rows if r.get("status") == "failed"]
    return "; ".join(bad)


def _coords_warning(rows: Iterable[Mapping[str, Any]]) -> str:
    """patch_coords' warning (e.g. why a slide has 0 patches), without the trailing ': 0 patches'."""
    for r in rows:
        if r.get("asset") == "patch_coords" and r.get("status") != "failed" and r.get("error"):
            return re.sub(r":\s*0 patches$", "", str(r["error"]).strip())
    return ""


# -- the export -----------------------------------------------------------------------------------


def _check_name(kind: str, name: str | None) -> None:
    if name is not None and not _SAFE_NAME.match(name):
        raise ExportUsageError(f"{kind} {name!r}: use letters, digits and . _ + - only")


def default_dest(run_dir: Path, layout: str, encoder: str) -> Path:
    return run_dir / "exports" / layout if layout == "trident" else run_dir / "exports" / layout / encoder


def _level_downsampler() -> Callable[[str], list[float] | None]:
    cache: dict[str, list[float] | None] = {}

    def get(path: str) -> list[float] | None:
        if path not in cache:
            cache[path] = None
            if path and os.path.isfile(path):
                try:
                    from .slide import open_slide

                    with open_slide(path, probe=False) as s:
                        cache[path] = [float(d) for d in s.info.level_downsamples]
                except Exception:
                    cache[path] = None
        return cache[path]

    return get


def export(
    run_dir_or_output: str | Path,
    layout: str,
    dest: str | Path | None,
    encoder: str,
    slide_encoder: str | None = None,
    slides: Sequence[str] | None = None,
    force: bool = False,
) -> ExportReport:
    """Export the stores of one run folder to `layout` under `dest` (default `<run>/exports/<layout>[/<enc>]`).

    Raises ExportUsageError for an invalid request (nothing written); per-slide problems are in the report.
    """
    layout = (layout or "").strip().lower()
    if layout not in LAYOUTS:
        raise ExportUsageError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not encoder:
        raise ExportUsageError("give --encoder (the features/<encoder> to export)")
    _check_name("--encoder", encoder)
    _check_name("--slide-encoder", slide_encoder)
    if slide_encoder and layout == "clam":
        raise ExportUsageError("--slide-encoder has no place in the CLAM layout (h5_files/ + pt_files/ hold patches)")
    run_dir, output = resolve_run_dir(run_dir_or_output, encoder)
    stores = {p.stem: p for p in _stores(run_dir)}
    assets = {"tissue_mask", "patch_coords", f"features/{encoder}"}
    if slide_encoder:
        assets.add(f"slide_features/{slide_encoder}")
    catalog = _catalog_state(output, run_dir, assets)

    known = set(stores) | set(catalog)
    if slides:
        wanted = list(dict.fromkeys(s.strip() for s in slides if s and s.strip()))
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise ExportUsageError(
                f"unknown slide id {', '.join(unknown)} (not in {run_dir / 'patches'} nor the catalog)"
            )
    else:
        wanted = sorted(known)
    if not wanted:
        raise ExportUsageError(f"no slide stores in {run_dir / 'patches'}")
    if not any(_has_dataset(stores[s], f"features/{encoder}") for s in wanted if s in stores):
        hint = next((process_hint(_file_attrs(stores[s]), output, encoder) for s in wanted if s in stores), "")
        raise ExportUsageError(
            f"no selected slide in {run_dir.name} has features/{encoder}"
            + (f"; compute them with `{hint}`" if hint else "")
        )
    if slide_encoder and not any(
        _has_dataset(stores[s], f"slide_features/{slide_encoder}") for s in wanted if s in stores
    ):
        raise ExportUsageError(
            f"no selected slide in {run_dir.name} has slide_features/{slide_encoder}; "
            "compute the slide embeddings first"
        )

    dest_path = Path(dest).expanduser().resolve() if dest else default_dest(run_dir, layout, encoder)
    ctx = _Ctx(
        layout=layout,
        dest=dest_path,
        run_dir=run_dir,
        output=output,
        encoder=encoder,
        slide_encoder=slide_encoder,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        level_downsamples=_level_downsampler(),
    )
    report = ExportReport(layout, Path(run_dir_or_output), run_dir, dest_path, encoder, slide_encoder)
    dest_path.mkdir(parents=True, exist_ok=True)
    run_params: dict[str, Any] = {}

    for sid in sorted(wanted):
        rows = catalog.get(sid, [])
        note = _catalog_failures(rows)
        if sid not in stores:
            report.slides.append(
                SlideExport(
                    sid, "failed", SlideExportError(note or f"no store in {run_dir / 'patches'}", slide=sid).one_line()
                )
            )
            continue
        try:
            slide = _load_slide(stores[sid], sid, encoder, slide_encoder, output, note, _coords_warning(rows))
        except SlideExportError as e:
            report.slides.append(SlideExport(sid, "failed", e.one_line()))
            continue
        if not run_params:
            run_params = {"geometry": _geometry(slide), "recipe": slide.recipe, "mask": slide.mask_attrs}
        fp = _fingerprint(layout, slide, encoder, slide_encoder)
        plans, marker = _PLANNERS[layout](slide, ctx, fp)
        files = [str(p.path) for p in plans]
        rec = SlideExport(sid, "done", files=files, num_patches=slide.n, dim=slide.dim)
        if not force and all(p.path.is_file() for p in plans) and _marker_fingerprint(layout, marker) == fp:
            rec.status = "skipped"
        else:
            try:
                commit(plans)
            except Exception as e:  # disk full, permissions…: this slide fails, nothing of it is left
                rec.status, rec.files = "failed", []
                rec.error = SlideExportError(
                    f"cannot write {layout} files: {type(e).__name__}: {e}", slide=sid
                ).one_line()
        report.slides.append(rec)

    if layout == "slide2vec":
        report.patients = _export_patients(ctx, wanted, force)
        report.files.append(str(_write_process_list(dest_path / "process_list.csv", report, wanted)))
        report.files.append(
            str(_write_config(dest_path / "config.yaml", ctx, report, wanted, slides, force, run_params))
        )
    return report


def _file_attrs(store: Path) -> dict[str, Any]:
    try:
        with h5py.File(store, "r") as f:
            return _attrs(f)
    except OSError:
        return {}


# -- patients (slide2vec) -------------------------------------------------------------------------


def _patient_dir(ctx: _Ctx) -> tuple[Path, str] | None:
    names = [n for n in (ctx.slide_encoder, ctx.encoder) if n]
    for base in (ctx.run_dir, ctx.output):
        for name in names:
            d = base / "patient_features" / name
            if d.is_dir():
                return d, name
    return None


def _export_patients(ctx: _Ctx, wanted: Sequence[str], force: bool) -> list[PatientExport]:
    found = _patient_dir(ctx)
    if found is None:
        return []
    pdir, enc = found
    selected = set(wanted)
    out: list[PatientExport] = []
    for path in sorted(q for q in pdir.glob("*.h5") if not q.name.startswith(".")):
        pid = path.stem
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise ValueError("no `features` dataset")
                vec = np.asarray(f["features"][()]).astype(np.float32, copy=False)
                attrs = _attrs(f["features"]) | _attrs(f)
        except (OSError, ValueError, KeyError) as e:
            out.append(PatientExport(pid, "failed", f"{pid}: [export] cannot read {path}: {e}"))
            continue
        slide_ids = _json_attr(attrs.get("slide_ids")) or []
        if isinstance(slide_ids, (str, bytes)):
            slide_ids = [slide_ids]
        slide_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in slide_ids]
        if slide_ids and not selected.intersection(slide_ids):
            continue
        if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
            out.append(
                PatientExport(pid, "failed", f"{pid}: [export] {path} features has shape {vec.shape} (expected (D,))")
            )
            continue
        case_id = str(attrs.get("case_id") or pid)
        if not _SAFE_NAME.match(case_id):
            case_id = pid
        pt = ctx.dest / "patient_embeddings" / f"{case_id}.pt"
        meta_path = ctx.dest / "patient_embeddings" / f"{case_id}.meta.json"
        fp = hashlib.sha256(
            json.dumps([EXPORT_VERSION, enc, slide_ids, hashlib.sha256(vec.tobytes()).hexdigest()]).encode()
        ).hexdigest()[:16]
        meta = {
            "patient_id": case_id,
            "artifact_type": "patient_embeddings",
            "encoder_name": str(attrs.get("encoder") or enc),
            "encoder_level": "patient",
            "format": "pt",
            "feature_dim": int(vec.shape[0]),
            "feature_dtype": "fp32",
            "num_slides": len(slide_ids),
            "slide_ids": slide_ids,
            "provenance": {
                "software": SOFTWARE,
                "software_version": __version__,
                "source_path": str(path),
                "attrs": {k: _json_attr(v) for k, v in attrs.items()},
                "export_fingerprint": fp,
                "exported_at": ctx.exported_at,
            },
        }
        rec = PatientExport(case_id, "done", files=[str(pt), str(meta_path)], num_slides=len(slide_ids))
        if not force and pt.is_file() and _json_fingerprint(meta_path) == fp:
            rec.status = "skipped"
        else:
            try:
                commit([_Plan(pt, _torch_writer(vec)), _Plan(meta_path, _bytes_writer(_json_bytes(meta)))])
            except Exception as e:
                rec.status, rec.files = "failed", []
                rec.error = f"{case_id}: [export] cannot write: {type(e).__name__}: {e}"
        out.append(rec)
    return out


# -- process_list.csv and config.yaml ------------------------------------------------------------


def _write_process_list(path: Path, report: ExportReport, wanted: Sequence[str]) -> Path:
    """slide2vec's process_list.csv (exactly sample_id,status,error); rows of other slides already listed are kept."""
    rows: dict[str, dict[str, str]] = {}
    if path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    if r.get("sample_id") and r["sample_id"] not in wanted:
                        rows[r["sample_id"]] = {k: r.get(k) or "" for k in PROCESS_LIST_COLUMNS}
        except (OSError, csv.Error):
            rows = {}
    for s in report.slides:
        rows[s.slide_id] = {"sample_id": s.slide_id, "status": s.status, "error": s.error}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(PROCESS_LIST_COLUMNS), lineterminator="\n")
    w.writeheader()
    for sid in sorted(rows):
        w.writerow(rows[sid])
    commit([_Plan(path, _bytes_writer(buf.getvalue().encode()))])
    return path


def _write_config(
    path: Path,
    ctx: _Ctx,
    report: ExportReport,
    wanted: Sequence[str],
    slides_arg: Sequence[str] | None,
    force: bool,
    run_params: Mapping[str, Any],
) -> Path:
    import yaml

    g = dict(run_params.get("geometry") or {})
    recipe = dict(run_params.get("recipe") or {})
    mask = dict(run_params.get("mask") or {})
    seg = _json_attr(mask.get("parameters")) or {}
    ps = g.get("patch_size")
    config = {
        "csv": None,
        "output_dir": str(ctx.dest),
        "resume": False,
        "model": {
            "name": ctx.slide_encoder or ctx.encoder,
            "level": "slide" if ctx.slide_encoder else "tile",
            "tile_encoder": ctx.encoder,
            "save_tile_embeddings": True,
            "save_slide_embeddings": bool(ctx.slide_encoder),
        },
        "tiling": {
            "backend": "atlaspatch",
            "params": {
                "requested_spacing_um": g.get("target_mpp"),
                "requested_tile_size_px": ps,
                "tolerance": SPACING_TOLERANCE,
                "overlap": round(g.get("overlap", 0) / ps, 6) if ps else 0.0,
                "tissue_threshold": recipe.get("min_tissue_fraction"),
            },
            "seg_params": {"method": mask.get("method") or seg.get("method"), **{k: v for k, v in seg.items()}},
            "filter_params": {
                "fast_mode": recipe.get("fast_mode", True),
                "white_threshold": recipe.get("white_thresh"),
                "black_threshold": recipe.get("black_thresh"),
            },
        },
        "export": {
            "software": SOFTWARE,
            "software_version": __version__,
            "layout": ctx.layout,
            "source": str(report.source),
            "run_dir": str(ctx.run_dir),
            "catalog": str(ctx.output / "catalog"),
            "dest": str(ctx.dest),
            "encoder": ctx.encoder,
            "slide_encoder": ctx.slide_encoder,
            "slides": list(slides_arg) if slides_arg else None,
            "exported_slides": list(wanted),
            "force": bool(force),
            "exported_at": ctx.exported_at,
            "geometry": g,
            "counts": report.counts(),
        },
    }
    data = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False).encode()
    commit([_Plan(path, _bytes_writer(data))])
    return path


def _plain(o: Any) -> Any:
    """YAML-safe copy (numpy scalars/arrays, tuples, paths → plain types)."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return o
