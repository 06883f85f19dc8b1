"""Dagster resources: where slides come from, where outputs go, and the compute device."""

import os
from functools import cached_property

from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from .core.catalog import SLIDES, Catalog, fingerprint
from .core.discovery import assign_ids, discover
from .core.errors import SlideError, SlideOpenError
from .core.mpp import load_mpp_csv, stem_of
from .core.pipeline import RunLayout
from .core.slide import Slide, open_slide


def default_output_dir() -> str:
    return os.environ.get("ATLASPATCH_OUTPUT", os.path.abspath("output"))


class StoreResource(ConfigurableResource):
    """The run folder `<output_dir>/<mag>x_<patch>px_<overlap>px_overlap/` (geometry defines it)."""

    output_dir: str = Field(default_factory=default_output_dir, description="Output root")
    patch_size: int = Field(256, description="Patch side at the target resolution (px)")
    step_size: int = Field(0, description="Stride at the target resolution; 0 = patch_size")
    target_mag: float = Field(20.0, description="Target magnification (20x = 0.5 µm/px)")
    target_mpp: float = Field(0.0, description="Target µm/px; overrides target_mag when > 0")
    format: str = Field("h5", description="Per-slide store format (h5)")

    @property
    def layout(self) -> RunLayout:
        return RunLayout.create(
            self.output_dir,
            self.patch_size,
            self.step_size or None,
            target_mag=self.target_mag,
            target_mpp=self.target_mpp or None,
        )

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.layout.catalog_dir)


class SlideSourceResource(ConfigurableResource):
    """Maps slide ids (partition keys) to files via the catalog; MPP overrides from a CSV."""

    output_dir: str = Field(default_factory=default_output_dir, description="Output root (holds the catalog)")
    mpp_csv: str = Field("", description="CSV with columns wsi,mpp (matched by file stem)")
    slide_dirs: list[str] = Field(
        default_factory=lambda: [d for d in os.environ.get("ATLASPATCH_SLIDE_DIRS", "").split(":") if d],
        description="Folders searched (recursively) for a slide id not yet in the catalog",
    )

    _mpp: dict[str, float] | None = PrivateAttr(default=None)

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(os.path.join(self.output_dir, "catalog"))

    def mpp_overrides(self) -> dict[str, float]:
        if self._mpp is None:
            self._mpp = load_mpp_csv(self.mpp_csv) if self.mpp_csv else {}
        return self._mpp

    def path_of(self, slide_id: str) -> str:
        known = self.catalog.slide_paths()
        path = known.get(slide_id)
        if path:
            return path
        if self.slide_dirs:  # a partition added by hand in the UI: find and register its file
            found, _ = discover(self.slide_dirs, recursive=True)
            for key, sf in assign_ids(found, taken=known).items():
                if key == slide_id:
                    self.register(key, sf.path)
                    return os.path.abspath(sf.path)
        raise SlideError(
            "slide id is not in the catalog nor in slide_dirs; add it with `atlaspatch` or the sensor, "
            "or set ATLASPATCH_SLIDE_DIRS",
            slide=slide_id,
            stage="open",
        )

    def open(self, slide_id: str) -> Slide:
        path = self.path_of(slide_id)
        overrides = self.mpp_overrides()
        mpp = overrides.get(slide_id) or overrides.get(stem_of(path))
        if mpp is None and os.path.basename(os.path.dirname(path)) in overrides:
            mpp = overrides[os.path.basename(os.path.dirname(path))]
        try:
            return open_slide(path, mpp_override=mpp)
        except SlideError as e:
            e.slide = slide_id
            raise
        except Exception as e:  # never let a backend exception escape as a crash
            raise SlideOpenError(f"{type(e).__name__}: {e}", slide=slide_id) from e

    def register(self, slide_id: str, path: str) -> None:
        """Record slide id → path (and file facts) in the catalog."""
        st = os.stat(path)
        self.catalog.append(
            SLIDES,
            [
                {
                    "slide_id": slide_id,
                    "path": os.path.abspath(path),
                    "size": st.st_size,
                    "mtime": st.st_mtime,
                    "fingerprint": fingerprint(path),
                }
            ],
        )


class ComputeResource(ConfigurableResource):
    """Compute settings shared by the GPU/CPU stages."""

    device: str = Field("cpu", description="cpu, cuda or cuda:<idx>")
    precision: str = Field("float32", description="float32 | float16 | bfloat16")
    batch_size: int = Field(32, description="Batch size for model forward passes")
    workers: int = Field(os.cpu_count() or 1, description="Reader threads per slide")
