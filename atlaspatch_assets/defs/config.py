"""Dagster `Config` classes and resource fields derived from the core parameter objects: one
field per parameter, with the core's default, documentation and range (never copied by hand)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import Field, create_model

from ..core.params import params_of

T = TypeVar("T")


def pydantic_fields(cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """`name=(annotation, Field(...))` for every declared parameter of a core parameters class."""
    skip = set(exclude)
    out: dict[str, Any] = {}
    for p in params_of(cls):
        if p.name in skip:
            continue
        bounds = {k: v for k, v in (("ge", p.ge), ("le", p.le), ("gt", p.gt)) if v is not None}
        help_ = p.help + (f" (one of: {', '.join(p.choices)})" if p.choices else "")
        if isinstance(p.default, (list, dict)):
            value = p.default
            field = Field(default_factory=lambda v=value: type(v)(v), description=help_)
        else:
            field = Field(p.default, description=help_, **bounds)
        out[p.name] = (p.type, field)
    return out


def derive(base: type[T], params_cls: type, name: str, exclude: Iterable[str] = (), **extra: Any) -> type[T]:
    """A subclass of `base` (Config or ConfigurableResource) with the fields of `params_cls` (+ `extra`)."""
    fields = {**pydantic_fields(params_cls, exclude), **extra}
    return create_model(name, __base__=base, __doc__=(params_cls.__doc__ or "").strip(), **fields)


def to_params(params_cls: type[T], obj: Any, **overrides: Any) -> T:
    """The core parameters object with the values of a derived Config/resource instance."""
    values = {p.name: getattr(obj, p.name) for p in params_of(params_cls) if hasattr(obj, p.name)}
    return params_cls(**{**values, **overrides})
