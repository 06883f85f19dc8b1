"""Provenance and fingerprints shared by every layout's metadata (JSON sidecars, HDF5 attrs, config.yaml)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ... import __version__
from ..store import json_attr
from .base import ExportContext
from .commit import json_default
from .source import SlideData

EXPORT_VERSION = 1  # bump when the exported files change for the same inputs
SOFTWARE = "atlaspatch-assets"
SPACING_TOLERANCE = 0.05  # relative; matches the geometry's never-upsample tolerance
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")  # encoder and case names become file and folder names


def software() -> dict[str, str]:
    return {"software": SOFTWARE, "software_version": __version__}


def stamp(ctx: ExportContext, fingerprint: str) -> dict[str, str]:
    """What identifies this export of a file: its fingerprint (the skip test) and when it was written."""
    return {"export_fingerprint": fingerprint, "exported_at": ctx.exported_at}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short_hash(ident: Any) -> str:
    return sha256(json.dumps(ident, sort_keys=True, default=json_default).encode())[:16]


def fingerprint(layout: str, slide: SlideData, encoder: str, slide_encoder: str | None) -> str:
    """Changes when what the files would hold changes (inputs' recipes, else their bytes; shapes; version)."""
    ident: dict[str, Any] = {
        "export_version": EXPORT_VERSION,
        "layout": layout,
        "encoder": encoder,
        "shape": [slide.n, slide.dim],
        "coords_recipe_hash": slide.attrs.get("recipe_hash", ""),
        "features_recipe_hash": slide.feature_attrs.get("recipe_hash", ""),
    }
    if not ident["features_recipe_hash"]:
        ident["features_sha256"] = sha256(slide.features.tobytes())
    if not ident["coords_recipe_hash"]:
        ident["coords_sha256"] = sha256(slide.coords.tobytes())
    if slide_encoder and slide.slide_features is not None:
        ident["slide_encoder"] = slide_encoder
        ident["slide_features_sha256"] = sha256(slide.slide_features.tobytes())
    return short_hash(ident)


def json_fingerprint(path: Path) -> str | None:
    """`provenance.export_fingerprint` of an exported .meta.json."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return (meta.get("provenance") or {}).get("export_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def attrs_json(attrs: dict[str, Any]) -> dict[str, Any]:
    """Stored attrs with their JSON strings (recipes, parameters) as objects."""
    return {k: json_attr(v) for k, v in attrs.items()}


def provenance(slide: SlideData, ctx: ExportContext, fp: str) -> dict[str, Any]:
    """Where a slide's exported files come from: store, slide, geometry, recipes, encoder."""
    g = slide.geometry
    fa = slide.feature_attrs
    return {
        **software(),
        "store_software_version": slide.attrs.get("software_version", ""),
        "store_path": str(slide.store.path),
        "run_dir": str(ctx.run.root),
        "slide_id": slide.slide_id,
        "wsi_path": slide.wsi_path,
        "mpp": g["slide_mpp"],
        "mpp_source": slide.attrs.get("mpp_source", ""),
        "vendor": slide.attrs.get("vendor", ""),
        "geometry": g,
        "coords_recipe_hash": slide.attrs.get("recipe_hash", ""),
        "features_recipe_hash": fa.get("recipe_hash", ""),
        "encoder": attrs_json(fa),  # model id, weights sha256, precision, input size, library versions…
        "weights_sha256": fa.get("weights_sha256", ""),
        "stored_dtype": slide.stored_dtype,
        **stamp(ctx, fp),
    }


def features_file_attrs(slide: SlideData, ctx: ExportContext, fp: str, savetodir: Path, encoder: str) -> dict[str, Any]:
    """Attrs of an exported `features` dataset (TRIDENT, CLAM): what computed it, and this export's stamp."""
    fa = slide.feature_attrs
    return {
        "name": slide.slide_id,
        "savetodir": str(savetodir),
        "encoder": encoder,
        "model_id": fa.get("model_id", ""),
        "weights_sha256": fa.get("weights_sha256", ""),
        "recipe_hash": fa.get("recipe_hash", ""),
        **software(),
        "wsi_path": slide.wsi_path,
        **stamp(ctx, fp),
    }


def overlap_fraction(g: dict[str, Any]) -> float:
    """Overlap as a fraction of the patch (slide2vec's `overlap`)."""
    ps = g.get("patch_size")
    return round(g.get("overlap", 0) / ps, 6) if ps else 0.0
