"""The stages as plain functions: slide → tissue mask → patch coordinates (no Dagster here).

Each stage has a `compute_*` (pure, returns a result object) and a `save_*`/`load_*` pair on
a `RunLayout` (the seed's run folder). Recipes (parameters that change the output) are hashed
and stored, so a stage can be skipped exactly when its stored recipe matches.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from shapely.geometry import Polygon

from .. import __version__
from . import geojson
from .errors import MissingMppError, SlideError
from .geometry import PatchGeometry, compute_geometry, run_folder_name, target_mpp_from
from .patches import read_patches
from .segmentation import SegmentationParams, TissueMask, mask_to_polygons, segment_tissue
from .segmentation.modality import resolve_modality
from .slide import Slide, SlideInfo
from .storage import DatasetWrite, SlideStore, recipe_hash, write_file_atomic
from .tiling import DEFAULT_MIN_TISSUE_FRACTION, is_background, tile
from .visualization import contour_overlay, grid_overlay, mask_overlay, png_bytes

log = logging.getLogger("atlaspatch")

MASK = "tissue/mask"
THUMBNAIL = "tissue/thumbnail_jpeg"  # the segmented thumbnail, JPEG bytes (previews, overlays)
COORDS = "coords"


@dataclass(frozen=True)
class RunLayout:
    """`<output>/<mag>x_<patch>px_<overlap>px_overlap/` and the per-slide paths inside it."""

    output: Path
    patch_size: int
    step_size: int
    target_magnification: float
    target_mpp: float

    @classmethod
    def create(
        cls,
        output: str | Path,
        patch_size: int,
        step_size: int | None = None,
        target_mag: float | None = None,
        target_mpp: float | None = None,
    ) -> RunLayout:
        t_mpp, t_mag = target_mpp_from(target_mag, target_mpp)
        return cls(Path(output), int(patch_size), int(step_size or patch_size), t_mag, t_mpp)

    @property
    def root(self) -> Path:
        return self.output / run_folder_name(self.target_magnification, self.patch_size, self.step_size)

    @property
    def catalog_dir(self) -> Path:
        return self.output / "catalog"

    def store(self, slide_id: str) -> SlideStore:
        return SlideStore(self.root / "patches" / f"{slide_id}.h5")

    def geojson_path(self, slide_id: str) -> Path:
        return self.root / "masks" / f"{slide_id}.geojson"

    def images_dir(self, slide_id: str) -> Path:
        return self.root / "images" / slide_id

    def visualization(self, slide_id: str, kind: str = "") -> Path:
        suffix = f"_{kind}" if kind else ""
        return self.root / "visualization" / f"{slide_id}{suffix}.png"


# -- tissue mask --------------------------------------------------------------------------------


@dataclass
class MaskResult:
    slide_id: str
    mask: np.ndarray  # uint8 0/1 at thumbnail resolution
    polygons: list[Polygon]
    downsample: tuple[float, float]  # level-0 px per mask px (x, y)
    thumb_mpp: float
    params: dict[str, Any]
    recipe_hash: str
    seconds: float = 0.0
    thumbnail: np.ndarray | None = None  # RGB, only in memory (previews)
    reused: bool = False
    info: SlideInfo | None = None
    visualize_mask: bool = False
    visualize_contours: bool = False
    modality: str = ""  # brightfield / fluorescence as segmented ("" for masks stored before)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def overlay_png(self, max_side: int = 512) -> bytes | None:
        if self.thumbnail is None:
            return None
        return png_bytes(mask_overlay(self.thumbnail, self.mask, max_side))


def mask_recipe(params: SegmentationParams) -> dict[str, Any]:
    return {"stage": "tissue_mask", "version": 1, **params.recipe()}


def compute_tissue_mask(slide: Slide, slide_id: str, params: SegmentationParams) -> MaskResult:
    """Segment tissue on a thumbnail at `params.mask_mpp` read from the best pyramid level."""
    if not slide.info.mpp:
        raise MissingMppError(slide.info.mpp_problem or "no MPP; give it with --mpp-csv", stage="tissue_mask")
    t0 = time.perf_counter()
    thumb, dx, dy = slide.read_thumbnail(params.mask_mpp)
    thumb_mpp = slide.info.mpp * (dx + dy) / 2
    modality = resolve_modality(thumb, params.modality)
    tm: TissueMask = segment_tissue(thumb, thumb_mpp, params)
    recipe = mask_recipe(params)
    return MaskResult(
        slide_id=slide_id,
        mask=tm.mask,
        polygons=tm.polygons,
        downsample=(dx, dy),
        thumb_mpp=thumb_mpp,
        params=recipe,
        recipe_hash=recipe_hash(recipe),
        seconds=time.perf_counter() - t0,
        thumbnail=thumb,
        info=slide.info,
        modality=modality,
    )


def save_tissue_mask(layout: RunLayout, result: MaskResult) -> None:
    """Write tissue/mask (+ slide attrs), the GeoJSON contours and the requested overlays."""
    if result.reused:
        return
    assert result.info is not None, "save needs the slide info of a computed mask"
    store = layout.store(result.slide_id)
    attrs = {
        "downsample": [float(result.downsample[0]), float(result.downsample[1])],
        "mpp": result.thumb_mpp,
        "method": result.params.get("method"),
        "parameters": result.params,
        "recipe_hash": result.recipe_hash,
        "tissue_fraction": result.tissue_fraction,
        "modality": result.modality,
    }
    datasets = {MASK: DatasetWrite(result.mask, attrs, compression="gzip")}
    if result.thumbnail is not None:
        ok, jpg = cv2.imencode(
            ".jpg", cv2.cvtColor(result.thumbnail, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85]
        )
        if ok:
            datasets[THUMBNAIL] = DatasetWrite(jpg.reshape(-1), {"format": "jpeg", "mpp": result.thumb_mpp})
    store.write(datasets, slide_file_attrs(result.info, result.slide_id))
    gj = geojson.tissue_geojson(result.polygons, result.downsample[0], result.downsample[1], result.slide_id)
    write_file_atomic(layout.geojson_path(result.slide_id), geojson.dumps(gj))
    if result.thumbnail is not None:
        if result.visualize_mask:
            write_file_atomic(
                layout.visualization(result.slide_id, "mask"),
                png_bytes(mask_overlay(result.thumbnail, result.mask)),
            )
        if result.visualize_contours:
            write_file_atomic(
                layout.visualization(result.slide_id, "contours"),
                png_bytes(contour_overlay(result.thumbnail, result.polygons)),
            )


def load_tissue_mask(layout: RunLayout, slide_id: str) -> MaskResult:
    store = layout.store(slide_id)
    if not store.has(MASK):
        raise SlideError(
            f"no tissue mask stored at {store.path}; materialize tissue_mask first",
            slide=slide_id,
            stage="patch_coords",
        )
    mask, attrs = store.read(MASK)
    thumbnail = None
    if store.has(THUMBNAIL):
        jpg, _ = store.read(THUMBNAIL)
        thumbnail = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    params = attrs.get("parameters") or "{}"
    import json

    params = json.loads(params) if isinstance(params, str) else params
    ds = attrs.get("downsample", [1.0, 1.0])
    px_um2 = float(attrs.get("mpp", 8.0)) ** 2
    polys = mask_to_polygons(mask, 1.0, float(params.get("min_hole_area_um2", 0.0)) / px_um2)
    return MaskResult(
        slide_id=slide_id,
        mask=mask.astype(np.uint8),
        polygons=polys,
        downsample=(float(ds[0]), float(ds[1])),
        thumb_mpp=float(attrs.get("mpp", 0.0)),
        params=params,
        recipe_hash=str(attrs.get("recipe_hash", "")),
        thumbnail=thumbnail,
        reused=True,
        modality=str(attrs.get("modality", "")),
    )


def stored_mask_recipe(layout: RunLayout, slide_id: str) -> str | None:
    return layout.store(slide_id).dataset_attrs(MASK).get("recipe_hash") or None


# -- patch coordinates --------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordsParams:
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION
    fast_mode: bool = True
    white_thresh: int = 15
    black_thresh: int = 50
    save_images: bool = False
    visualize_grids: bool = False
    patch_workers: int = 2
    write_batch: int = 8192  # rows per write chunk (HDF5 chunking of coords)

    def recipe(self) -> dict[str, Any]:
        d = {"min_tissue_fraction": self.min_tissue_fraction, "fast_mode": self.fast_mode}
        if not self.fast_mode:
            d.update(white_thresh=self.white_thresh, black_thresh=self.black_thresh)
        return d


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
    reused: bool = False
    warnings: list[str] = field(default_factory=list)
    images: dict[str, bytes] | None = None  # in-memory PNG patches when save_images
    info: SlideInfo | None = None
    mask: MaskResult | None = None  # for the grid overlay
    visualize_grids: bool = False
    write_batch: int = 8192

    @property
    def num_patches(self) -> int:
        return int(len(self.coords))

    def coords_ext(self) -> np.ndarray:
        g = self.geometry
        n = len(self.coords)
        ext = np.empty((n, 5), np.int32)
        ext[:, :2] = self.coords
        ext[:, 2] = g.read_size
        ext[:, 3] = g.read_size
        ext[:, 4] = g.read_level
        return ext


def coords_recipe(geometry: PatchGeometry, params: CoordsParams, mask_hash: str) -> dict[str, Any]:
    geo = {k: v for k, v in geometry.as_dict().items() if k not in ("read_level", "read_downsample", "read_size")}
    return {
        "stage": "patch_coords",
        "version": 1,
        "geometry": geo,
        "mask_recipe": mask_hash,
        **params.recipe(),
    }


def compute_patch_coords(
    slide: Slide, slide_id: str, layout: RunLayout, mask: MaskResult, params: CoordsParams
) -> CoordsResult:
    t0 = time.perf_counter()
    g = compute_geometry(slide.info, layout.patch_size, layout.step_size, target_mpp=layout.target_mpp)
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
        mask=mask,
        visualize_grids=params.visualize_grids,
        write_batch=params.write_batch,
    )


def slide_file_attrs(info: SlideInfo, slide_id: str) -> dict[str, Any]:
    return {
        "slide_id": slide_id,
        "wsi_path": info.path,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "level0_width": info.width,
        "level0_height": info.height,
        "level0_magnification": info.magnification,
        "objective_power": info.objective_power,
        "vendor": info.vendor,
        "software_version": __version__,
    }


def save_patch_coords(layout: RunLayout, result: CoordsResult) -> None:
    """Write coords/coords_ext/tissue_fraction + file attrs, patch PNGs and the grid overlay."""
    if result.reused:
        return
    info, mask, write_batch = result.info, result.mask, result.write_batch
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
    rows = max(1, min(write_batch, n))  # --write-batch: rows per HDF5 chunk
    datasets = {
        COORDS: DatasetWrite(result.coords.reshape(-1, 2), coords_attrs, chunk_rows=rows),
        "coords_ext": DatasetWrite(
            result.coords_ext(),
            {"columns": ["x", "y", "w", "h", "level"], "level_coordinates": "level0"},
            chunk_rows=rows,
        ),
        "tissue_fraction": DatasetWrite(result.tissue_fraction, chunk_rows=rows),
    }
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
    layout.store(result.slide_id).write(datasets, file_attrs)
    if result.images is not None:
        _write_images_dir(layout.images_dir(result.slide_id), result.images)
    if result.visualize_grids and mask is not None and mask.thumbnail is not None:
        write_file_atomic(
            layout.visualization(result.slide_id),
            png_bytes(grid_overlay(mask.thumbnail, result.coords, g.patch_size_level0, *mask.downsample)),
        )


def _write_images_dir(target: Path, images: dict[str, bytes]) -> None:
    """Write all PNGs into a hidden sibling folder, then swap it in (no half-filled folder)."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name, data in images.items():
            (tmp / name).write_bytes(data)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stored_coords_recipe(layout: RunLayout, slide_id: str) -> str | None:
    store = layout.store(slide_id)
    if not store.has(COORDS):
        return None
    return store.attrs().get("recipe_hash") or None


def load_patch_coords(layout: RunLayout, slide_id: str, info: SlideInfo | None = None) -> CoordsResult:
    store = layout.store(slide_id)
    if not store.has(COORDS):
        raise SlideError(f"no coordinates stored at {store.path}", slide=slide_id, stage="patch_coords")
    import json

    coords, cattrs = store.read(COORDS)
    frac, _ = store.read("tissue_fraction")
    a = store.attrs()
    recipe = a.get("recipe") or "{}"
    recipe = json.loads(recipe) if isinstance(recipe, str) else recipe
    geo = dict(recipe.get("geometry", {}))
    g = PatchGeometry(
        **geo,
        read_level=int(cattrs["patch_level"]),
        read_downsample=float(cattrs["downsample"][0]),
        read_size=int(cattrs["patch_size"]),
    )
    return CoordsResult(
        slide_id=slide_id,
        geometry=g,
        coords=coords.astype(np.int32).reshape(-1, 2),
        tissue_fraction=frac.astype(np.float32),
        grid_size=-1,
        filtered_background=0,
        params=recipe,
        recipe_hash=str(a.get("recipe_hash", "")),
        mask_recipe_hash=str(a.get("mask_recipe_hash", "")),
        reused=True,
    )
