"""slide2vec's run-level files: process_list.csv (one row a slide) and config.yaml (the export's parameters)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..store import json_attr
from .base import ExportContext
from .commit import Plan, bytes_writer, commit, plain
from .meta import SPACING_TOLERANCE, overlap_fraction, software
from .report import ExportReport

PROCESS_LIST_COLUMNS = ("sample_id", "status", "error")


def write_process_list(path: Path, report: ExportReport, wanted: Sequence[str]) -> Path:
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
    commit([Plan(path, bytes_writer(buf.getvalue().encode()))])
    return path


def write_config(path: Path, ctx: ExportContext, report: ExportReport) -> Path:
    """slide2vec's config.yaml: its model/tiling sections filled from the run, plus an `export` section."""
    import yaml

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
        "tiling": _tiling(ctx.run_params),
        "export": _export_section(ctx, report),
    }
    data = yaml.safe_dump(plain(config), sort_keys=False, default_flow_style=False).encode()
    commit([Plan(path, bytes_writer(data))])
    return path


def _tiling(run_params: dict[str, Any]) -> dict[str, Any]:
    g = dict(run_params.get("geometry") or {})
    recipe = dict(run_params.get("recipe") or {})
    mask = dict(run_params.get("mask") or {})
    seg = json_attr(mask.get("parameters")) or {}
    return {
        "backend": "atlaspatch",
        "params": {
            "requested_spacing_um": g.get("target_mpp"),
            "requested_tile_size_px": g.get("patch_size"),
            "tolerance": SPACING_TOLERANCE,
            "overlap": overlap_fraction(g),
            "tissue_threshold": recipe.get("min_tissue_fraction"),
        },
        "seg_params": {"method": mask.get("method") or seg.get("method"), **dict(seg.items())},
        "filter_params": {
            "fast_mode": recipe.get("fast_mode", True),
            "white_threshold": recipe.get("white_thresh"),
            "black_threshold": recipe.get("black_thresh"),
        },
    }


def _export_section(ctx: ExportContext, report: ExportReport) -> dict[str, Any]:
    return {
        **software(),
        "layout": ctx.layout.name,
        "source": str(report.source),
        "run_dir": str(ctx.run.root),
        "catalog": str(ctx.run.catalog_dir),
        "dest": str(ctx.dest),
        "encoder": ctx.encoder,
        "slide_encoder": ctx.slide_encoder,
        "slides": list(ctx.slides_arg) if ctx.slides_arg else None,
        "exported_slides": list(ctx.wanted),
        "force": bool(ctx.force),
        "exported_at": ctx.exported_at,
        "geometry": dict(ctx.run_params.get("geometry") or {}),
        "counts": report.counts(),
    }
