"""Stage `patch_coords`: the slide-global patch lattice at the run's geometry, the tissue fraction of
each patch from the mask, and the optional content filter; stored as coords / coords_ext /
tissue_fraction with the seed's (CLAM/TRIDENT-readable) attributes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np

from ..errors import GeometryError
from ..geometry import PatchGeometry, compute_geometry
from ..params import param, recipe_hash, ref
from ..patches import read_patches
from ..quality import PatchQuality, QualityParams, artifact_mask, patch_quality
from ..segmentation import SegmentationParams
from ..slide import SlideInfo
from ..source import SlideHandle
from ..store import (
    COORDS,
    COORDS_EXT,
    FOCUS,
    INK_FRACTION,
    TISSUE_FRACTION,
    DatasetWrite,
    RunLayout,
    write_dir_atomic,
    write_file_atomic,
)
from ..tiling import DEFAULT_MIN_TISSUE_FRACTION, is_background, tile
from ..visualization import DEFAULT_MAX_SIDE, PREVIEW_SIDE, jpeg_bytes, overlay_base, png_bytes
from .base import DONE, SKIPPED, Outcome, StageEnv, guard, upstream_missing
from .mask import MaskResult, load_tissue_mask, slide_file_attrs

ASSET = "patch_coords"
RECIPE_VERSION = 1
INK_DEFINITION = "share of the patch's mask-grid footprint under marker ink or debris (segmentation rules)"
FOCUS_DEFINITION = "var(Laplacian) / (var(grey) + 25) of the patch's grey level at focus_mpp; low = blurred"
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class CoordsParams(QualityParams):
    """Parameters of the patch_coords stage (the geometry itself is the run folder's; the patch
    quality flags — ink share, focus, optional removal — are QualityParams)."""

    SECTION: ClassVar[str] = "patch_coords"

    min_tissue_fraction: float = param(
        DEFAULT_MIN_TISSUE_FRACTION, "Keep patches with at least this tissue fraction (0-1)", ge=0, le=1
    )
    fast_mode: bool = param(True, "Off (--no-fast-mode): drop mostly white/black patches (reads every patch)")
    white_thresh: int = param(15, "Saturation below which a pixel is white (--no-fast-mode)", ge=0, le=255)
    black_thresh: int = param(50, "Gray level below which a pixel is black (--no-fast-mode)", ge=0, le=255)
    save_images: bool = param(False, "Write a PNG per patch under images/<slide_id>/", recipe=False)
    visualize_grids: bool = param(False, "Patch grid overlay in visualization/<slide>.png", recipe=False)
    patch_workers: int = param(
        DEFAULT_WORKERS, "Threads reading patches (--no-fast-mode, --save-images)", recipe=False, ge=1
    )
    write_batch: int = param(8192, "Rows per chunk of the coordinate datasets", recipe=False, ge=1)
    max_lattice: int = param(
        50_000_000,
        "Refuse a slide whose patch lattice has more positions (~56 bytes each in memory)",
        recipe=False,
        ge=1,
    )
    skip_existing: bool = param(True, "Reuse stored coordinates whose recipe matches", recipe=False, cli="")

    def recipe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"min_tissue_fraction": self.min_tissue_fraction, "fast_mode": self.fast_mode}
        if not self.fast_mode:
            d.update(white_thresh=self.white_thresh, black_thresh=self.black_thresh)
        return {**d, **QualityParams.recipe(self)}  # empty when off: earlier recipes keep their hash


@dataclass
class CoordsResult:
    slide_id: str
    geometry: PatchGeometry
    coords: np.ndarray  # int32 (N, 2)
    tissue_fraction: np.ndarray  # float32 (N,)
    grid_size: int
    filtered_background: int
    params: dict[str, Any]
    recipe_hash: str
    mask_recipe_hash: str
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    images: dict[str, bytes] | None = None  # in-memory PNG patches when save_images
    info: SlideInfo | None = None
    quality: PatchQuality | None = None  # ink share and focus per kept patch (patch quality on)
    quality_parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return int(len(self.coords))

    def coords_ext(self) -> np.ndarray:
        g = self.geometry
        ext = np.empty((len(self.coords), 5), np.int32)
        ext[:, :2] = self.coords
        ext[:, 2] = g.read_size
        ext[:, 3] = g.read_size
        ext[:, 4] = g.read_level
        return ext


def coords_recipe(geometry: PatchGeometry, params: CoordsParams, mask_hash: str) -> dict[str, Any]:
    geo = {k: v for k, v in geometry.as_dict().items() if k not in ("read_level", "read_downsample", "read_size")}
    return {"stage": ASSET, "version": RECIPE_VERSION, "geometry": geo, "mask_recipe": mask_hash, **params.recipe()}


def layout_geometry(info: SlideInfo, layout: RunLayout) -> PatchGeometry:
    return compute_geometry(info, layout.patch_size, layout.step_size, target_mpp=layout.target_mpp)


LATTICE_BYTES = 56  # per position while tiling: coords int32 ×2, fraction float32, mask boxes int64 ×4, keep


def check_lattice(info: SlideInfo, layout: RunLayout, cap: int) -> None:
    """GeometryError when the lattice would not fit the memory cap (e.g. a 1 px step on a big slide)."""
    from .preflight import lattice_positions

    n = lattice_positions(info, layout)
    if n > cap:
        raise GeometryError(
            f"the patch lattice would have {n:,} positions (~{n * LATTICE_BYTES / 2**30:.1f} GiB while tiling), "
            f"over the cap of {cap:,}; use a larger {ref('store', 'step_size')} or raise "
            f"{ref('patch_coords', 'max_lattice')}"
        )


def compute_patch_coords(
    slide: Any, slide_id: str, layout: RunLayout, mask: MaskResult, params: CoordsParams
) -> CoordsResult:
    t0 = time.perf_counter()
    g = layout_geometry(slide.info, layout)
    check_lattice(slide.info, layout, params.max_lattice)
    dx, dy = mask.downsample
    tiling = tile(mask.mask, dx, dy, slide.info.width, slide.info.height, g, params.min_tissue_fraction)
    coords, frac = tiling.coords, tiling.tissue_fraction
    warnings: list[str] = []
    dropped = 0
    images: dict[str, bytes] | None = {} if params.save_images else None
    # The white/black content filter is a brightfield rule: on fluorescence the dark pixels
    # between nuclei are tissue, and the mask already separated the black background.
    content_filter = not params.fast_mode and mask.modality != "fluorescence"
    if not params.fast_mode and not content_filter:
        warnings.append("white/black content filter skipped on a fluorescence slide")
    if len(coords) and (content_filter or params.save_images):
        keep = np.ones(len(coords), bool)
        for i, patch in read_patches(slide, g, coords, workers=params.patch_workers):
            if content_filter and is_background(patch, params.white_thresh, params.black_thresh):
                keep[i] = False
            elif images is not None:
                x, y = coords[i]
                images[f"{slide_id}_x{x}_y{y}.png"] = png_bytes(patch)
        dropped = int((~keep).sum())
        coords, frac = coords[keep], frac[keep]
    quality = None
    if params.enabled and len(coords):
        quality = _quality(slide, coords, g, mask, params)
        coords, frac = coords[quality.keep], frac[quality.keep]
        quality = replace(quality, ink_fraction=quality.ink_fraction[quality.keep], focus=quality.focus[quality.keep])
        if quality.removed_ink or quality.removed_focus:
            warnings.append(
                f"dropped {quality.removed_ink} patches for ink/debris, {quality.removed_focus} out of focus"
            )
    if len(coords) == 0:
        if mask.tissue_fraction == 0:
            warnings.append("no tissue detected: 0 patches")
        elif tiling.grid_size == 0:
            warnings.append(
                f"slide ({slide.info.width}x{slide.info.height}) is smaller than one patch "
                f"({g.patch_size_level0} px at level 0): 0 patches"
            )
        else:
            warnings.append("no patch passed the tissue/content filters: 0 patches")
    recipe = coords_recipe(g, params, mask.recipe_hash)
    return CoordsResult(
        slide_id=slide_id,
        geometry=g,
        coords=coords.astype(np.int32),
        tissue_fraction=frac.astype(np.float32),
        grid_size=tiling.grid_size,
        filtered_background=dropped,
        params=recipe,
        recipe_hash=recipe_hash(recipe),
        mask_recipe_hash=mask.recipe_hash,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
        images=images,
        info=slide.info,
        quality=quality,
        quality_parameters=QualityParams.recipe(params),
    )


def _quality(slide: Any, coords: np.ndarray, g: PatchGeometry, mask: MaskResult, params: CoordsParams) -> PatchQuality:
    """Ink share (the segmenter's ink/debris rules on the mask's thumbnail) and focus of each patch."""
    thumb = mask.thumbnail
    if thumb is None:  # a stored mask: its picture, at the mask's resolution
        thumb, _, _ = slide.read_thumbnail(mask.thumb_mpp)
    seg = {f.name for f in fields(SegmentationParams)}
    seg_params = SegmentationParams(**{k: v for k, v in mask.params.items() if k in seg})
    art = artifact_mask(thumb, mask.thumb_mpp, seg_params)
    return patch_quality(slide, coords, g.patch_size_level0, art, *mask.downsample, params)


def save_patch_coords(
    layout: RunLayout,
    result: CoordsResult,
    *,
    write_batch: int = 8192,
    mask: MaskResult | None = None,
    visualize_grids: bool = False,
) -> list[str]:
    """Write coords/coords_ext/tissue_fraction + file attrs, the patch PNGs and the grid overlay."""
    info = result.info
    assert info is not None, "save needs the slide info of computed coordinates"
    g = result.geometry
    n = result.num_patches
    coords_attrs = {
        # CLAM semantics: read `patch_size` pixels at `patch_level`, then resize to target_patch_size
        "patch_size": g.read_size,
        "patch_level": g.read_level,
        "downsample": [g.read_downsample, g.read_downsample],
        "level_dim": list(info.level_dimensions[g.read_level]),
        "name": result.slide_id,
        "target_patch_size": g.patch_size,
        "patch_size_level0": g.patch_size_level0,
        "step_size_level0": g.step_size_level0,
        "target_magnification": g.target_magnification,
        "level0_magnification": g.level0_magnification,
        "overlap": g.overlap,
    }
    rows = max(1, min(write_batch, n))
    datasets = {
        COORDS: DatasetWrite(result.coords.reshape(-1, 2), coords_attrs, chunk_rows=rows),
        COORDS_EXT: DatasetWrite(
            result.coords_ext(),
            {"columns": ["x", "y", "w", "h", "level"], "level_coordinates": "level0"},
            chunk_rows=rows,
        ),
        TISSUE_FRACTION: DatasetWrite(result.tissue_fraction, chunk_rows=rows),
    }
    q = result.quality
    if q is not None:
        qp = result.quality_parameters
        datasets[INK_FRACTION] = DatasetWrite(
            q.ink_fraction, {"parameters": qp, "definition": INK_DEFINITION}, chunk_rows=rows
        )
        datasets[FOCUS] = DatasetWrite(
            q.focus,
            {
                "parameters": qp,
                "focus_mpp": qp.get("focus_mpp"),
                "read_level": q.focus_level,
                "definition": FOCUS_DEFINITION,
            },
            chunk_rows=rows,
        )
    file_attrs = {
        **slide_file_attrs(info, result.slide_id),
        "patch_size": g.patch_size,
        "step_size": g.step_size,
        "num_patches": n,
        "target_magnification": g.target_magnification,
        "target_mpp": g.target_mpp,
        "patch_size_level0": g.patch_size_level0,
        "step_size_level0": g.step_size_level0,
        "overlap": g.overlap,
        "recipe": result.params,
        "recipe_hash": result.recipe_hash,
        "mask_recipe_hash": result.mask_recipe_hash,
    }
    if q is not None:
        file_attrs.update(quality_removed_ink=q.removed_ink, quality_removed_focus=q.removed_focus)
    store = layout.store(result.slide_id)
    # flags of an earlier recipe would no longer match these rows: they go with the old coordinates
    store.write(datasets, file_attrs, delete=() if q is not None else (INK_FRACTION, FOCUS))
    written = [str(store.path)]
    if result.images is not None:
        write_dir_atomic(layout.images_dir(result.slide_id), result.images)
        written.append(str(layout.images_dir(result.slide_id)))
    base = mask.base() if mask is not None else None
    if visualize_grids and base is not None:
        write_file_atomic(
            layout.visualization(result.slide_id), png_bytes(base.grid(result.coords, g.patch_size_level0))
        )
        written.append(str(layout.visualization(result.slide_id)))
    return written


def load_patch_coords(layout: RunLayout, slide_id: str) -> CoordsResult:
    """The stored coordinates with the geometry they were made with."""
    store = layout.store(slide_id)
    coords = store.coords()
    cattrs = store.coords_attrs()
    a = store.attrs()
    recipe = a.get("recipe") or "{}"
    recipe = json.loads(recipe) if isinstance(recipe, str) else recipe
    g = PatchGeometry(
        **dict(recipe.get("geometry", {})),
        read_level=int(cattrs["patch_level"]),
        read_downsample=float(cattrs["downsample"][0]),
        read_size=int(cattrs["patch_size"]),
    )
    return CoordsResult(
        slide_id=slide_id,
        geometry=g,
        coords=coords,
        tissue_fraction=store.tissue_fraction(),
        grid_size=-1,
        filtered_background=0,
        params=recipe,
        recipe_hash=str(a.get("recipe_hash", "")),
        mask_recipe_hash=str(a.get("mask_recipe_hash", "")),
    )


def _metadata(result: CoordsResult, store_path: str, reused: bool, mask: MaskResult | None) -> dict[str, Any]:
    g = result.geometry
    base = mask.base() if mask is not None else None
    preview = jpeg_bytes(base.grid(result.coords, g.patch_size_level0, PREVIEW_SIDE)) if base is not None else None
    q = result.quality
    extra = {}
    if q is not None and result.num_patches:
        extra = {
            "mean_ink_fraction": round(float(q.ink_fraction.mean()), 4),
            "median_focus": round(float(np.median(q.focus)), 3),
            "removed_for_ink": q.removed_ink,
            "removed_out_of_focus": q.removed_focus,
        }
    return {
        **extra,
        "num_patches": result.num_patches,
        "mean_tissue_fraction": round(float(result.tissue_fraction.mean()), 4) if result.num_patches else 0.0,
        "slide_mpp [µm/px]": g.slide_mpp,
        "target_mpp [µm/px]": g.target_mpp,
        "patch_size_level0 [px]": g.patch_size_level0,
        "read_level": g.read_level,
        "filtered_background": result.filtered_background,
        "recipe_hash": result.recipe_hash,
        "reused": reused,
        "warnings": "; ".join(result.warnings) or "none",
        "store": store_path,
        "preview": preview,
    }


def patch_coords(slide: SlideHandle, params: CoordsParams, env: StageEnv, mask: MaskResult | None = None) -> Outcome:
    """Run the stage for one slide; `mask` is the mask computed earlier in the same run, if any."""
    sid = slide.slide_id

    def work() -> Outcome:
        m = mask
        if m is None:
            if not env.layout.store(sid).has_mask():
                raise upstream_missing(env, sid, ASSET, "tissue_mask", "no tissue mask stored")
            m = load_tissue_mask(env.layout, sid)
        store = env.layout.store(sid)
        s = slide.open()
        g = layout_geometry(s.info, env.layout)
        want = recipe_hash(coords_recipe(g, params, m.recipe_hash))
        reuse = params.skip_existing and not params.save_images and not params.visualize_grids
        if reuse and store.recipe_hash_of(ASSET) == want:
            result = load_patch_coords(env.layout, sid)
            env.logger.info(f"{sid}: coordinates up to date (recipe {want}), reused")
            status, written = SKIPPED, [str(store.path)]
        else:
            if params.visualize_grids and m.overlay is None:
                m.overlay = overlay_base(s, m.thumbnail, m.downsample, DEFAULT_MAX_SIDE)
            result = compute_patch_coords(s, sid, env.layout, m, params)
            written = save_patch_coords(
                env.layout, result, write_batch=params.write_batch, mask=m, visualize_grids=params.visualize_grids
            )
            status = DONE
        for w in result.warnings:
            env.logger.warning(f"{sid}: {w}")
        return Outcome(
            ASSET,
            sid,
            status,
            metadata=_metadata(result, str(store.path), status == SKIPPED, m),
            warnings=list(result.warnings),
            written=written,
            seconds=result.seconds,
            recipe_hash=result.recipe_hash,
            parent_hashes={"tissue_mask": m.recipe_hash},
            rows=result.num_patches,
            dim=2,
            parameters=result.params,
            value=result,
        )

    return guard(ASSET, sid, env, work)
