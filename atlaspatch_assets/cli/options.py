"""Click options derived from the core parameter objects (flag, type, default, help, range), and
the way back: the values a command received → the typed parameters.

A field `name` of a parameters class becomes `--name-with-dashes` unless its `cli` says otherwise
(`cli="seg-method"`, a `"on/off"` pair for booleans, `""` = no option). Booleans default False
are flags, default True get `--x/--no-x`; dicts are repeatable NAME=VALUE; lists repeatable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import click

from ..core.errors import UsageError
from ..core.params import ParamInfo, params_of

T = TypeVar("T")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def output_option(help: str = "Output root (holds catalog/)") -> Callable[[Any], Any]:
    """`--output/-o`: the output root every command reads or writes (default ./output)."""
    return click.option(
        "--output", "-o", type=click.Path(file_okay=False), default="./output", show_default=True, help=help
    )


# The option (dest) each (section, field) got: renders parameter references as flags.
FLAGS: dict[tuple[str, str], str] = {}
DESTS: dict[tuple[str, str], str] = {}
ENVVARS = {"sam2_checkpoint": "ATLASPATCH_SAM2_CHECKPOINT", "weights_dir": "ATLASPATCH_WEIGHTS_DIR"}


def flag_of(p: ParamInfo) -> str | None:
    if p.cli == "":
        return None
    return p.cli or p.name.replace("_", "-")


def dest_of(p: ParamInfo) -> str:
    flag = flag_of(p) or p.name
    return flag.split("/")[0].replace("-", "_")


def cli_ref(section: str, name: str) -> str:
    """A parameter reference rendered for the command line (the flag, or the field name)."""
    if not FLAGS:
        from . import slides  # noqa: F401  (defining the commands records their flags)
    if (section, name) == ("features", "encoders"):
        return "--feature-extractors"
    return FLAGS.get((section, name), f"{section}.{name}")


class _Finite(click.ParamType):
    """A number in a range; NaN and inf are refused (click's FloatRange lets NaN through)."""

    def __init__(self, kind: type, ge: float | None, le: float | None, gt: float | None):
        self.kind, self.ge, self.le, self.gt = kind, ge, le, gt
        self.name = kind.__name__

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.gt is not None and not v > self.gt:
            self.fail(f"{v} must be > {self.gt:g}", param, ctx)
        if self.ge is not None and not v >= self.ge:
            self.fail(f"{v} must be >= {self.ge:g}", param, ctx)
        if self.le is not None and not v <= self.le:
            self.fail(f"{v} must be <= {self.le:g}", param, ctx)
        return v

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        lo = f">{self.gt:g}" if self.gt is not None else (f">={self.ge:g}" if self.ge is not None else "")
        hi = f"<={self.le:g}" if self.le is not None else ""
        span = f"{self.ge:g}-{self.le:g}" if self.ge is not None and self.le is not None else (lo or hi)
        return f"{self.name.upper()}" + (f" [{span}]" if span else "")


def _option(p: ParamInfo, overrides: Mapping[str, Any]) -> Callable[[Any], Any]:
    flag = flag_of(p)
    assert flag is not None
    kind = p.base_type
    kw: dict[str, Any] = {"help": p.help, "show_default": True}
    names: list[str]
    if kind is bool:
        on, _, off = flag.partition("/")
        off = off or (f"no-{on}" if p.default else "")
        names = [f"--{on}/--{off}" if off else f"--{on}"]
        kw.update(default=p.default, **({} if off else {"is_flag": True}))
    elif isinstance(p.default, dict) or typing_origin(p.type) is dict:
        names = [f"--{flag}"]
        kw.update(multiple=True, metavar="NAME=VALUE", show_default=False)
    elif isinstance(p.default, list) or typing_origin(p.type) is list:
        names = [f"--{flag}"]
        kw.update(multiple=True, type=click.Path(), show_default=False)
    else:
        names = [f"--{flag}"]
        if p.choices:
            kw["type"] = click.Choice(list(p.choices))
        elif kind in (int, float):
            kw["type"] = _Finite(kind, p.ge, p.le, p.gt)
        kw["default"] = p.default
        if p.default is None or p.default == "":
            kw["show_default"] = False
    if p.name in ENVVARS:
        kw.update(envvar=ENVVARS[p.name], show_envvar=True)
    kw.update(overrides.get(p.name, {}))
    FLAGS[(p.section, p.name)] = names[0].split("/")[0]
    DESTS[(p.section, p.name)] = dest_of(p)
    return click.option(*names, dest_of(p), **kw)


def typing_origin(t: Any) -> Any:
    import typing

    return typing.get_origin(t)


def options_for(
    cls: type,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[Any], Any]:
    """Decorator adding the options of `cls`'s parameters (all with a CLI flag, or `only` these)."""
    keep = set(only) if only is not None else None
    skip = set(exclude)
    params = [
        p for p in params_of(cls) if flag_of(p) is not None and p.name not in skip and (keep is None or p.name in keep)
    ]
    if keep is not None:
        order = list(only or ())
        params.sort(key=lambda p: order.index(p.name))

    def decorate(fn: Any) -> Any:
        for p in reversed(params):
            fn = _option(p, overrides or {})(fn)
        return fn

    return decorate


def _pairs(values: Iterable[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"{flag} {item!r}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def params_from(cls: type[T], kw: Mapping[str, Any], **fixed: Any) -> T:
    """`cls` with the values the command received for its options (others keep their default)."""
    values: dict[str, Any] = {}
    for p in params_of(cls):
        dest = dest_of(p)
        if flag_of(p) is None or dest not in kw:
            continue
        v = kw[dest]
        if isinstance(p.default, dict):
            v = _pairs(v, f"--{flag_of(p)}")
        elif isinstance(p.default, list):
            v = list(v)
        elif v is None and not p.optional:
            continue  # e.g. an option left unset whose value comes from elsewhere
        values[p.name] = v
    values.update(fixed)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
