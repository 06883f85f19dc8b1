"""Where a stored slide's file is: the store's `wsi_path`, else the path the catalog maps its id to."""

from __future__ import annotations

import os

from ..catalog import Catalog
from ..errors import SlideError
from ..store import RunLayout


class SlideFileMissing(SlideError):
    stage = "open"


class SlideFiles:
    """Slide id → file of a run folder (the catalog is read once, only when a stored path is gone)."""

    def __init__(self, layout: RunLayout, catalog: Catalog | None = None):
        self.layout = layout
        self.catalog = catalog if catalog is not None else Catalog(layout.catalog_dir)
        self._paths: dict[str, str] | None = None

    def path(self, slide_id: str, stored: str | None = None) -> str:
        if stored is None:
            stored = str(self.layout.store(slide_id).attrs().get("wsi_path") or "")
        if stored and os.path.isfile(stored):
            return stored
        if self._paths is None:
            try:
                self._paths = self.catalog.slide_paths() if self.catalog.exists() else {}
            except Exception:  # an unreadable catalog only loses the fallback
                self._paths = {}
        moved = self._paths.get(slide_id, "")
        if moved and os.path.isfile(moved):
            return moved
        raise SlideFileMissing(
            f"slide file not found: {stored or '(no wsi_path stored)'}; put it back or register its new path "
            "with `atlaspatch segment-and-get-coords`",
            slide=slide_id,
        )
