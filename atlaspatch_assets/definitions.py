"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetKey,
    AssetSelection,
    Definitions,
    ExecutorDefinition,
    define_asset_job,
    in_process_executor,
    multiprocess_executor,
)

from .assets import patch_coords, tissue_mask
from .catalog_asset import catalog
from .checks import has_patches, has_tissue
from .io_managers import SlideStoreIOManager
from .jobs import ENCODE_PATIENT, ENCODE_SLIDE, NEW_SLIDES_JOB, PROCESS, SEGMENT_AND_COORDS, segment_and_coords_job
from .resources import ComputeResource, SlideSourceResource, StoreResource
from .sensors import build_new_slides_sensor


def features_available() -> bool:
    """Patch features need torch (extra `features`); without it the slide assets still load."""
    return importlib.util.find_spec("torch") is not None


def configured_encoders() -> list[str]:
    from .features_assets import DEFAULT_ENCODER_ASSETS, parse_list

    return parse_list(os.environ.get("ATLASPATCH_ENCODERS")) or list(DEFAULT_ENCODER_ASSETS)


def build_definitions(
    store: StoreResource | None = None,
    slide_source: SlideSourceResource | None = None,
    compute: ComputeResource | None = None,
    encoders: Sequence[str] | None = None,
    encoders_resource: Any = None,
    slide_encoders: Sequence[str] | None = None,
    slide_encoders_resource: Any = None,
) -> Definitions:
    """All assets, checks, jobs and resources; `encoders` = the `features/<name>` assets to define."""
    store = store or StoreResource()
    assets: list[Any] = [tissue_mask, patch_coords, catalog]
    checks: list[Any] = [has_tissue, has_patches]
    jobs: list[Any] = [segment_and_coords_job]
    resources: dict[str, Any] = {
        "store": store,
        "slide_source": slide_source or SlideSourceResource(output_dir=store.output_dir),
        "compute": compute or ComputeResource(),
        "slide_store_io": SlideStoreIOManager(store=store),
    }
    names: list[str] = []
    if features_available():
        from .features_assets import EncodersResource, build_features_assets, encoder_key

        enc_res = encoders_resource or EncodersResource()
        names = list(encoders) if encoders is not None else configured_encoders()
        slide_names = list(slide_encoders) if slide_encoders is not None else configured_slide_encoders()
        targets = [_target(n) for n in slide_names]
        names += [t.patch_encoder for t in targets if t.patch_encoder not in names]
        feature_defs = build_features_assets(names, enc_res.registry) if names else []
        assets += feature_defs[:1]
        checks += feature_defs[1:]
        resources["encoders"] = enc_res
        jobs.append(
            define_asset_job(
                PROCESS,
                selection=AssetSelection.assets("tissue_mask", "patch_coords")
                | AssetSelection.assets(*[encoder_key(n) for n in names]),
                description="Mask, coordinates and patch features (select the encoders you need).",
            )
        )
        if targets:
            from .slide_features_assets import (
                SlideEncodersResource,
                build_patient_feature_asset,
                build_slide_feature_asset,
                slide_key,
            )

            assets += [build_slide_feature_asset(t.name) for t in targets]
            assets += [build_patient_feature_asset(t.name) for t in targets]
            resources["slide_encoders"] = slide_encoders_resource or SlideEncodersResource()
            jobs.append(
                define_asset_job(
                    ENCODE_SLIDE,
                    selection=AssetSelection.assets("tissue_mask", "patch_coords")
                    | AssetSelection.assets(*[encoder_key(n) for n in names])
                    | AssetSelection.assets(*[slide_key(t) for t in targets]),
                    description="Mask → coords → patch features → slide embeddings.",
                )
            )
            jobs.append(
                define_asset_job(
                    ENCODE_PATIENT,
                    selection=AssetSelection.assets(*[AssetKey(["patient_features", t.name]) for t in targets]),
                    description="Patient embeddings (mean of slide embeddings) over the patients partitions.",
                )
            )
    sensor_job = SEGMENT_AND_COORDS
    sensor_encoders = sensor_default_encoders() if features_available() else []  # no torch: no features
    if sensor_encoders:
        from .features_assets import encoder_key

        missing = set(sensor_encoders) - set(names if features_available() else [])
        if missing:
            raise ValueError(f"ATLASPATCH_SENSOR_ENCODERS names encoders without an asset: {sorted(missing)}")
        sensor_job = NEW_SLIDES_JOB
        jobs.append(
            define_asset_job(
                NEW_SLIDES_JOB,
                selection=AssetSelection.assets("tissue_mask", "patch_coords")
                | AssetSelection.assets(*[encoder_key(n) for n in sensor_encoders]),
                description="What the new_slides sensor runs: mask, coordinates, default encoders.",
            )
        )
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        resources=resources,
        sensors=[build_new_slides_sensor(job_name=sensor_job)],
        executor=configured_executor(),
    )


EXECUTOR_ENV = "ATLASPATCH_EXECUTOR"


def configured_executor() -> ExecutorDefinition:
    """$ATLASPATCH_EXECUTOR: `in_process` (default) or `multiprocess`.

    In process because a batched run's steps are sequential per slide anyway, and the
    multiprocess executor starts one subprocess per step that re-imports the code location
    (torch included): ~35 % of a 100-slide backfill's wall time (benchmarks/bench_backfill.py).
    `multiprocess` isolates each step (a native crash in a reader kills the step, not the run).
    """
    value = (os.environ.get(EXECUTOR_ENV) or "in_process").strip().lower().replace("-", "_")
    if value not in ("in_process", "multiprocess"):
        raise ValueError(f"{EXECUTOR_ENV}={value!r}: expected in_process or multiprocess")
    return in_process_executor if value == "in_process" else multiprocess_executor


def configured_slide_encoders() -> list[str]:
    from .features_assets import parse_list
    from .slide_features_assets import DEFAULT_SLIDE_ENCODER_ASSETS

    return parse_list(os.environ.get("ATLASPATCH_SLIDE_ENCODERS")) or list(DEFAULT_SLIDE_ENCODER_ASSETS)


def _target(name: str) -> Any:
    from .core.slide_features import parse_target

    return parse_target(name)


def sensor_default_encoders() -> list[str]:
    """Encoders the new_slides sensor computes for each new slide (ATLASPATCH_SENSOR_ENCODERS)."""
    from .features_assets import parse_list

    return parse_list(os.environ.get("ATLASPATCH_SENSOR_ENCODERS"))


def asset_keys(names: Sequence[str]) -> list[AssetKey]:
    return [AssetKey(n.split("/")) for n in names]


defs = build_definitions()
