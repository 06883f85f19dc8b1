"""Run the slide assets in process for a list of slide files (what the CLI and the demo call).

Each slide is one Dagster run on the instance of $DAGSTER_HOME (or an ephemeral one), so CLI
runs show up in the UI; the run executes the same stages as any asset run, and its outcomes
come back to the CLI through the reporter resource.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import AssetKey, DagsterInstance

from ..core.discovery import SlideFile, assign_ids
from ..core.params import params_of
from ..core.signals import last_signal, stop_on_signals
from ..core.source import SlideSource, SlideSourceParams
from ..core.stages import FAILED, SKIPPED, ModelParams, Outcome, StageInterrupted, StagePlan
from ..core.store import GeometryParams, RunLayout
from ..defs import jobs
from ..defs.definitions import build_definitions
from ..defs.partitions import PATIENTS_PARTITION, SLIDES_PARTITION
from ..defs.resources import (
    ComputeResource,
    ModelsResource,
    ReporterResource,
    SlideSourceResource,
    StoreResource,
    register_sink,
    unregister_sink,
)


@dataclass
class RunSettings:
    """Everything a CLI run needs: where, at which geometry, which stages with which parameters."""

    output: str
    geometry: GeometryParams
    plan: StagePlan
    source: SlideSourceParams = field(default_factory=SlideSourceParams)
    models: ModelParams = field(default_factory=ModelParams)
    verbose: bool = False

    @property
    def layout(self) -> RunLayout:
        return RunLayout.from_params(os.path.abspath(self.output), self.geometry)


INTERRUPTED, NOT_STARTED = "interrupted", "not started"


def was_interrupted(result: Any) -> bool:
    """The run was stopped by a signal (Dagster's own interrupt handling, before our step ran)."""
    for ev in result.all_events:
        err = ev.step_failure_data.error if ev.is_step_failure and ev.step_failure_data else None
        if err is not None and "Interrupt" in (err.cls_name or ""):
            return True
    return any(ev.event_type_value == "PIPELINE_CANCELED" for ev in result.all_events)


def interrupted_reason() -> str:
    import signal

    signum = last_signal()
    name = signal.Signals(signum).name if signum else "a stop signal"
    return f"interrupted by {name}: abandoned, nothing of it recorded done; run again to finish it"


@dataclass
class SlideOutcome:
    """One slide's line in the summary."""

    slide_id: str
    path: str
    status: str  # done | skipped | failed | interrupted | not started
    reason: str = ""
    num_patches: int | None = None
    tissue_fraction: float | None = None
    mpp: float | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    run_id: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)


def _values(params: Any) -> dict[str, Any]:
    return {p.name: getattr(params, p.name) for p in params_of(type(params))}


def run_config(plan: StagePlan, verbose: bool = False) -> dict[str, Any]:
    sections = {
        "tissue_mask": plan.mask,
        "patch_coords": plan.coords,
        "features": plan.features,
        "slide_features": plan.embedding,
    }
    config = {k: _values(v) for k, v in sections.items() if v is not None}
    return {
        "ops": {"slide_stages": {"config": config}},
        "loggers": {"console": {"config": {"log_level": "INFO" if verbose else "CRITICAL"}}},
    }


def _resources(settings: RunSettings, sink: str) -> dict[str, Any]:
    g = settings.geometry
    out = os.path.abspath(settings.output)
    store = StoreResource(output_dir=out, **_values(g))
    return {
        "store": store,
        "slide_source": SlideSourceResource(output_dir=out, **_values(settings.source)),
        "compute": ComputeResource(**_values(settings.plan.compute)),
        "models": ModelsResource(**_values(settings.models)),
        "reporter": ReporterResource(sink=sink),
    }


def definitions(settings: RunSettings, sink: str = "") -> Any:
    r = _resources(settings, sink)
    return build_definitions(
        store=r["store"],
        slide_source=r["slide_source"],
        compute=r["compute"],
        models=r["models"],
        encoders=list(settings.plan.encoders),
        slide_encoders=[t.name for t in settings.plan.targets],
        reporter=r["reporter"],
    )


def get_instance() -> DagsterInstance:
    """The $DAGSTER_HOME instance when set (runs visible in the UI), else an ephemeral one."""
    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    return DagsterInstance.ephemeral()


def _job_name(plan: StagePlan) -> str:
    if plan.targets:
        return jobs.ENCODE_SLIDE
    return jobs.PROCESS if plan.encoders else jobs.SEGMENT_AND_COORDS


class _Collector:
    """The reporter sink of one CLI run: outcomes by slide, progress forwarded."""

    def __init__(self, on_patches: Callable[[str, str, int, int], None] | None = None):
        self.by_slide: dict[str, list[Outcome]] = {}
        self.on_patches = on_patches

    @staticmethod
    def render(section: str, name: str) -> str:
        from .options import cli_ref

        return cli_ref(section, name)

    def outcomes(self, slide_id: str, outcomes: list[Outcome]) -> None:
        self.by_slide[slide_id] = list(outcomes)

    def progress(self, slide_id: str, asset: str, done: int, total: int) -> None:
        if self.on_patches is not None:
            self.on_patches(slide_id, asset, done, total)


def summarize(slide_id: str, path: str, outcomes: list[Outcome], layout: RunLayout) -> SlideOutcome:
    """The summary line of a slide from its outcomes (and its store, for what was reused)."""
    o = SlideOutcome(slide_id, path, "done", outcomes=outcomes)
    bad = [x for x in outcomes if x.status == FAILED]
    if bad:
        o.status, o.reason = FAILED, bad[0].reason
    elif outcomes and all(x.status == SKIPPED for x in outcomes):
        o.status = SKIPPED
    for x in outcomes:
        o.warnings += [w for w in x.warnings if w not in o.warnings]
    # "no tissue detected" (mask) is said again by "no tissue detected: 0 patches" (coords)
    o.warnings = [w for w in o.warnings if not any(v != w and v.startswith(w) for v in o.warnings)]
    store = layout.store(slide_id)
    attrs = store.attrs()
    o.mpp = attrs.get("mpp")
    o.tissue_fraction = store.mask_attrs().get("tissue_fraction")
    o.num_patches = store.num_patches()
    if o.tissue_fraction == 0 and not o.warnings:
        o.warnings.append("no tissue detected")
    return o


def register_slides(
    slides: Sequence[SlideFile], settings: RunSettings, instance: DagsterInstance
) -> dict[str, SlideFile]:
    """Slide ids for the files (ids already bound to a path stay), catalog rows and partitions."""
    layout = settings.layout
    source = SlideSource(_catalog(layout), settings.source)
    known = source.catalog.slide_paths()
    ids = assign_ids(list(slides), taken=known)
    for slide_id, sf in ids.items():
        if known.get(slide_id) != os.path.abspath(sf.path):
            source.register(slide_id, sf.path)
    new = [k for k in ids if not instance.has_dynamic_partition(SLIDES_PARTITION, k)]
    if new:
        instance.add_dynamic_partitions(SLIDES_PARTITION, new)
    return ids


def _catalog(layout: RunLayout) -> Any:
    from ..core.catalog import Catalog

    return Catalog(layout.catalog_dir)


def run_slides(
    slides: Sequence[SlideFile],
    settings: RunSettings,
    instance: DagsterInstance | None = None,
    on_progress: Callable[[SlideOutcome], None] | None = None,
    on_patches: Callable[[str, str, int, int], None] | None = None,
) -> list[SlideOutcome]:
    """One in-process run per slide of the plan's assets; a failing slide fails its own run only."""
    instance = instance or get_instance()
    sink = f"cli-{uuid.uuid4().hex}"
    collector = _Collector(on_patches)
    register_sink(sink, collector)
    try:
        defs = definitions(settings, sink)
        job = defs.resolve_job_def(_job_name(settings.plan))
        ids = register_slides(slides, settings, instance)
        cfg = run_config(settings.plan, settings.verbose)
        selection = [AssetKey(a.split("/")) for a in settings.plan.assets]
        layout = settings.layout
        outcomes: list[SlideOutcome] = []
        current: tuple[str, SlideFile, float] | None = None
        try:
            with stop_on_signals():  # between runs; inside a run the step handles them the same way
                for slide_id, sf in ids.items():
                    current = (slide_id, sf, time.perf_counter())
                    result = job.execute_in_process(
                        run_config=cfg,
                        instance=instance,
                        partition_key=slide_id,
                        raise_on_error=False,
                        asset_selection=selection,
                    )
                    got = collector.by_slide.pop(slide_id, [])
                    o = summarize(slide_id, sf.path, got, layout)
                    if not got and not result.success:  # the run failed before any stage ran
                        o.status, o.reason = FAILED, failure_reason(result) or "run failed"
                    o.seconds, o.run_id = time.perf_counter() - current[2], result.run_id
                    current = None
                    if last_signal() or (not got and was_interrupted(result)):
                        o.status, o.reason = INTERRUPTED, interrupted_reason()
                        outcomes.append(o)
                        break
                    outcomes.append(o)
                    if on_progress:
                        on_progress(o)
        except StageInterrupted:
            if current is not None:
                sid, sf, t0 = current
                o = SlideOutcome(sid, sf.path, INTERRUPTED, interrupted_reason(), seconds=time.perf_counter() - t0)
                outcomes.append(o)
        done = {o.slide_id for o in outcomes}
        outcomes += [SlideOutcome(k, sf.path, NOT_STARTED) for k, sf in ids.items() if k not in done]
        _catalog(layout).maybe_compact()  # keeps catalog reads fast after many small appends
        return outcomes
    finally:
        unregister_sink(sink)


@dataclass
class CaseOutcome:
    case_id: str
    status: str
    reason: str = ""
    slides: list[str] = field(default_factory=list)
    path: str = ""


def run_patients(
    cases: dict[str, list[str]], settings: RunSettings, instance: DagsterInstance | None = None
) -> list[CaseOutcome]:
    """Patient embeddings for cases whose slides (ids) already have their slide embeddings."""
    from ..core.stages.embeddings import register_patients

    instance = instance or get_instance()
    defs = definitions(settings)
    job = defs.resolve_job_def(jobs.ENCODE_PATIENT)
    layout = settings.layout
    register_patients(layout, cases)
    new = [c for c in cases if not instance.has_dynamic_partition(PATIENTS_PARTITION, c)]
    if new:
        instance.add_dynamic_partitions(PATIENTS_PARTITION, new)
    cfg = {"loggers": {"console": {"config": {"log_level": "INFO" if settings.verbose else "CRITICAL"}}}}
    out = []
    for case_id, slide_ids in cases.items():
        res = job.execute_in_process(run_config=cfg, instance=instance, partition_key=case_id, raise_on_error=False)
        o = CaseOutcome(case_id, "done" if res.success else FAILED, slides=list(slide_ids))
        if res.success:
            o.path = ", ".join(str(layout.patient_path(t.name, case_id)) for t in settings.plan.targets)
        else:
            o.reason = failure_reason(res) or "run failed"
        out.append(o)
    return out


def failure_reason(result: Any) -> str:
    """The first step failure's one-line message (a `Failure` keeps our description)."""
    for ev in result.all_events:
        if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error:
            err = ev.step_failure_data.error
            msg = (err.message or "").strip().splitlines()[0] if err.message else ""
            for prefix in ("dagster._core.definitions.events.Failure: ", "Failure: "):
                msg = msg.removeprefix(prefix)
            if err.cause and not msg:
                msg = (err.cause.message or "").strip().splitlines()[0]
            return msg
    return ""


def replace_plan(settings: RunSettings, **changes: Any) -> RunSettings:
    return dataclasses.replace(settings, plan=dataclasses.replace(settings.plan, **changes))
