"""The one per-partition adapter: stage outcomes → Dagster events, for every asset.

Each slide (or case) of a run is reported as soon as its stages finish: a materialization per
asset that worked (with its metadata, code version and data version = the stored recipe hash)
and one check evaluation per partition and check. Nothing is reported for a failed stage; when
any failed, the step raises `Failure` once every good slide is stored, so the run ends failed
and Dagster shows exactly the failed partitions as Failed (planned in a failed run, never
materialized) while the others are Materialized — also in batched backfill runs.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    Failure,
    MetadataValue,
    RetryRequested,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
)

from ..core.checks import checks_for
from ..core.signals import stop_on_signals
from ..core.stages import Outcome, StageInterrupted
from ..core.store import RunLayout

RESOURCES = ("store", "slide_source", "compute", "models", "slurm")
MAX_FAILURES_IN_MESSAGE = 10
# A step whose failures are all transient I/O errors (they outlived core.retry's in-place retries)
# is run again; the good slides are skipped by recipe then. Deterministic failures and stops by
# signal are never retried (no RetryPolicy on the assets: Dagster would retry interrupts too).
STEP_RETRIES = 2
STEP_RETRY_DELAY = 5.0


def dagster_ref(section: str, name: str) -> str:
    """Where a parameter is set in Dagster: a resource field or the run config of the op."""
    if section in RESOURCES:
        return f"resource {section}.{name}"
    if (section, name) == ("features", "encoders"):
        return "the features/<encoder> assets of the selection"
    return f"run config {section}.{name}"


def asset_key(asset: str) -> AssetKey:
    return AssetKey(asset.split("/"))


PATH_KEYS = ("store", "path", "geojson")


def _metadata_value(key: str, v: Any) -> Any:
    if isinstance(v, bytes):  # PNG preview, shown inline
        return MetadataValue.md(f"![preview](data:image/png;base64,{base64.b64encode(v).decode()})")
    if isinstance(v, float):
        return MetadataValue.float(v)
    if key in PATH_KEYS and isinstance(v, str):
        return MetadataValue.path(v)
    return v


def metadata_of(o: Outcome) -> dict[str, Any]:
    md = {k: _metadata_value(k, v) for k, v in o.metadata.items() if v is not None}
    md["status"] = o.status
    md["seconds"] = MetadataValue.float(round(o.seconds, 3))
    if o.warnings:
        md["warnings"] = "; ".join(o.warnings)
    return md


def _tags(o: Outcome, code_version: str | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    if o.recipe_hash:  # the stored recipe identifies the data: unchanged recipe, unchanged data
        tags[DATA_VERSION_TAG] = o.recipe_hash
        tags[DATA_VERSION_IS_USER_PROVIDED_TAG] = "true"
    if code_version:
        tags[CODE_VERSION_TAG] = code_version
    for parent, h in o.parent_hashes.items():
        if h:
            tags[get_input_data_version_tag(asset_key(parent))] = h
    return tags


class PartitionReporter:
    """Collects a step's outcomes and emits their events; `finish()` raises when any failed."""

    def __init__(self, context: AssetExecutionContext, layout: RunLayout | None = None):
        self.context = context
        self.layout = layout
        self.failures: list[Outcome] = []
        self.reported: list[str] = []
        self.selected_checks = {(k.asset_key, k.name) for k in context.selected_asset_check_keys}
        self.code_versions = {k: context.assets_def.code_versions_by_key.get(k) for k in context.assets_def.keys}

    def report(self, partition: str, outcomes: Sequence[Outcome]) -> None:
        self.reported.append(partition)
        for o in outcomes:
            key = asset_key(o.asset)
            if o.ok:
                self.context.log_event(
                    AssetMaterialization(
                        asset_key=key,
                        partition=partition,
                        metadata=metadata_of(o),
                        tags=_tags(o, self.code_versions.get(key)),
                    )
                )
            else:
                self.failures.append(o)  # logged where it happened (the stage guard / the runner)
            self._checks(partition, o, key)

    def _checks(self, partition: str, o: Outcome, key: AssetKey) -> None:
        if self.layout is None:
            return
        for name, fn in checks_for(o.asset).items():
            if (key, name) not in self.selected_checks:
                continue
            try:
                r = fn(self.layout.store(partition))
            except Exception as e:  # an unreadable store is a failed check, not a crashed step
                from ..core.checks import CheckResult

                r = CheckResult(False, "error", f"cannot read the store: {type(e).__name__}: {e}")
            self.context.log_event(
                AssetCheckEvaluation(
                    asset_key=key,
                    check_name=name,
                    passed=r.passed,
                    metadata={**r.metadata, **({"problem": r.description} if r.description else {})},
                    severity=AssetCheckSeverity.WARN if r.severity == "warn" else AssetCheckSeverity.ERROR,
                    description=r.description or None,
                    partition=partition,
                )
            )

    def finish(self) -> None:
        """Raise `Failure` (once every good partition is reported) when any stage failed."""
        if not self.failures:
            return
        roots: dict[str, Outcome] = {}  # per partition its first failure; downstream "not run" follow
        for o in self.failures:
            roots.setdefault(o.slide_id, o)
        lines = [o.reason for o in roots.values()]
        shown = lines[:MAX_FAILURES_IN_MESSAGE]
        more = f"; … and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
        failure = Failure(
            description=(f"{len(roots)} partitions failed: " if len(roots) > 1 else "") + "; ".join(shown) + more,
            metadata={"failed_partitions": ", ".join(sorted(roots)), "failed_stages": len(self.failures)},
            allow_retries=False,
        )
        if all(o.transient for o in self.failures):
            raise RetryRequested(max_retries=STEP_RETRIES, seconds_to_wait=STEP_RETRY_DELAY) from failure
        raise failure


@contextmanager
def interruptible(context: AssetExecutionContext, reporter: PartitionReporter) -> Iterator[None]:
    """SIGTERM/SIGINT stop the step now: the slide in progress is abandoned (nothing half-written,
    no catalog event), the unfinished slides are named, and the step fails as interrupted (not retried)."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    try:
        with stop_on_signals():
            yield
    except StageInterrupted as e:
        left = [p for p in context.partition_keys if p not in reporter.reported]
        context.log.error(f"stopped by signal {e.signum}: {len(left)} unfinished partition(s): {', '.join(left)}")
        raise DagsterExecutionInterruptedError(f"stopped by signal {e.signum}") from e


def selected_names(context: AssetExecutionContext, prefix: str) -> list[str]:
    """Names of the selected assets under `prefix/` (e.g. the encoders of features/<name>)."""
    return sorted(k.path[1] for k in context.selected_asset_keys if len(k.path) == 2 and k.path[0] == prefix)
