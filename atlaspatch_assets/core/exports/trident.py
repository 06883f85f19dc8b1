"""TRIDENT's layout: ``<dest>/features_<encoder>/<slide>.h5`` with ``features`` (N, D) and ``coords`` (N, 2) whose
attrs are TRIDENT's (patch_size at the target magnification, patch_size_level0, level0_magnification,
target_magnification, overlap, name, savetodir); with --slide-encoder also
``<dest>/slide_features_<slide_encoder>/<slide>.h5`` (``features`` (D,) + ``coords``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ExportContext
from .commit import Plan
from .h5files import H5Layout, features_coords_writer
from .meta import features_file_attrs
from .source import SlideData


class Trident(H5Layout):
    name = "trident"
    title = "TRIDENT"
    summary = "features_<enc>/<slide>.h5"
    dest_per_encoder = False  # features_<encoder>/ folders keep encoders apart in one destination

    def plan(self, slide: SlideData, ctx: ExportContext, fingerprint: str) -> tuple[list[Plan], Path]:
        sid = slide.slide_id
        fdir = ctx.dest / f"features_{ctx.encoder}"
        h5 = fdir / f"{sid}.h5"
        cattrs = coords_attrs(slide, ctx.dest)
        fattrs = features_file_attrs(slide, ctx, fingerprint, fdir, ctx.encoder)
        plans = [Plan(h5, features_coords_writer(slide.features, fattrs, slide.coords, cattrs))]
        vec = slide.slide_features
        if ctx.slide_encoder and vec is not None:
            sdir = ctx.dest / f"slide_features_{ctx.slide_encoder}"
            sattrs = {
                **features_file_attrs(slide, ctx, fingerprint, sdir, ctx.slide_encoder),
                "patch_encoder": ctx.encoder,
            }
            plans.insert(0, Plan(sdir / f"{sid}.h5", features_coords_writer(vec, sattrs, slide.coords, cattrs)))
        return plans, h5  # the patch-features file (written last) carries the fingerprint


TRIDENT = Trident()


def coords_attrs(slide: SlideData, savetodir: Path) -> dict[str, Any]:
    g = slide.geometry
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
