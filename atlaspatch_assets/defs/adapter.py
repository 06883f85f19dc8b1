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
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    Failure,
    MetadataValue,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
)

from ..core.checks import checks_for
from ..core.stages import Outcome
from ..core.store import RunLayout

RESOURCES = ("store", "slide_source", "compute", "models", "slurm")
MAX_FAILURES_IN_MESSAGE = 10


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
        self.selected_checks = {(k.asset_key, k.name) for k in context.selected_asset_check_keys}
        self.code_versions = {k: context.assets_def.code_versions_by_key.get(k) for k in context.assets_def.keys}

    def report(self, partition: str, outcomes: Sequence[Outcome]) -> None:
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
        raise Failure(
            description=(f"{len(roots)} partitions failed: " if len(roots) > 1 else "") + "; ".join(shown) + more,
            metadata={"failed_partitions": ", ".join(sorted(roots)), "failed_stages": len(self.failures)},
            # only a transient I/O error is worth a step retry; a deterministic one fails once
            allow_retries=all(o.transient for o in self.failures),
        )


def selected_names(context: AssetExecutionContext, prefix: str) -> list[str]:
    """Names of the selected assets under `prefix/` (e.g. the encoders of features/<name>)."""
    return sorted(k.path[1] for k in context.selected_asset_keys if len(k.path) == 2 and k.path[0] == prefix)
