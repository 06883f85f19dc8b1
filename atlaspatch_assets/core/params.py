"""Stage parameters: each parameter is one dataclass field whose default, documentation and valid
range are defined once, here in the core.

`param(default, help, ...)` declares such a field. The Dagster `Config` classes and resources
(`defs/`) and the CLI options (`cli/`) are derived from the same fields, `recipe_of(params)` gives
the fields that change a stage's output (what the stored recipe hash covers), and
`check_params(params)` refuses values outside their range (NaN and inf included) before any work.

Messages name a parameter with `ref(section, field)`. Where the message is shown it is rendered for
that place (`render_refs`): the CLI names its flag (`--mpp-csv`), the Dagster UI the resource or
run-config field (`slide_source.mpp_csv`); unrendered text shows `section.field`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from .errors import UsageError

_REF = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\}\}")


@dataclass(frozen=True)
class ParamInfo:
    """One declared parameter, as read back from its dataclass field."""

    section: str
    name: str
    type: Any
    default: Any
    help: str
    recipe: bool
    choices: tuple[str, ...] | None
    cli: str | None  # flag name when it differs from --<name>; "" = no CLI option
    ge: float | None
    le: float | None
    gt: float | None

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def base_type(self) -> Any:
        """The annotation without `None` (`int | None` -> int)."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        if self.optional and len(args) == 1:
            return args[0]
        return self.type

    @property
    def ref(self) -> str:
        return ref(self.section, self.name)


def param(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    recipe: bool = True,
    choices: tuple[str, ...] | None = None,
    cli: str | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
) -> Any:
    """A parameter field: default, one-line help, whether it is part of the recipe, valid range."""
    metadata = {"help": help, "recipe": recipe, "choices": choices, "cli": cli, "ge": ge, "le": le, "gt": gt}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section_of(cls: type) -> str:
    return getattr(cls, "SECTION", cls.__name__)


def params_of(cls: type) -> list[ParamInfo]:
    """The declared parameters of a parameters dataclass (fields made with `param`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        md = f.metadata
        out.append(
            ParamInfo(
                section=section_of(cls),
                name=f.name,
                type=hints[f.name],
                default=default,
                help=md["help"],
                recipe=md["recipe"],
                choices=md["choices"],
                cli=md["cli"],
                ge=md["ge"],
                le=md["le"],
                gt=md["gt"],
            )
        )
    return out


def recipe_of(obj: Any) -> dict[str, Any]:
    """Values of the fields that change the output (recipe=True)."""
    return {p.name: getattr(obj, p.name) for p in params_of(type(obj)) if p.recipe}


def from_mapping(cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` keeping only its declared fields (unknown keys are an error)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{section_of(cls)}: unknown parameter(s) {', '.join(unknown)}")
    return cls(**values)


def _problem(p: ParamInfo, value: Any) -> str | None:
    if value is None:
        return None
    if p.choices is not None and value not in p.choices:
        return f"must be one of {', '.join(p.choices)} (got {value!r})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if p.gt is not None and not value > p.gt:
        return f"must be > {p.gt:g} (got {value:g})"
    if p.ge is not None and not value >= p.ge:
        return f"must be >= {p.ge:g} (got {value:g})"
    if p.le is not None and not value <= p.le:
        return f"must be <= {p.le:g} (got {value:g})"
    return None


def check_params(obj: Any) -> None:
    """UsageError listing every field of `obj` outside its declared choices/range (before any work)."""
    bad = []
    for p in params_of(type(obj)):
        why = _problem(p, getattr(obj, p.name))
        if why:
            bad.append(f"{p.ref} {why}")
    if bad:
        raise UsageError("; ".join(bad))


def ref(section: str, name: str) -> str:
    """A reference to a parameter inside a message, rendered where the message is shown."""
    return f"{{{{{section}.{name}}}}}"


Renderer = Callable[[str, str], str]


def render_refs(text: str, render: Renderer | None = None) -> str:
    """Replace `ref(...)` tokens: `render(section, name)` or `section.name`."""
    if "{{" not in text:
        return text
    return _REF.sub(lambda m: render(m[1], m[2]) if render else f"{m[1]}.{m[2]}", text)


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able recipe (geometry + parameters)."""
    blob = json.dumps(recipe, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_names(value: str | Iterable[str] | None) -> list[str]:
    """Names from `a,b c` strings (or several of them), in order, without duplicates."""
    if value is None:
        return []
    parts = [value] if isinstance(value, str) else list(value)
    return list(dict.fromkeys(n for p in parts for n in re.split(r"[,\s]+", p) if n))
