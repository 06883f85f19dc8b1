"""CLAM's layout: ``<dest>/h5_files/<slide>.h5`` (``features`` + ``coords`` with CLAM's patch_level/patch_size
attrs) and ``<dest>/pt_files/<slide>.pt`` (torch float32 (N, D)). Patch features only: no slide embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ExportContext
from .commit import Plan, torch_writer
from .h5files import H5Layout, features_coords_writer
from .meta import features_file_attrs
from .source import SlideData


class Clam(H5Layout):
    name = "clam"
    title = "CLAM"
    summary = "h5_files/ + pt_files/"
    slide_embeddings = False

    def plan(self, slide: SlideData, ctx: ExportContext, fingerprint: str) -> tuple[list[Plan], Path]:
        sid = slide.slide_id
        h5 = ctx.dest / "h5_files" / f"{sid}.h5"
        fattrs = features_file_attrs(slide, ctx, fingerprint, h5.parent, ctx.encoder)
        plans = [
            Plan(ctx.dest / "pt_files" / f"{sid}.pt", torch_writer(slide.features)),
            Plan(h5, features_coords_writer(slide.features, fattrs, slide.coords, coords_attrs(slide))),
        ]
        return plans, h5


CLAM = Clam()


def coords_attrs(slide: SlideData) -> dict[str, Any]:
    """The store's coords attrs (CLAM's patch_level, patch_size, level_dim…), completed as CLAM reads them."""
    ca = dict(slide.coords_attrs)
    ca.setdefault("name", slide.slide_id)
    if "level_dim" in ca:
        ca.setdefault("downsampled_level_dim", ca["level_dim"])
    return ca
