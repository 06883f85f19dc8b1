"""The one registry pattern of the project: name → spec, built-ins plus what plugins register.

Patch encoders (`core.encoders`) and slide encoders (`core.slide_encoders`) are both a
`Registry` of their spec type; lookups are case/hyphen-insensitive and an unknown name raises the
registry's error with close names. Installed plugins (entry points) are loaded once per process,
plugin files once per distinct set of paths (see each package's `*_registry()` function).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

S = TypeVar("S")


def suggest(name: str, names: list[str], n: int = 4) -> list[str]:
    """Close names for a typo: difflib matches first, then names containing the query."""
    key = name.strip().lower().replace("-", "_")
    close = difflib.get_close_matches(key, names, n=n, cutoff=0.6)
    contains = [c for c in names if key and (key in c or c in key) and c not in close]
    return (close + contains)[:n]


class Registry(Mapping[str, S], Generic[S]):
    """Name -> spec. Built-ins and plugin entries are ordinary entries.

    Subclasses set `kind` (for messages), `validate(spec)` and `unknown(name, suggestions)`.
    """

    kind = "entry"

    def __init__(self, specs: Mapping[str, S] | None = None):
        self._specs: dict[str, S] = dict(specs or {})

    # -- hooks -----------------------------------------------------------------------------
    def validate(self, spec: S) -> None:  # noqa: B027 - optional hook
        """Raise TypeError/ValueError for an invalid spec."""

    def unknown(self, name: str, suggestions: list[str]) -> Exception:
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        return KeyError(f"unknown {self.kind} {name!r}.{hint}")

    # -- registry --------------------------------------------------------------------------
    def register(self, spec: S, *, replace: bool = False) -> S:
        """Add an entry (validated); an existing name needs ``replace=True``."""
        self.validate(spec)
        name = spec.name  # type: ignore[attr-defined]
        if name in self._specs and not replace and self._specs[name] is not spec:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")
        self._specs[name] = spec
        return spec

    def copy(self: R) -> R:
        return type(self)(self._specs)

    def spec(self, name: str) -> S:
        """Look a name up (case/hyphen-insensitive); the registry's error with suggestions otherwise."""
        if name in self._specs:
            return self._specs[name]
        normalized = name.strip().lower().replace("-", "_")
        if normalized in self._specs:
            return self._specs[normalized]
        raise self.unknown(name, suggest(name, sorted(self._specs)))

    def __getitem__(self, name: str) -> S:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} {self.kind}s)"


R = TypeVar("R", bound=Registry)


def cached_registry(build: Callable[[tuple[str, ...]], R]) -> Callable[[tuple[str, ...]], R]:
    """Memoize a registry builder by its plugin files (entry points are part of every build)."""
    cache: dict[tuple[str, ...], R] = {}

    def get(plugin_files: tuple[str, ...] = ()) -> R:
        key = tuple(plugin_files)
        if key not in cache:
            cache[key] = build(key)
        return cache[key]

    get.cache_clear = cache.clear  # type: ignore[attr-defined]
    return get
