"""The storage layout: the only module that names the datasets of a slide's store and the paths of
a run folder (ARCHITECTURE.md, "Storage").

    <output>/<mag>x_<patch>px_<overlap>px_overlap/       RunLayout.root (the geometry names it)
      patches/<slide_id>.h5                              RunLayout.store(slide_id)
      masks/<slide_id>.geojson   visualization/   images/<slide_id>/
      patient_features/<name>/<case_id>.h5   patient_features/patients.json
      exports/
      patch_stores/<format>/                             RunLayout.patch_store_dir(format) (training patches)
    <output>/catalog/                                    provenance (core.catalog)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..geometry import run_folder_name, target_mpp_from
from ..params import param

# -- dataset names inside a slide's store -------------------------------------------------------
COORDS = "coords"  # int32 (N, 2) level-0 (x, y)
COORDS_EXT = "coords_ext"  # int32 (N, 5) (x, y, w, h, level)
TISSUE_FRACTION = "tissue_fraction"  # float32 (N,)
MASK = "tissue/mask"  # uint8 mask at thumbnail resolution
THUMBNAIL = "tissue/thumbnail_jpeg"  # the segmented thumbnail, JPEG bytes (previews, overlays)
FEATURES = "features"  # features/<encoder> (N, D)
SLIDE_FEATURES = "slide_features"  # slide_features/<name> (D,)

STORE_FORMATS = ("h5",)
RUN_FOLDER = re.compile(r"^(?P<mag>[0-9.]+)x_(?P<patch>\d+)px_(?P<overlap>-?\d+)px_overlap$")


def features_name(encoder: str) -> str:
    return f"{FEATURES}/{encoder}"


def slide_features_name(name: str) -> str:
    return f"{SLIDE_FEATURES}/{name}"


@dataclass(frozen=True)
class GeometryParams:
    """The patch geometry of a run: it names the run folder (and so every store in it)."""

    SECTION: ClassVar[str] = "store"

    patch_size: int = param(256, "Patch side at the target magnification (px)", gt=0)
    step_size: int | None = param(None, "Stride at the target magnification (px) [patch size]", gt=0)
    target_mag: float | None = param(20.0, "Target magnification, e.g. 20 (= 0.5 µm/px)", gt=0)
    target_mpp: float | None = param(None, "Target µm/px (instead of the target magnification)", gt=0)
    format: str = param("h5", "Per-slide store format", choices=STORE_FORMATS, cli="")


@dataclass(frozen=True)
class RunLayout:
    """`<output>/<mag>x_<patch>px_<overlap>px_overlap/` and the per-slide paths inside it."""

    output: Path
    patch_size: int
    step_size: int
    target_magnification: float
    target_mpp: float
    format: str = "h5"

    @classmethod
    def create(
        cls,
        output: str | Path,
        patch_size: int,
        step_size: int | None = None,
        target_mag: float | None = None,
        target_mpp: float | None = None,
        format: str = "h5",
    ) -> RunLayout:
        t_mpp, t_mag = target_mpp_from(target_mag, target_mpp)
        return cls(Path(output), int(patch_size), int(step_size or patch_size), t_mag, t_mpp, format)

    @classmethod
    def from_params(cls, output: str | Path, g: GeometryParams) -> RunLayout:
        return cls.create(output, g.patch_size, g.step_size, g.target_mag, g.target_mpp, g.format)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RunLayout:
        """The layout of an existing run folder (its name holds magnification, patch and overlap)."""
        p = Path(run_dir)
        m = RUN_FOLDER.match(p.name)
        if not m:
            raise ValueError(f"{p.name!r} is not a run folder name (<mag>x_<patch>px_<overlap>px_overlap)")
        patch = int(m["patch"])
        return cls.create(p.parent, patch, patch - int(m["overlap"]), target_mag=float(m["mag"]))

    @property
    def root(self) -> Path:
        return self.output / run_folder_name(self.target_magnification, self.patch_size, self.step_size)

    @property
    def catalog_dir(self) -> Path:
        return self.output / "catalog"

    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    def store(self, slide_id: str):  # -> SlideStore (import cycle: the backends import this module)
        from .h5 import H5SlideStore

        return H5SlideStore(self.patches_dir / f"{slide_id}.h5", slide_id)

    def slide_ids(self) -> list[str]:
        """Ids of the slides with a store in this run folder."""
        if not self.patches_dir.is_dir():
            return []
        return sorted(p.stem for p in self.patches_dir.glob("*.h5") if not p.name.startswith("."))

    def geojson_path(self, slide_id: str) -> Path:
        return self.root / "masks" / f"{slide_id}.geojson"

    def images_dir(self, slide_id: str) -> Path:
        return self.root / "images" / slide_id

    def visualization(self, slide_id: str, kind: str = "") -> Path:
        suffix = f"_{kind}" if kind else ""
        return self.root / "visualization" / f"{slide_id}{suffix}.png"

    @property
    def patients_dir(self) -> Path:
        return self.root / "patient_features"

    def patient_path(self, name: str, case_id: str) -> Path:
        return self.patients_dir / name / f"{case_id}.h5"

    @property
    def patients_manifest(self) -> Path:
        return self.patients_dir / "patients.json"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def patch_store_dir(self, kind: str) -> Path:
        """Default destination of a training patch store (`atlaspatch export-patches --format kind`)."""
        return self.root / "patch_stores" / kind
