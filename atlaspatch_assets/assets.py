"""Slide assets: `tissue_mask` → `patch_coords`, partitioned by slide, batched for backfills.

Each asset processes every partition of its run (one for CLI/sensor runs, many for batched
backfills) and returns `{slide_id: result}`; the slide-store IO manager writes each slide
atomically. A slide error never takes its batch down: in a single-slide run it fails the run
with a one-line reason; in a batched run the slide is left unwritten, logged at ERROR,
recorded in the catalog and flagged by the partitioned asset checks, and the others finish.
"""

import base64
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    Backoff,
    Config,
    Failure,
    MetadataValue,
    RetryPolicy,
    asset,
)
from pydantic import Field

from . import __version__
from .core.catalog import SLIDES
from .core.errors import SlideError
from .core.geometry import compute_geometry
from .core.pipeline import (
    CoordsParams,
    MaskResult,
    RunLayout,
    compute_patch_coords,
    compute_tissue_mask,
    coords_recipe,
    load_patch_coords,
    load_tissue_mask,
    mask_recipe,
    stored_coords_recipe,
    stored_mask_recipe,
)
from .core.retry import call_with_retries, is_transient
from .core.segmentation import SegmentationParams
from .core.storage import recipe_hash
from .core.tiling import DEFAULT_MIN_TISSUE_FRACTION
from .partitions import slides_partitions
from .resources import ComputeResource, SlideSourceResource, StoreResource

BACKFILL_BATCH_ENV = "ATLASPATCH_BACKFILL_BATCH"
DEFAULT_BATCH_SIZE = 25


def backfill_batch_size() -> int:
    """Slides per backfill run: $ATLASPATCH_BACKFILL_BATCH (an integer >= 1), default 25.

    Read when the code location loads (set it for the webserver/daemon/run processes alike).
    """
    raw = os.environ.get(BACKFILL_BATCH_ENV, "").strip()
    if not raw:
        return DEFAULT_BATCH_SIZE
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        warnings.warn(f"{BACKFILL_BATCH_ENV}={raw!r} is not an integer >= 1; using {DEFAULT_BATCH_SIZE}", stacklevel=2)
        return DEFAULT_BATCH_SIZE
    return value


BATCH_SIZE = backfill_batch_size()  # slides per run in backfills: amortizes process start and imports
backfill_policy = BackfillPolicy.multi_run(max_partitions_per_run=BATCH_SIZE)
# Step-level retry for single-slide runs whose transient I/O errors outlived the in-place retries
# of core.retry; deterministic slide errors raise Failure(allow_retries=False) and never retry.
io_retry = RetryPolicy(max_retries=2, delay=2.0, backoff=Backoff.EXPONENTIAL)

T = TypeVar("T")


class TissueMaskConfig(Config):
    method: str = Field("otsu", description="otsu (classical, no weights) or sam2")
    modality: str = Field("auto", description="otsu: auto, brightfield or fluorescence (dark background)")
    tissue_thresh: float = Field(0.01, description="Min tissue region area, fraction of the thumbnail")
    min_hole_area_um2: float = Field(20_000.0, description="Holes smaller than this (µm²) are filled")
    mask_mpp: float = Field(8.0, description="Thumbnail resolution of the mask (µm/px)")
    sam2_checkpoint: str = Field("", description="Local SAM2 checkpoint (.pt) for method=sam2")
    seg_batch_size: int = Field(1, description="Thumbnails per SAM2 forward (seed option)")
    visualize_mask: bool = False
    visualize_contours: bool = False
    skip_existing: bool = Field(True, description="Reuse a stored mask whose recipe matches")

    def params(self, device: str) -> SegmentationParams:
        return SegmentationParams(
            method=self.method,
            modality=self.modality,
            tissue_thresh=self.tissue_thresh,
            min_hole_area_um2=self.min_hole_area_um2,
            mask_mpp=self.mask_mpp,
            sam2_checkpoint=self.sam2_checkpoint or None,
            device=device,
        )


class PatchCoordsConfig(Config):
    min_tissue_fraction: float = Field(DEFAULT_MIN_TISSUE_FRACTION, description="Keep patches with >= this tissue")
    fast_mode: bool = Field(True, description="False: drop mostly white/black patches (reads pixels)")
    white_thresh: int = 15
    black_thresh: int = 50
    save_images: bool = False
    visualize_grids: bool = False
    patch_workers: int = 2
    write_batch: int = 8192
    skip_existing: bool = Field(True, description="Reuse stored coordinates whose recipe matches")

    def params(self) -> CoordsParams:
        return CoordsParams(
            min_tissue_fraction=self.min_tissue_fraction,
            fast_mode=self.fast_mode,
            white_thresh=self.white_thresh,
            black_thresh=self.black_thresh,
            save_images=self.save_images,
            visualize_grids=self.visualize_grids,
            patch_workers=self.patch_workers,
            write_batch=self.write_batch,
        )


def _per_slide(
    context: AssetExecutionContext, store: StoreResource, asset_name: str, fn: Callable[[str], T]
) -> dict[str, T]:
    """Run `fn` for every partition of the run; slide errors are isolated (see module doc).

    Transient I/O errors are retried in place with exponential backoff (core.retry); when they
    persist, a single-slide run fails with retries allowed (the step's RetryPolicy runs it again),
    while deterministic slide errors fail at once and are never retried.
    """
    keys = list(context.partition_keys)
    results: dict[str, T] = {}
    failures: dict[str, str] = {}
    transient: set[str] = set()
    for key in keys:
        t0 = time.perf_counter()

        def log_retry(n: int, e: BaseException, wait: float, key: str = key) -> None:
            context.log.warning(f"{key}: transient error, retry {n} in {wait:.1f}s: {type(e).__name__}: {e}")

        try:
            results[key] = call_with_retries(lambda key=key: fn(key), on_retry=log_retry)
        except SlideError as e:
            e.slide = e.slide or key
            failures[key] = e.one_line()
            if is_transient(e):
                transient.add(key)
        except Exception as e:  # unexpected: still one slide's problem, with its type
            failures[key] = SlideError(f"{type(e).__name__}: {e}", slide=key, stage=asset_name).one_line()
            if is_transient(e):
                transient.add(key)
        if key in failures:
            context.log.error(f"FAILED {failures[key]}")
            store.catalog.record_event(
                slide_id=key,
                asset=asset_name,
                status="failed",
                error=failures[key],
                seconds=time.perf_counter() - t0,
                run_id=context.run.run_id,
                versions={"atlaspatch": __version__},
            )
            if len(keys) > 1:
                context.add_asset_metadata({"status": "failed", "error": failures[key]}, partition_key=key)
    if failures and len(keys) == 1:
        key = next(iter(failures))
        raise Failure(description=failures[key], allow_retries=key in transient)
    return results


def _preview(png: bytes | None) -> dict[str, Any]:
    if not png:
        return {}
    b64 = base64.b64encode(png).decode()
    return {"preview": MetadataValue.md(f"![preview](data:image/png;base64,{b64})")}


@asset(
    partitions_def=slides_partitions,
    io_manager_key="slide_store_io",
    backfill_policy=backfill_policy,
    retry_policy=io_retry,
    code_version="1",
    group_name="slides",
    kinds={"python", "hdf5"},
    description="Tissue mask on a thumbnail at a fixed physical resolution (tissue/mask + GeoJSON contours).",
)
def tissue_mask(
    context: AssetExecutionContext,
    config: TissueMaskConfig,
    slide_source: SlideSourceResource,
    store: StoreResource,
    compute: ComputeResource,
) -> dict[str, MaskResult]:
    layout = store.layout
    params = config.params(compute.device)
    wanted = recipe_hash(mask_recipe(params))

    def one(slide_id: str) -> MaskResult:
        if config.skip_existing and stored_mask_recipe(layout, slide_id) == wanted:
            result = load_tissue_mask(layout, slide_id)
            context.log.info(f"{slide_id}: tissue mask up to date (recipe {wanted}), reused")
        else:
            with slide_source.open(slide_id) as slide:
                result = compute_tissue_mask(slide, slide_id, params)
                result.visualize_mask, result.visualize_contours = (
                    config.visualize_mask,
                    config.visualize_contours,
                )
                info = slide.info
                store.catalog.append(
                    SLIDES,
                    [
                        {
                            "slide_id": slide_id,
                            "path": info.path,
                            "vendor": info.vendor,
                            "width": info.width,
                            "height": info.height,
                            "levels": info.level_count,
                            "mpp": info.mpp,
                            "mpp_source": info.mpp_source,
                            "objective": info.objective_power,
                            **_file_facts(info.path),
                        }
                    ],
                )
        if result.tissue_fraction == 0:
            context.log.warning(f"{slide_id}: no tissue detected")
        context.add_asset_metadata(
            {
                "tissue_fraction": MetadataValue.float(round(result.tissue_fraction, 4)),
                "regions": len(result.polygons),
                "mask_shape": f"{result.mask.shape[1]}x{result.mask.shape[0]}",
                "mask_mpp": round(result.thumb_mpp, 3),
                "slide_mpp": result.info.mpp if result.info else layout.store(slide_id).attrs().get("mpp"),
                "method": params.method,
                "modality": result.modality,
                "recipe_hash": result.recipe_hash,
                "reused": result.reused,
                "seconds": round(result.seconds, 3),
                "store": MetadataValue.path(str(layout.store(slide_id).path)),
                **_preview(result.overlay_png()),
            },
            partition_key=slide_id,
        )
        store.catalog.record_event(
            slide_id=slide_id,
            asset="tissue_mask",
            status="skipped" if result.reused else "done",
            recipe_hash=result.recipe_hash,
            parameters=result.params,
            output_path=str(layout.store(slide_id).path),
            rows=int(result.mask.size),
            seconds=result.seconds,
            run_id=context.run.run_id,
            versions={"atlaspatch": __version__},
        )
        return result

    return _per_slide(context, store, "tissue_mask", one)


def _file_facts(path: str) -> dict[str, Any]:
    import os

    from .core.catalog import fingerprint

    st = os.stat(path)
    return {"size": st.st_size, "mtime": st.st_mtime, "fingerprint": fingerprint(path)}


@asset(
    partitions_def=slides_partitions,
    io_manager_key="slide_store_io",
    backfill_policy=backfill_policy,
    retry_policy=io_retry,
    code_version="1",
    group_name="slides",
    kinds={"python", "hdf5"},
    description="Level-0 patch lattice with per-patch tissue fraction (coords, coords_ext, tissue_fraction).",
)
def patch_coords(
    context: AssetExecutionContext,
    config: PatchCoordsConfig,
    tissue_mask: dict[str, MaskResult],
    slide_source: SlideSourceResource,
    store: StoreResource,
) -> dict[str, Any]:
    layout: RunLayout = store.layout
    params = config.params()

    def one(slide_id: str) -> Any:
        mask = tissue_mask.get(slide_id)
        if mask is None:
            raise SlideError("its tissue mask failed or is missing", slide=slide_id, stage="patch_coords")
        with slide_source.open(slide_id) as slide:
            if config.skip_existing and not config.save_images and not config.visualize_grids:
                g = compute_geometry(slide.info, layout.patch_size, layout.step_size, target_mpp=layout.target_mpp)
                wanted = recipe_hash(coords_recipe(g, params, mask.recipe_hash))
                if stored_coords_recipe(layout, slide_id) == wanted:
                    result = load_patch_coords(layout, slide_id)
                    context.log.info(f"{slide_id}: coordinates up to date (recipe {wanted}), reused")
                    return _coords_metadata(context, store, result, mask)
            if config.visualize_grids and mask.thumbnail is None:
                mask.thumbnail, _, _ = slide.read_thumbnail(mask.thumb_mpp)
            result = compute_patch_coords(slide, slide_id, layout, mask, params)
        for w in result.warnings:
            context.log.warning(f"{slide_id}: {w}")
        return _coords_metadata(context, store, result, mask)

    return _per_slide(context, store, "patch_coords", one)


def _coords_metadata(context: AssetExecutionContext, store: StoreResource, result: Any, mask: MaskResult) -> Any:
    from .core.visualization import grid_overlay, png_bytes

    g = result.geometry
    preview: dict[str, Any] = {}
    if mask.thumbnail is not None:
        preview = _preview(
            png_bytes(grid_overlay(mask.thumbnail, result.coords, g.patch_size_level0, *mask.downsample, max_side=512))
        )
    path = str(store.layout.store(result.slide_id).path)
    context.add_asset_metadata(
        {
            "num_patches": result.num_patches,
            "mean_tissue_fraction": MetadataValue.float(
                round(float(result.tissue_fraction.mean()), 4) if result.num_patches else 0.0
            ),
            "slide_mpp": g.slide_mpp,
            "target_mpp": g.target_mpp,
            "patch_size_level0": g.patch_size_level0,
            "read_level": g.read_level,
            "filtered_background": result.filtered_background,
            "recipe_hash": result.recipe_hash,
            "reused": result.reused,
            "warnings": "; ".join(result.warnings) or "none",
            "seconds": round(result.seconds, 3),
            "store": MetadataValue.path(path),
            **preview,
        },
        partition_key=result.slide_id,
    )
    store.catalog.record_event(
        slide_id=result.slide_id,
        asset="patch_coords",
        status="skipped" if result.reused else "done",
        recipe_hash=result.recipe_hash,
        parameters=json.dumps(result.params, default=str),
        output_path=path,
        rows=result.num_patches,
        dim=2,
        seconds=result.seconds,
        run_id=context.run.run_id,
        versions={"atlaspatch": __version__},
        error="; ".join(result.warnings) or None,
    )
    return result
