"""Run the slide assets in process for a list of slide files (what the CLI and the demo call).

Each slide is one Dagster run on the instance of $DAGSTER_HOME (or an ephemeral one), so CLI
runs show up in the UI; a failing slide fails its own run only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import DagsterInstance

from .core.discovery import SlideFile, assign_ids
from .core.errors import SlideError
from .core.pipeline import COORDS, MASK, RunLayout
from .definitions import build_definitions
from .jobs import ENCODE_PATIENT, ENCODE_SLIDE, PROCESS, SEGMENT_AND_COORDS
from .partitions import SLIDES_PARTITION
from .resources import ComputeResource, SlideSourceResource, StoreResource

log = logging.getLogger("atlaspatch")


@dataclass
class SlideOutcome:
    slide_id: str
    path: str
    status: str  # done | skipped | failed
    reason: str = ""
    num_patches: int | None = None
    tissue_fraction: float | None = None
    mpp: float | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    run_id: str | None = None


@dataclass
class RunOptions:
    output: str
    patch_size: int
    step_size: int | None
    target_mag: float | None
    target_mpp: float | None
    mpp_csv: str | None = None
    device: str = "cpu"
    tissue_mask: dict[str, Any] = field(default_factory=dict)  # TissueMaskConfig fields
    patch_coords: dict[str, Any] = field(default_factory=dict)  # PatchCoordsConfig fields
    assets: tuple[str, ...] = ("tissue_mask", "patch_coords")
    encoders: tuple[str, ...] = ()  # features/<encoder> assets to materialize too
    features: dict[str, Any] = field(default_factory=dict)  # FeaturesConfig fields
    weights_dir: str | None = None
    encoder_weights: dict[str, str] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    slide_encoders: tuple[str, ...] = ()  # slide_features/<name> assets (e.g. titan, mean_uni_v1)
    slide_encoder_weights: dict[str, str] = field(default_factory=dict)
    random_slide_weights: bool = False  # tests and benchmarks only
    verbose: bool = False

    def store(self) -> StoreResource:
        return StoreResource(
            output_dir=os.path.abspath(self.output),
            patch_size=self.patch_size,
            step_size=self.step_size or 0,
            target_mag=self.target_mag or 0.0,
            target_mpp=self.target_mpp or 0.0,
        )


def _definitions(opts: RunOptions, store: StoreResource, source: SlideSourceResource) -> Any:
    encoders_resource = slide_resource = None
    if opts.encoders or opts.slide_encoders:
        from .features_assets import EncodersResource

        encoders_resource = EncodersResource(
            weights_dir=opts.weights_dir or os.environ.get("ATLASPATCH_WEIGHTS_DIR", ""),
            encoder_weights=dict(opts.encoder_weights),
            plugins=list(opts.plugins),
        )
    if opts.slide_encoders:
        from .slide_features_assets import SlideEncodersResource

        slide_resource = SlideEncodersResource(
            weights_dir=opts.weights_dir or os.environ.get("ATLASPATCH_WEIGHTS_DIR", ""),
            encoder_weights=dict(opts.slide_encoder_weights),
            random_weights=opts.random_slide_weights,
        )
    return build_definitions(
        store=store,
        slide_source=source,
        compute=ComputeResource(device=opts.device),
        encoders=list(opts.encoders),
        encoders_resource=encoders_resource,
        slide_encoders=list(opts.slide_encoders),
        slide_encoders_resource=slide_resource,
    )


@dataclass
class CaseOutcome:
    case_id: str
    status: str
    reason: str = ""
    slides: list[str] = field(default_factory=list)
    path: str = ""


def run_patients(
    cases: dict[str, list[str]], opts: RunOptions, instance: DagsterInstance | None = None
) -> list[CaseOutcome]:
    """Patient embeddings for cases whose slides (ids) already have their slide embeddings."""
    from .core.slide_features import patient_path, register_patients
    from .slide_features_assets import PATIENTS_PARTITION

    store = opts.store()
    source = SlideSourceResource(output_dir=store.output_dir, mpp_csv=opts.mpp_csv or "")
    defs = _definitions(opts, store, source)
    job = defs.resolve_job_def(ENCODE_PATIENT)
    instance = instance or get_instance()
    register_patients(store.layout, cases)
    instance.add_dynamic_partitions(
        PATIENTS_PARTITION, [c for c in cases if not instance.has_dynamic_partition(PATIENTS_PARTITION, c)]
    )
    cfg = {"loggers": {"console": {"config": {"log_level": "INFO" if opts.verbose else "CRITICAL"}}}}
    out = []
    for case_id, slide_ids in cases.items():
        res = job.execute_in_process(run_config=cfg, instance=instance, partition_key=case_id, raise_on_error=False)
        o = CaseOutcome(case_id, "done" if res.success else "failed", slides=list(slide_ids))
        if res.success:
            o.path = ", ".join(str(patient_path(store.layout, t, case_id)) for t in opts.slide_encoders)
        else:
            o.reason = _failure_reason(res) or "run failed"
        out.append(o)
    return out


def get_instance() -> DagsterInstance:
    """The $DAGSTER_HOME instance when set (runs visible in the UI), else an ephemeral one."""
    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    return DagsterInstance.ephemeral()


def run_slides(
    slides: Sequence[SlideFile],
    opts: RunOptions,
    instance: DagsterInstance | None = None,
    on_progress: Callable[[SlideOutcome], None] | None = None,
) -> list[SlideOutcome]:
    store = opts.store()
    layout: RunLayout = store.layout
    source = SlideSourceResource(output_dir=store.output_dir, mpp_csv=opts.mpp_csv or "")
    defs = _definitions(opts, store, source)
    job_name = ENCODE_SLIDE if opts.slide_encoders else PROCESS if opts.encoders else SEGMENT_AND_COORDS
    job = defs.resolve_job_def(job_name)
    instance = instance or get_instance()

    ids = assign_ids(list(slides), taken=store.catalog.slide_paths())
    known = store.catalog.slide_paths()
    for slide_id, sf in ids.items():
        if known.get(slide_id) != os.path.abspath(sf.path):
            source.register(slide_id, sf.path)
    instance.add_dynamic_partitions(
        SLIDES_PARTITION, [k for k in ids if not instance.has_dynamic_partition(SLIDES_PARTITION, k)]
    )

    ops: dict[str, Any] = {"tissue_mask": {"config": opts.tissue_mask}}
    if "patch_coords" in opts.assets:
        ops["patch_coords"] = {"config": opts.patch_coords}
    if opts.encoders:
        ops["patch_features"] = {"config": opts.features}
    run_config = {
        "ops": ops,
        "loggers": {"console": {"config": {"log_level": "INFO" if opts.verbose else "CRITICAL"}}},
    }
    selection = [
        *opts.assets,
        *(f"features/{e}" for e in opts.encoders),
        *(f"slide_features/{t}" for t in opts.slide_encoders),
    ]
    outcomes: list[SlideOutcome] = []
    for slide_id, sf in ids.items():
        t0 = time.perf_counter()
        result = job.execute_in_process(
            run_config=run_config,
            instance=instance,
            partition_key=slide_id,
            raise_on_error=False,
            asset_selection=[_key(a) for a in selection],
        )
        outcome = SlideOutcome(slide_id, sf.path, "done", seconds=time.perf_counter() - t0, run_id=result.run_id)
        if not result.success:
            outcome.status = "failed"
            outcome.reason = _failure_reason(result) or "run failed"
        else:
            _fill_from_store(outcome, layout, result)
        outcomes.append(outcome)
        if on_progress:
            on_progress(outcome)
    store.catalog.maybe_compact()  # keeps catalog reads fast after many small appends
    return outcomes


def _key(name: str) -> Any:
    from dagster import AssetKey

    return AssetKey(name.split("/"))


def _failure_reason(result: Any) -> str:
    for ev in result.all_events:
        if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error:
            err = ev.step_failure_data.error
            # dagster.Failure keeps our one-line description as the message
            msg = (err.message or "").strip().splitlines()[0] if err.message else ""
            for prefix in ("dagster._core.definitions.events.Failure: ", "Failure: "):
                msg = msg.removeprefix(prefix)
            if err.cause and not msg:
                msg = (err.cause.message or "").strip().splitlines()[0]
            return msg
    return ""


def _fill_from_store(outcome: SlideOutcome, layout: RunLayout, result: Any) -> None:
    store = layout.store(outcome.slide_id)
    attrs = store.attrs()
    outcome.mpp = attrs.get("mpp")
    mask_attrs = store.dataset_attrs(MASK)
    outcome.tissue_fraction = mask_attrs.get("tissue_fraction")
    if store.has(COORDS):
        outcome.num_patches = int(attrs.get("num_patches", 0))
    reused = []
    for mat in result.get_asset_materialization_events():
        md = mat.materialization.metadata
        if "reused" in md:
            reused.append(bool(md["reused"].value))
        w = md.get("warnings")
        if w is not None and w.value not in ("none", ""):
            outcome.warnings.append(str(w.value))
    if reused and all(reused):
        outcome.status = "skipped"
    if outcome.tissue_fraction == 0 and not outcome.warnings:
        outcome.warnings.append("no tissue detected")


def reason_of(e: BaseException) -> str:
    return e.one_line() if isinstance(e, SlideError) else f"{type(e).__name__}: {e}"
