"""Plans, slides, layouts and outcomes as JSON-able dicts, for a process that runs the stages
elsewhere (a Slurm job) and reports back: what goes in (`plan_to_dict`, `ref_to_dict`,
`layout_to_dict`) and what comes out (`outcome_to_dict`) survive the round trip unchanged.

Outcome metadata holds plain values; bytes (the PNG preview) travel as `{"__bytes__": base64}`.
The in-memory `Outcome.value` stays behind: it is only handed to the next stage in-process.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..params import Renderer, from_mapping, params_of
from ..source import SlideRef
from ..store import RunLayout
from .base import Outcome
from .compute import ComputeParams
from .coords import CoordsParams
from .embeddings import SlideEmbeddingParams, SlideTarget
from .features import FeatureParams
from .mask import MaskParams
from .runner import StagePlan

BYTES = "__bytes__"
FORMAT = 1  # bumped when a dict shape changes; a job refuses a spec of another format


def to_plain(v: Any) -> Any:
    """A JSON-able copy of a plain value (numpy scalars/arrays, paths, tuples and bytes included)."""
    if v is None or isinstance(v, (bool, int, float, str)):  # NaN/inf: Python's json (and Pipes') keep them
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {BYTES: base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, Mapping):
        return {str(k): to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=str) if isinstance(v, (set, frozenset)) else v
        return [to_plain(x) for x in items]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "tolist"):  # numpy scalar or array
        return to_plain(v.tolist())
    return str(v)


def from_plain(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {BYTES}:
            return base64.b64decode(v[BYTES])
        return {k: from_plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_plain(x) for x in v]
    return v


_OUTCOME_FIELDS = [f.name for f in dataclasses.fields(Outcome) if f.name != "value"]


def outcome_to_dict(o: Outcome) -> dict[str, Any]:
    return {name: to_plain(getattr(o, name)) for name in _OUTCOME_FIELDS}


def outcome_from_dict(d: Mapping[str, Any]) -> Outcome:
    return Outcome(**{k: from_plain(v) for k, v in d.items() if k in _OUTCOME_FIELDS})


def _params_to_dict(p: Any) -> dict[str, Any] | None:
    return None if p is None else to_plain(dataclasses.asdict(p))


def _params_from_dict(cls: type, d: Mapping[str, Any] | None) -> Any:
    if d is None:
        return None
    tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
    return from_mapping(cls, {k: tuple(v) if k in tuples else v for k, v in d.items()})


def plan_to_dict(plan: StagePlan) -> dict[str, Any]:
    return {
        "mask": _params_to_dict(plan.mask),
        "coords": _params_to_dict(plan.coords),
        "encoders": list(plan.encoders),
        "features": _params_to_dict(plan.features),
        "targets": [[t.slide_encoder, t.patch_encoder] for t in plan.targets],
        "embedding": _params_to_dict(plan.embedding),
        "compute": _params_to_dict(plan.compute),
    }


def plan_from_dict(d: Mapping[str, Any]) -> StagePlan:
    return StagePlan(
        mask=_params_from_dict(MaskParams, d.get("mask")),
        coords=_params_from_dict(CoordsParams, d.get("coords")),
        encoders=tuple(d.get("encoders", ())),
        features=_params_from_dict(FeatureParams, d["features"]),
        targets=tuple(SlideTarget(s, p) for s, p in d.get("targets", ())),
        embedding=_params_from_dict(SlideEmbeddingParams, d["embedding"]),
        compute=_params_from_dict(ComputeParams, d["compute"]),
    )


def ref_to_dict(r: SlideRef) -> dict[str, Any]:
    return {"slide_id": r.slide_id, "path": r.path, "mpp": r.mpp}


def ref_from_dict(d: Mapping[str, Any]) -> SlideRef:
    return SlideRef(d["slide_id"], d["path"], d.get("mpp"))


def layout_to_dict(layout: RunLayout) -> dict[str, Any]:
    return to_plain(dataclasses.asdict(layout))


def layout_from_dict(d: Mapping[str, Any]) -> RunLayout:
    return RunLayout(**{**d, "output": Path(d["output"])})


def params_to_dict(p: Any) -> dict[str, Any]:
    """Any parameters dataclass (ModelParams, …) as a dict; `params_from_dict(cls, d)` reverses it."""
    return _params_to_dict(p) or {}


def params_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    return _params_from_dict(cls, d)


# References that are not declared parameters but appear in messages.
_EXTRA_REFS = (("features", "encoders"),)


def render_table(render: Renderer | None) -> dict[str, str]:
    """How `render` names each parameter a message may mention: a process that cannot call the
    renderer (a Slurm job) renders the same words from this table (`table_renderer`)."""
    from ..source import SlideSourceParams
    from ..store import GeometryParams
    from .compute import ModelParams

    classes = (
        GeometryParams,
        SlideSourceParams,
        MaskParams,
        CoordsParams,
        FeatureParams,
        SlideEmbeddingParams,
        ComputeParams,
        ModelParams,
    )
    keys = [(p.section, p.name) for cls in classes for p in params_of(cls)] + list(_EXTRA_REFS)
    return {f"{s}.{n}": (render(s, n) if render else f"{s}.{n}") for s, n in keys}


def table_renderer(table: Mapping[str, str]) -> Callable[[str, str], str]:
    """A renderer from `render_table`'s output (unknown references: `section.name`)."""

    def render(section: str, name: str) -> str:
        return table.get(f"{section}.{name}", f"{section}.{name}")

    return render


__all__ = [
    "FORMAT",
    "layout_from_dict",
    "layout_to_dict",
    "outcome_from_dict",
    "outcome_to_dict",
    "params_from_dict",
    "params_to_dict",
    "plan_from_dict",
    "plan_to_dict",
    "ref_from_dict",
    "ref_to_dict",
    "render_table",
    "table_renderer",
]
