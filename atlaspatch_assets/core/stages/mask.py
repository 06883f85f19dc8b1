"""Stage `tissue_mask`: a tissue mask on a thumbnail at a fixed physical resolution, stored as
`tissue/mask` (+ the thumbnail, for previews), with GeoJSON contours and optional overlays."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import cv2
import numpy as np
from shapely.geometry import Polygon

from ... import __version__
from .. import geojson
from ..catalog import SLIDES, fingerprint
from ..errors import MissingMppError
from ..params import param, recipe_hash
from ..segmentation import SegmentationParams, mask_to_polygons, segment_tissue
from ..segmentation.modality import resolve_modality
from ..slide import SlideInfo
from ..source import SlideHandle
from ..store import MASK, THUMBNAIL, DatasetWrite, RunLayout, write_file_atomic
from ..visualization import DEFAULT_MAX_SIDE, PREVIEW_SIDE, OverlayBase, jpeg_bytes, overlay_base, png_bytes
from .base import DONE, SKIPPED, Outcome, StageEnv, guard

ASSET = "tissue_mask"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class MaskParams(SegmentationParams):
    """Parameters of the tissue_mask stage: how to segment (SegmentationParams) and what to draw."""

    SECTION: ClassVar[str] = "tissue_mask"

    visualize_mask: bool = param(False, "Mask overlay in visualization/<slide>_mask.png", recipe=False)
    visualize_contours: bool = param(False, "Contour overlay in visualization/<slide>_contours.png", recipe=False)
    overlay_side: int = param(
        DEFAULT_MAX_SIDE, "Long side of the QC pictures (px; never upscaled past the level read)", recipe=False, ge=64
    )
    seg_batch_size: int = param(
        1, "Thumbnails per SAM2 forward (seed option; slides are segmented one at a time)", recipe=False, ge=1
    )
    skip_existing: bool = param(True, "Reuse a stored mask whose recipe matches", recipe=False, cli="")


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
    thumbnail: np.ndarray | None = None  # RGB, in memory (previews)
    overlay: OverlayBase | None = None  # the picture QC overlays are drawn on (in memory)
    info: SlideInfo | None = None
    modality: str = ""  # brightfield / fluorescence as segmented ("" for masks stored before)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def base(self) -> OverlayBase | None:
        if self.overlay is None and self.thumbnail is not None:
            self.overlay = OverlayBase(self.thumbnail, self.downsample)
        return self.overlay

    def preview(self) -> bytes | None:
        """The contour picture (outlines and holes over the slide), at preview size, JPEG."""
        base = self.base()
        return None if base is None else jpeg_bytes(base.contours(self.polygons, self.downsample, PREVIEW_SIDE))


def mask_recipe(params: SegmentationParams) -> dict[str, Any]:
    return {"stage": ASSET, "version": RECIPE_VERSION, **params.recipe()}


def compute_tissue_mask(slide: Any, slide_id: str, params: SegmentationParams) -> MaskResult:
    """Segment tissue on a thumbnail at `params.mask_mpp` read from the best pyramid level."""
    if not slide.info.mpp:
        raise MissingMppError(slide.info.mpp_problem or "no MPP in the slide metadata", stage=ASSET)
    t0 = time.perf_counter()
    thumb, dx, dy = slide.read_thumbnail(params.mask_mpp)
    thumb_mpp = slide.info.mpp * (dx + dy) / 2
    modality = resolve_modality(thumb, params.modality)
    tm = segment_tissue(thumb, thumb_mpp, params)
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


def slide_file_attrs(info: SlideInfo, slide_id: str) -> dict[str, Any]:
    """File attributes describing the slide (written with the mask and the coordinates)."""
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


def save_tissue_mask(
    layout: RunLayout, result: MaskResult, *, visualize_mask: bool = False, visualize_contours: bool = False
) -> list[str]:
    """Write tissue/mask (+ thumbnail, slide attrs), the GeoJSON contours and the requested overlays."""
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
        bgr = cv2.cvtColor(result.thumbnail, cv2.COLOR_RGB2BGR)
        ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            datasets[THUMBNAIL] = DatasetWrite(jpg.reshape(-1), {"format": "jpeg", "mpp": result.thumb_mpp})
    store.write(datasets, slide_file_attrs(result.info, result.slide_id))
    written = [str(store.path)]
    gj = geojson.tissue_geojson(result.polygons, result.downsample[0], result.downsample[1], result.slide_id)
    write_file_atomic(layout.geojson_path(result.slide_id), geojson.dumps(gj))
    written.append(str(layout.geojson_path(result.slide_id)))
    base = result.base()
    if base is not None:
        pictures = {
            "mask": visualize_mask and (lambda: base.mask(result.mask)),
            "contours": visualize_contours and (lambda: base.contours(result.polygons, result.downsample)),
        }
        for kind, draw in pictures.items():
            if draw:
                write_file_atomic(layout.visualization(result.slide_id, kind), png_bytes(draw()))
                written.append(str(layout.visualization(result.slide_id, kind)))
    return written


def load_tissue_mask(layout: RunLayout, slide_id: str) -> MaskResult:
    """The stored mask (polygons re-traced with the stored hole filter, thumbnail decoded)."""
    store = layout.store(slide_id)
    mask, attrs = store.mask()
    thumbnail = None
    jpg = store.thumbnail_jpeg()
    if jpg is not None:
        thumbnail = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    params = attrs.get("parameters") or "{}"
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
        modality=str(attrs.get("modality", "")),
    )


def _metadata(result: MaskResult, store: Any, reused: bool, geojson_path: Any) -> dict[str, Any]:
    info = result.info
    return {
        "tissue_fraction": round(result.tissue_fraction, 4),
        "regions": len(result.polygons),
        "mask_shape": f"{result.mask.shape[1]}x{result.mask.shape[0]}",
        "mask_mpp [µm/px]": round(result.thumb_mpp, 3),
        "slide_mpp [µm/px]": info.mpp if info else store.attrs().get("mpp"),
        "method": result.params.get("method"),
        "modality": result.modality,
        "recipe_hash": result.recipe_hash,
        "reused": reused,
        "store": str(store.path),
        "geojson": str(geojson_path),
        "preview": result.preview(),
    }


def _register_slide(env: StageEnv, slide_id: str, info: SlideInfo) -> None:
    if env.catalog is None:
        return
    row: dict[str, Any] = {
        "slide_id": slide_id,
        "path": info.path,
        "vendor": info.vendor,
        "width": info.width,
        "height": info.height,
        "levels": info.level_count,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "objective": info.objective_power,
    }
    try:
        st = os.stat(info.path)
        row.update(size=st.st_size, mtime=st.st_mtime, fingerprint=fingerprint(info.path))
    except OSError:
        pass
    env.catalog.append(SLIDES, [row])


def tissue_mask(slide: SlideHandle, params: MaskParams, env: StageEnv, device: str = "cpu") -> Outcome:
    """Run the stage for one slide: skip by stored recipe, or segment, save atomically, record."""
    sid = slide.slide_id
    params = replace(params, device=device)

    def work() -> Outcome:
        store = env.layout.store(sid)
        want = recipe_hash(mask_recipe(params))
        if params.skip_existing and store.recipe_hash_of(ASSET) == want:
            result = load_tissue_mask(env.layout, sid)
            env.logger.info(f"{sid}: tissue mask up to date (recipe {want}), reused")
            status, written = SKIPPED, [str(store.path)]
        else:
            result = compute_tissue_mask(slide.open(), sid, params)
            result.overlay = overlay_base(slide.open(), result.thumbnail, result.downsample, params.overlay_side)
            written = save_tissue_mask(
                env.layout, result, visualize_mask=params.visualize_mask, visualize_contours=params.visualize_contours
            )
            _register_slide(env, sid, result.info)
            status = DONE
        warnings = [] if result.tissue_fraction > 0 else ["no tissue detected"]
        return Outcome(
            ASSET,
            sid,
            status,
            metadata=_metadata(result, store, status == SKIPPED, env.layout.geojson_path(sid)),
            warnings=warnings,
            written=written,
            seconds=result.seconds,
            recipe_hash=result.recipe_hash,
            rows=int(result.mask.size),
            parameters=result.params,
            value=result,
        )

    return guard(ASSET, sid, env, work)
