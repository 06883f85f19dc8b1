"""slide2vec's documented output layout::

<dest>/tile_embeddings/<sample_id>.pt           torch float32 (N, D)   + <sample_id>.meta.json
<dest>/slide_embeddings/<sample_id>.pt          torch float32 (D,)     + .meta.json (--slide-encoder)
<dest>/patient_embeddings/<patient_id>.pt       torch float32 (D,)     + .meta.json (patient_features/)
<dest>/tiles/<sample_id>.coordinates.npz        x, y int64; tile_index int32; tissue_fractions float32
<dest>/tiles/<sample_id>.coordinates.meta.json  provenance, slide, tiling, segmentation, filtering, artifact
<dest>/process_list.csv                         sample_id,status,error
<dest>/config.yaml                              the export parameters
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store import json_attr
from .base import ExportContext, Layout
from .commit import Plan, json_writer, npz_writer, torch_writer
from .meta import SPACING_TOLERANCE, attrs_json, json_fingerprint, overlap_fraction, provenance, software, stamp
from .patients import export_patients
from .report import ExportReport
from .runfiles import write_config, write_process_list
from .source import SlideData


class Slide2vec(Layout):
    name = "slide2vec"
    title = "slide2vec"
    summary = "tile_embeddings/ slide_embeddings/ patient_embeddings/ tiles/ process_list.csv config.yaml"

    def plan(self, slide: SlideData, ctx: ExportContext, fingerprint: str) -> tuple[list[Plan], Path]:
        sid, d = slide.slide_id, ctx.dest
        npz = d / "tiles" / f"{sid}.coordinates.npz"
        cmeta = d / "tiles" / f"{sid}.coordinates.meta.json"
        tile_meta = d / "tile_embeddings" / f"{sid}.meta.json"
        prov = provenance(slide, ctx, fingerprint)
        plans = [
            Plan(npz, npz_writer(coordinate_arrays(slide))),
            Plan(cmeta, json_writer(coordinates_meta(slide, ctx, npz.name, fingerprint))),
            Plan(d / "tile_embeddings" / f"{sid}.pt", torch_writer(slide.features)),
        ]
        vec = slide.slide_features
        if ctx.slide_encoder and vec is not None:
            plans += [
                Plan(d / "slide_embeddings" / f"{sid}.pt", torch_writer(vec)),
                Plan(d / "slide_embeddings" / f"{sid}.meta.json", json_writer(slide_meta(slide, vec, ctx, prov))),
            ]
        # the sidecar last: it certifies the rest
        plans.append(Plan(tile_meta, json_writer(tile_meta_of(slide, ctx, npz, cmeta, prov))))
        return plans, tile_meta

    def exported_fingerprint(self, marker: Path) -> str | None:
        return json_fingerprint(marker)

    def finish(self, ctx: ExportContext, report: ExportReport) -> None:
        report.patients = export_patients(ctx)
        report.files.append(str(write_process_list(ctx.dest / "process_list.csv", report, ctx.wanted)))
        report.files.append(str(write_config(ctx.dest / "config.yaml", ctx, report)))


SLIDE2VEC = Slide2vec()


def coordinate_arrays(slide: SlideData) -> dict[str, np.ndarray]:
    return {
        "tile_index": np.arange(slide.n, dtype=np.int32),
        "x": slide.coords[:, 0].astype(np.int64),
        "y": slide.coords[:, 1].astype(np.int64),
        "tissue_fractions": slide.tissue_fraction.astype(np.float32),
    }


def tile_meta_of(slide: SlideData, ctx: ExportContext, npz: Path, cmeta: Path, prov: dict[str, Any]) -> dict[str, Any]:
    g, fa = slide.geometry, slide.feature_attrs
    return {
        "sample_id": slide.slide_id,
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
        "encoder_input_size_px": fa.get("input_size"),
        "requested_spacing_um": g["target_mpp"],
        "tile_size_lv0": g["patch_size_level0"],
        "weights_sha256": fa.get("weights_sha256", ""),
        "compatibility": compatibility(slide, ctx.encoder),
        "provenance": prov,
    }


def slide_meta(slide: SlideData, vec: np.ndarray, ctx: ExportContext, prov: dict[str, Any]) -> dict[str, Any]:
    sa = attrs_json(slide.slide_feature_attrs)
    return {
        "sample_id": slide.slide_id,
        "artifact_type": "slide_embeddings",
        "encoder_level": "slide",
        "encoder_name": ctx.slide_encoder,
        "tile_encoder": sa.get("patch_encoder") or sa.get("source_patch_encoder") or ctx.encoder,
        "feature_dim": int(vec.shape[0]),
        "feature_dtype": "fp32",
        "format": "pt",
        "image_path": slide.wsi_path,
        "num_tiles": slide.n,
        "provenance": {**prov, "slide_encoder": sa},
    }


def compatibility(slide: SlideData, encoder: str) -> dict[str, Any]:
    """How the encoder saw the tiles (slide2vec checks it before mixing embeddings)."""
    fa = slide.feature_attrs
    size = fa.get("input_size")
    mean, std = fa.get("mean"), fa.get("std")
    return {
        "encoder_name": encoder,
        "output_variant": "default",
        "precision": short_dtype(str(fa.get("precision", "float32"))),
        "feature_dtype": "fp32",
        "requested_tile_size_px": slide.geometry["patch_size"],
        "encoder_input_size_px": size,
        "transform": {
            "normalize": {"mean": mean, "std": std} if mean is not None else None,
            "resize": {"size": [size, size], "interpolation": fa.get("interpolation")} if size else None,
            "center_crop": None,
        },
    }


def short_dtype(s: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(s, s)


# -- <sample_id>.coordinates.meta.json --------------------------------------------------------------


def coordinates_meta(slide: SlideData, ctx: ExportContext, npz_name: str, fp: str) -> dict[str, Any]:
    return {
        "provenance": _coords_provenance(slide, ctx, fp),
        "slide": _slide_section(slide, ctx),
        "tiling": _tiling_section(slide),
        "segmentation": _segmentation_section(slide, ctx),
        "filtering": filtering(slide.recipe),
        "artifact": _artifact_section(slide, npz_name),
    }


def _coords_provenance(slide: SlideData, ctx: ExportContext, fp: str) -> dict[str, Any]:
    return {
        "sample_id": slide.slide_id,
        "image_path": slide.wsi_path,
        "mask_path": None,
        "backend": "atlaspatch",
        "requested_backend": "auto",
        "reader_path": slide.feature_attrs.get("reader_path", ""),
        **software(),
        "store_path": str(slide.store.path),
        "slide_id": slide.slide_id,
        "mpp_source": slide.attrs.get("mpp_source", ""),
        "vendor": slide.attrs.get("vendor", ""),
        "coords_recipe_hash": slide.attrs.get("recipe_hash", ""),
        **stamp(ctx, fp),
    }


def _slide_section(slide: SlideData, ctx: ExportContext) -> dict[str, Any]:
    g = slide.geometry
    return {
        "dimensions": [g["level0_width"], g["level0_height"]],
        "base_spacing_um": g["slide_mpp"],
        "level_downsamples": ctx.level_downsamples(slide.wsi_path),
        "level0_magnification": g["level0_magnification"],
        "objective_power": slide.attrs.get("objective_power"),
    }


def _tiling_section(slide: SlideData) -> dict[str, Any]:
    g, recipe = slide.geometry, slide.recipe
    req_spacing = g["target_mpp"]
    eff_spacing = g["patch_size_level0"] * g["slide_mpp"] / g["patch_size"] if g["patch_size"] else None
    within = bool(eff_spacing and req_spacing and abs(eff_spacing - req_spacing) / req_spacing <= SPACING_TOLERANCE)
    return {
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
        "overlap": overlap_fraction(g),
        "overlap_px": g["overlap"],
        "tolerance": SPACING_TOLERANCE,
        "min_tissue_fraction": recipe.get("min_tissue_fraction"),
        "is_within_tolerance": within,
        "n_tiles": slide.n,
    }


def _segmentation_section(slide: SlideData, ctx: ExportContext) -> dict[str, Any]:
    ma = slide.mask_attrs
    params = json_attr(ma.get("parameters")) or {}
    mds = ma.get("downsample")
    return {
        "tissue_method": ma.get("method") or params.get("method"),
        "seg_downsample": float(np.mean(mds)) if isinstance(mds, list) and mds else None,
        "seg_spacing_um": ma.get("mpp"),
        "mask_path": None,
        "contours_geojson": str(ctx.run.geojson_path(slide.slide_id)),
        "parameters": params,
        "recipe_hash": ma.get("recipe_hash", ""),
        "tissue_fraction": ma.get("tissue_fraction"),
    }


def filtering(recipe: dict[str, Any]) -> dict[str, Any]:
    """The patch filters of the coordinates recipe, as slide2vec names them."""
    fast = bool(recipe.get("fast_mode", True))
    return {
        "min_tissue_fraction": recipe.get("min_tissue_fraction"),
        "fast_mode": fast,
        "filter_white": not fast,
        "filter_black": not fast,
        "white_threshold": recipe.get("white_thresh"),
        "black_threshold": recipe.get("black_thresh"),
        "fraction_threshold": None if fast else 0.7,
    }


def _artifact_section(slide: SlideData, npz_name: str) -> dict[str, Any]:
    n = slide.n
    return {
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
    }


def _row_major(coords: np.ndarray) -> bool:
    if len(coords) < 2:
        return True
    key = coords[:, 1].astype(np.int64) * (int(coords[:, 0].max()) + 1) + coords[:, 0]
    return bool(np.all(np.diff(key) > 0))
