"""Dagster resources: thin wrappers whose fields are derived from the core parameter objects."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from ..core.catalog import Catalog
from ..core.source import SlideRef, SlideSource, SlideSourceParams
from ..core.stages import ComputeParams, ModelCache, ModelParams, Outcome
from ..core.store import GeometryParams, RunLayout
from .config import derive, to_params

OUTPUT_ENV = "ATLASPATCH_OUTPUT"


def default_output_dir() -> str:
    return os.environ.get(OUTPUT_ENV, os.path.abspath("output"))


def _output_field() -> Any:
    return (str, Field(default_factory=default_output_dir, description=f"Output root (${OUTPUT_ENV})"))


class StoreResource(derive(ConfigurableResource, GeometryParams, "_StoreFields", output_dir=_output_field())):
    """The run folder `<output_dir>/<mag>x_<patch>px_<overlap>px_overlap/` (the geometry names it)."""

    def geometry(self) -> GeometryParams:
        return to_params(GeometryParams, self)

    @property
    def layout(self) -> RunLayout:
        return RunLayout.from_params(self.output_dir, self.geometry())

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.layout.catalog_dir)


class SlideSourceResource(derive(ConfigurableResource, SlideSourceParams, "_SourceFields", output_dir=_output_field())):
    """Slide ids (partition keys) → files via the catalog; MPP overrides from a CSV."""

    _source: SlideSource | None = PrivateAttr(default=None)

    @property
    def source(self) -> SlideSource:
        if self._source is None:
            self._source = SlideSource(
                Catalog(os.path.join(self.output_dir, "catalog")), to_params(SlideSourceParams, self)
            )
        return self._source

    @property
    def catalog(self) -> Catalog:
        return self.source.catalog

    def ref(self, slide_id: str) -> SlideRef:
        return self.source.ref(slide_id)

    def register(self, slide_id: str, path: str) -> None:
        self.source.register(slide_id, path)


class ComputeResource(derive(ConfigurableResource, ComputeParams, "_ComputeFields")):
    """Device, precision, batch size and reader threads of the model stages."""

    def params(self) -> ComputeParams:
        return to_params(ComputeParams, self)


class ModelsResource(derive(ConfigurableResource, ModelParams, "_ModelFields")):
    """Offline weights and plugins; models are loaded once per run (and kept for its slides)."""

    _cache: ModelCache | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._cache = ModelCache(to_params(ModelParams, self))

    @property
    def cache(self) -> ModelCache:
        if self._cache is None:
            self._cache = ModelCache(to_params(ModelParams, self))
        return self._cache


# In-process callers (the CLI) receive each slide's outcomes and progress through a sink they
# register here; its name is the resource's only config, so runs stay serializable.
_SINKS: dict[str, Any] = {}


class ReporterResource(ConfigurableResource):
    """Forwards outcomes/progress to an in-process listener (the CLI); a no-op in the UI."""

    sink: str = Field("", description="Name of an in-process listener (set by the CLI)")

    def listener(self) -> Any:
        return _SINKS.get(self.sink)

    def outcomes(self, slide_id: str, outcomes: list[Outcome]) -> None:
        if (listener := self.listener()) is not None:
            listener.outcomes(slide_id, outcomes)

    def progress_callback(self) -> Callable[[str, str, int, int], None] | None:
        listener = self.listener()
        return None if listener is None else listener.progress

    def renderer(self) -> Callable[[str, str], str] | None:
        """How the listener names parameters in messages (the CLI: its flags), if it says."""
        return getattr(self.listener(), "render", None)


def register_sink(name: str, listener: Any) -> None:
    """`listener.outcomes(slide_id, outcomes)`, `listener.progress(slide, asset, done, total)` and
    optionally `listener.render(section, name)` (how messages name parameters)."""
    _SINKS[name] = listener


def unregister_sink(name: str) -> None:
    _SINKS.pop(name, None)
