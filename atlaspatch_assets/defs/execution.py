"""Where a step's slides are processed: in this process (default), or elsewhere (a cluster
launcher with the same signature). Either way each slide goes through `core.stages.run_slide`
and its outcomes are handed to `report(slide_id, outcomes)` as soon as they are known."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..core.errors import SlideError
from ..core.stages import Outcome, StageEnv, StagePlan, run_slide
from ..core.stages.base import failed

Report = Callable[[str, list[Outcome]], None]


def resolve_refs(partitions: Sequence[str], plan: StagePlan, env: StageEnv, slide_source: Any) -> dict[str, Any]:
    """slide id → SlideRef, or → its failed outcomes when the id cannot be resolved to a file."""
    out: dict[str, Any] = {}
    for sid in partitions:
        try:
            out[sid] = slide_source.ref(sid)
        except SlideError as e:
            reason = env.reason(e, sid, "open")
            outcomes = [failed(a, sid, reason) for a in plan.assets]
            for o in outcomes:
                env.record(o)
            out[sid] = outcomes
    return out


def execute_locally(refs: dict[str, Any], plan: StagePlan, env: StageEnv, models: Any, report: Report) -> None:
    """Every slide in this process, one after the other (models loaded once)."""
    for sid, ref in refs.items():
        report(sid, ref if isinstance(ref, list) else run_slide(ref, plan, env, models.cache))
