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
from ..defs.instance import open_instance
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


def _job_name(plan: StagePlan) -> str:
    if plan.targets:
        return jobs.ENCODE_SLIDE
    return jobs.PROCESS if plan.encoders else jobs.SEGMENT_AND_COORDS


class _Collector:
    """The reporter sink of one CLI run: each slide's summary line as soon as its stages finish."""

    def __init__(
        self,
        files: dict[str, SlideFile],
        layout: RunLayout,
        on_progress: Callable[[SlideOutcome], None] | None = None,
        on_patches: Callable[[str, str, int, int], None] | None = None,
    ):
        self.files, self.layout = files, layout
        self.on_progress, self.on_patches = on_progress, on_patches
        self.done: dict[str, SlideOutcome] = {}
        self.clock = time.perf_counter()  # when the slide now in progress started

    @staticmethod
    def render(section: str, name: str) -> str:
        from .options import cli_ref

        return cli_ref(section, name)

    def outcomes(self, slide_id: str, outcomes: list[Outcome]) -> None:
        o = summarize(slide_id, self.files[slide_id].path, list(outcomes), self.layout)
        now = time.perf_counter()
        o.seconds, self.clock = now - self.clock, now
        self.done[slide_id] = o
        if self.on_progress:
            self.on_progress(o)

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


BATCH_ENV = "ATLASPATCH_CLI_BATCH"
DEFAULT_BATCH = 25


def batches(ids: Sequence[str], order: Sequence[str], size: int) -> list[list[str]]:
    """Runs of slides that are consecutive partitions (a Dagster run covers a partition range),
    at most `size` each, in partition order."""
    pos: dict[str, int] = {}
    for i, k in enumerate(order):  # first place: two processes registering at once can add a key twice
        pos.setdefault(k, i)
    out: list[list[str]] = []
    for k in sorted(ids, key=lambda k: pos[k]):
        if out and len(out[-1]) < size and pos[out[-1][-1]] + 1 == pos[k]:
            out[-1].append(k)
        else:
            out.append([k])
    return out


def run_slides(
    slides: Sequence[SlideFile],
    settings: RunSettings,
    instance: DagsterInstance | None = None,
    on_progress: Callable[[SlideOutcome], None] | None = None,
    on_patches: Callable[[str, str, int, int], None] | None = None,
    batch: int | None = None,
) -> list[SlideOutcome]:
    """In-process runs of the plan's assets over batches of up to `batch` slides ($ATLASPATCH_CLI_BATCH,
    25; a run's start costs seconds with a SQLite instance). Each slide is reported as soon as it is
    done; a failing slide fails alone (its partition Failed, the others Materialized)."""
    instance = instance or open_instance()
    batch = batch or int(os.environ.get(BATCH_ENV) or DEFAULT_BATCH)
    layout = settings.layout
    sink = f"cli-{uuid.uuid4().hex}"
    try:
        defs = definitions(settings, sink)
        job = defs.resolve_job_def(_job_name(settings.plan))
        ids = register_slides(slides, settings, instance)
        collector = _Collector(ids, layout, on_progress, on_patches)
        register_sink(sink, collector)
        cfg = run_config(settings.plan, settings.verbose)
        selection = [AssetKey(a.split("/")) for a in settings.plan.assets]
        order = instance.get_dynamic_partitions(SLIDES_PARTITION)
        interrupted = False
        planned = batches(list(ids), order, max(1, batch))
        try:
            with stop_on_signals():  # between runs; inside a run the step handles them the same way
                for keys in planned:
                    collector.clock = time.perf_counter()
                    where: dict[str, Any] = (
                        {"partition_key": keys[0]}
                        if len(keys) == 1
                        else {
                            "tags": {
                                "dagster/asset_partition_range_start": keys[0],
                                "dagster/asset_partition_range_end": keys[-1],
                            }
                        }
                    )
                    result = job.execute_in_process(
                        run_config=cfg, instance=instance, raise_on_error=False, asset_selection=selection, **where
                    )
                    if last_signal() or was_interrupted(result):
                        interrupted = True
                        break
                    for k in keys:  # the run failed before these slides' stages reported (not a slide failure)
                        if k not in collector.done:
                            o = SlideOutcome(k, ids[k].path, FAILED, failure_reason(result) or "run failed")
                            collector.done[k] = o
                    for k in keys:
                        collector.done[k].run_id = result.run_id
        except StageInterrupted:
            interrupted = True
        outcomes = [collector.done[k] for k in ids if k in collector.done]
        left = [k for keys in planned for k in keys if k not in collector.done]  # in processing order
        if interrupted and left:  # the slide in progress (its run's first unreported one)
            outcomes.append(SlideOutcome(left[0], ids[left[0]].path, INTERRUPTED, interrupted_reason()))
            left = left[1:]
        outcomes += [SlideOutcome(k, ids[k].path, NOT_STARTED) for k in left]
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

    instance = instance or open_instance()
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
