"""OpenSlide: every vendor format it knows (Aperio, Hamamatsu, DICOM, MIRAX, generic tiled TIFF ...)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .base import SlideBackend, to_rgb

OPENSLIDE_DEFAULT_CACHE = 32 << 20  # bytes; OpenSlide's own default per handle
# Vendors whose levels are plain TIFF pages that tifffile sees the same way (fast reader).
TIFF_PAGE_VENDORS = frozenset({"aperio", "generic-tiff", "hamamatsu"})


class OpenSlideBackend(SlideBackend):
    name = "openslide"
    # Not .ome.tif(f)/.qptiff: OpenSlide would read them as generic TIFF and miss their pyramid.
    extensions = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".dcm")

    def __init__(self, path: str, handle: Any) -> None:
        props = dict(handle.properties)
        super().__init__(
            path,
            props,
            tuple(handle.level_dimensions),
            tuple(float(d) for d in handle.level_downsamples),
            vendor=props.get("openslide.vendor"),
        )
        self._h = handle

    @classmethod
    def open(cls, path: str) -> OpenSlideBackend:
        import openslide

        return cls(path, openslide.OpenSlide(path))

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return to_rgb(np.asarray(self._h.read_region((x, y), level, (w, h))))

    @contextlib.contextmanager
    def tile_cache(self, capacity: int) -> Iterator[None]:
        set_cache = getattr(self._h, "set_cache", None)  # OpenSlide >= 4 only
        if set_cache is None:
            yield
            return
        import openslide

        set_cache(openslide.OpenSlideCache(capacity))
        try:
            yield
        finally:
            set_cache(openslide.OpenSlideCache(OPENSLIDE_DEFAULT_CACHE))

    def fast_path_refusal(self, level: int) -> str | None:
        if self.vendor in TIFF_PAGE_VENDORS:
            return None
        return f"OpenSlide vendor {self.vendor!r} is read through read_region"

    def close(self) -> None:
        self._h.close()
