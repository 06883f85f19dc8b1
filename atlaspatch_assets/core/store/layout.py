"""The storage layout: the only module that names the datasets of a slide's store and the paths of
a run folder (ARCHITECTURE.md, "Storage").

    <output>/<mag>x_<patch>px_<overlap>px_overlap/       RunLayout.root (the geometry names it)
      patches/<slide_id>.h5                              RunLayout.store(slide_id), format h5
      zarr/<slide_id>.zarr/                              RunLayout.store(slide_id), format zarr
      masks/<slide_id>.geojson   visualization/   images/<slide_id>/
      patient_features/<name>/<case_id>.h5   patient_features/patients.json
      exports/
      patch_stores/<format>/                             RunLayout.patch_store_dir(format) (training patches)
    <output>/catalog/                                    provenance (core.catalog)
    <output>/tables/                                     lakehouse tables (core.tables)
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from ..geometry import run_folder_name, target_mpp_from
from ..params import param

# -- dataset names inside a slide's store -------------------------------------------------------
COORDS = "coords"  # int32 (N, 2) level-0 (x, y)
COORDS_EXT = "coords_ext"  # int32 (N, 5) (x, y, w, h, level)
TISSUE_FRACTION = "tissue_fraction"  # float32 (N,)
INK_FRACTION = "ink_fraction"  # float32 (N,) share of a patch under ink/debris (with patch quality on)
FOCUS = "focus"  # float32 (N,) focus score of a patch (with patch quality on)
MASK = "tissue/mask"  # uint8 mask at thumbnail resolution
THUMBNAIL = "tissue/thumbnail_jpeg"  # the segmented thumbnail, JPEG bytes (previews, overlays)
FEATURES = "features"  # features/<encoder> (N, D)
SLIDE_FEATURES = "slide_features"  # slide_features/<name> (D,)


@dataclass(frozen=True)
class StoreFormat:
    """A per-slide store backend: where its stores live in a run folder and which class reads them."""

    name: str
    folder: str  # inside the run folder
    suffix: str  # of each slide's store (a file for h5, a directory for zarr)
    backend: str  # "<module of this package>:<class>", imported on use (the backends import this module)

    def store_class(self) -> type:
        module, cls = self.backend.split(":")
        return getattr(importlib.import_module(f".{module}", __package__), cls)


FORMATS = {
    "h5": StoreFormat("h5", "patches", ".h5", "h5:H5SlideStore"),
    "zarr": StoreFormat("zarr", "zarr", ".zarr", "zarr:ZarrSlideStore"),
}
STORE_FORMATS = tuple(FORMATS)
DEFAULT_FORMAT = "h5"  # the seed's
TABLES_DIR = "tables"  # <output>/tables/: the lakehouse tables (core.tables)
RUN_FOLDER = re.compile(r"^(?P<mag>[0-9.]+)x_(?P<patch>\d+)px_(?P<overlap>-?\d+)px_overlap$")


def features_name(encoder: str) -> str:
    return f"{FEATURES}/{encoder}"


def slide_features_name(name: str) -> str:
    return f"{SLIDE_FEATURES}/{name}"


@dataclass(frozen=True)
class GeometryParams:
    """The patch geometry of a run: it names the run folder (and so every store in it)."""

    SECTION: ClassVar[str] = "store"

    patch_size: int = param(256, "Patch side at the target magnification (px)", ge=1, le=65536)
    step_size: int | None = param(None, "Stride at the target magnification (px) [patch size]", ge=1, le=65536)
    # 0.1x-200x: the plausible MPP range of slides (0.05-20 µm/px) with room for coarse targets
    target_mag: float | None = param(20.0, "Target magnification, e.g. 20 (= 0.5 µm/px)", ge=0.1, le=200)
    target_mpp: float | None = param(None, "Target µm/px (instead of the target magnification)", ge=0.05, le=100)
    format: str = param(
        DEFAULT_FORMAT,
        "Per-slide store: h5 (patches/<slide>.h5) or zarr (zarr/<slide>.zarr, one directory per array)",
        choices=STORE_FORMATS,
        cli="store",
        recipe=False,
    )


@dataclass(frozen=True)
class RunLayout:
    """`<output>/<mag>x_<patch>px_<overlap>px_overlap/` and the per-slide paths inside it."""

    output: Path
    patch_size: int
    step_size: int
    target_magnification: float
    target_mpp: float
    format: str = DEFAULT_FORMAT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown store format {self.format!r} (one of: {', '.join(FORMATS)})")

    @classmethod
    def create(
        cls,
        output: str | Path,
        patch_size: int,
        step_size: int | None = None,
        target_mag: float | None = None,
        target_mpp: float | None = None,
        format: str = DEFAULT_FORMAT,
    ) -> RunLayout:
        t_mpp, t_mag = target_mpp_from(target_mag, target_mpp)
        return cls(Path(output), int(patch_size), int(step_size or patch_size), t_mag, t_mpp, format)

    @classmethod
    def from_params(cls, output: str | Path, g: GeometryParams) -> RunLayout:
        return cls.create(output, g.patch_size, g.step_size, g.target_mag, g.target_mpp, g.format)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, format: str | None = None) -> RunLayout:
        """The layout of an existing run folder (its name holds magnification, patch and overlap).

        The store format is `format`, else the one found on disk (`detect_format`).
        """
        p = Path(run_dir)
        m = RUN_FOLDER.match(p.name)
        if not m:
            raise ValueError(f"{p.name!r} is not a run folder name (<mag>x_<patch>px_<overlap>px_overlap)")
        patch = int(m["patch"])
        layout = cls.create(p.parent, patch, patch - int(m["overlap"]), target_mag=float(m["mag"]))
        return layout.with_format(format or layout.detect_format())

    def with_format(self, format: str) -> RunLayout:
        return self if format == self.format else replace(self, format=format)

    def formats_on_disk(self) -> list[str]:
        """The store formats with at least one slide's store in this run folder."""
        return [f for f in FORMATS if self.with_format(f).slide_ids()]

    def detect_format(self) -> str:
        """The format of the stores on disk. A run folder holding both (e.g. `atlaspatch convert
        --keep-source`) reads the one with more slides, the seed's h5 on a tie, and logs it."""
        found = self.formats_on_disk()
        if len(found) <= 1:
            return found[0] if found else self.format
        counts = {f: len(self.with_format(f).slide_ids()) for f in found}
        best = max(found, key=lambda f: (counts[f], f == DEFAULT_FORMAT))
        logging.getLogger("atlaspatch").warning(
            f"{self.root} holds {' and '.join(f'{counts[f]} {f}' for f in found)} stores: reading {best} "
            f"(remove the other folder, or convert with `atlaspatch convert`)"
        )
        return best

    @property
    def root(self) -> Path:
        return self.output / run_folder_name(self.target_magnification, self.patch_size, self.step_size)

    @property
    def catalog_dir(self) -> Path:
        return self.output / "catalog"

    @property
    def tables_dir(self) -> Path:
        return self.output / TABLES_DIR

    @property
    def store_format(self) -> StoreFormat:
        return FORMATS[self.format]

    @property
    def stores_dir(self) -> Path:
        """The folder of this layout's per-slide stores (`patches/` for h5, `zarr/` for zarr)."""
        return self.root / self.store_format.folder

    @property
    def patches_dir(self) -> Path:
        """The seed's name for the stores folder: the same as `stores_dir` (kept for its callers)."""
        return self.stores_dir

    def store_path(self, slide_id: str) -> Path:
        return self.stores_dir / f"{slide_id}{self.store_format.suffix}"

    def store(self, slide_id: str):  # -> SlideStore (import cycle: the backends import this module)
        return self.store_format.store_class()(self.store_path(slide_id), slide_id)

    def slide_ids(self) -> list[str]:
        """Ids of the slides with a (complete) store in this run folder; hidden temporaries left out."""
        if not self.stores_dir.is_dir():
            return []
        suffix, cls = self.store_format.suffix, self.store_format.store_class()
        return sorted(
            p.name[: -len(suffix)]
            for p in self.stores_dir.iterdir()
            if p.name.endswith(suffix) and not p.name.startswith(".") and cls(p).exists()
        )

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

    def sweep_orphans(self) -> int:
        """Remove temporaries left in this run folder by killed writers (their pid is gone)."""
        from .files import remove_orphans_in

        folders = [self.root / "masks", self.root / "visualization", self.root / "images"]
        if self.patients_dir.is_dir():
            folders += [self.patients_dir, *(p for p in self.patients_dir.iterdir() if p.is_dir())]
        # in the stores folder only files: a Zarr store's staging folder may hold a journal its
        # next writer replays (core.store.zarr), so the store itself cleans those up
        n = remove_orphans_in(self.patches_dir, dirs=False) if self.patches_dir.is_dir() else 0
        return n + sum(remove_orphans_in(f) for f in folders if f.is_dir())

    def patch_store_dir(self, kind: str) -> Path:
        """Default destination of a training patch store (`atlaspatch export-patches --format kind`)."""
        return self.root / "patch_stores" / kind
