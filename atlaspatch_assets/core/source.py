"""Where slides come from: slide id → file (the catalog, or a search of slide folders) and the
user's MPP overrides (`mpp_csv`); a lazily opened slide handle shared by a slide's stages."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from .catalog import SLIDES, Catalog, fingerprint
from .discovery import assign_ids, discover
from .errors import SlideError, SlideOpenError
from .mpp import load_mpp_csv, stem_of
from .params import param, ref
from .slide import Slide, open_slide

SLIDE_DIRS_ENV = "ATLASPATCH_SLIDE_DIRS"


def slide_dirs_from_env() -> list[str]:
    return [d for d in os.environ.get(SLIDE_DIRS_ENV, "").split(":") if d]


@dataclass(frozen=True)
class SlideSourceParams:
    SECTION: ClassVar[str] = "slide_source"

    mpp_csv: str = param("", "CSV with columns wsi,mpp overriding slide MPPs (matched by file stem)")
    slide_dirs: list[str] = param(
        default_factory=slide_dirs_from_env,
        help=f"Folders searched (recursively) for a slide id not yet in the catalog (${SLIDE_DIRS_ENV})",
        cli="",
    )


@dataclass(frozen=True)
class SlideRef:
    """A slide to process: its id (partition key), its file and the user's MPP override."""

    slide_id: str
    path: str
    mpp: float | None = None


class SlideHandle:
    """Opens the slide on first use, so stages that skip by recipe never open it."""

    def __init__(self, slide: SlideRef):
        self.ref = slide
        self._slide: Slide | None = None

    @property
    def slide_id(self) -> str:
        return self.ref.slide_id

    def open(self) -> Slide:
        if self._slide is None:
            try:
                self._slide = open_slide(self.ref.path, mpp_override=self.ref.mpp)
            except SlideError as e:
                e.slide = self.ref.slide_id
                raise
            except Exception as e:  # a backend exception is still this slide's problem
                raise SlideOpenError(f"{type(e).__name__}: {e}", slide=self.ref.slide_id) from e
        return self._slide

    @property
    def is_open(self) -> bool:
        return self._slide is not None

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> SlideHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlideSource:
    """Slide ids → files via the catalog (registering files found in `slide_dirs`), with MPP overrides."""

    def __init__(self, catalog: Catalog, params: SlideSourceParams | None = None):
        self.catalog = catalog
        self.params = params or SlideSourceParams()
        self._mpp: dict[str, float] | None = None

    def mpp_overrides(self) -> dict[str, float]:
        if self._mpp is None:
            self._mpp = load_mpp_csv(self.params.mpp_csv) if self.params.mpp_csv else {}
        return self._mpp

    def mpp_for(self, slide_id: str, path: str) -> float | None:
        o = self.mpp_overrides()
        return o.get(slide_id) or o.get(stem_of(path)) or o.get(os.path.basename(os.path.dirname(path)))

    def ref_for(self, slide_id: str, path: str) -> SlideRef:
        return SlideRef(slide_id, os.path.abspath(path), self.mpp_for(slide_id, path))

    def path_of(self, slide_id: str) -> str:
        known = self.catalog.slide_paths()
        if slide_id in known:
            return known[slide_id]
        if self.params.slide_dirs:  # a partition added by hand in the UI: find and register its file
            found, _ = discover(self.params.slide_dirs, recursive=True)
            for key, sf in assign_ids(found, taken=known).items():
                if key == slide_id:
                    self.register(key, sf.path)
                    return os.path.abspath(sf.path)
        raise SlideError(
            f"slide id is not in the catalog nor in {ref('slide_source', 'slide_dirs')}; "
            "add it with `atlaspatch` or the new_slides sensor",
            slide=slide_id,
            stage="open",
        )

    def ref(self, slide_id: str) -> SlideRef:
        return self.ref_for(slide_id, self.path_of(slide_id))

    def register(self, slide_id: str, path: str) -> None:
        """Record slide id → path (and file facts, when the file can be read) in the catalog."""
        row: dict = {"slide_id": slide_id, "path": os.path.abspath(path)}
        try:
            st = os.stat(path)
            row.update(size=st.st_size, mtime=st.st_mtime, fingerprint=fingerprint(path))
        except OSError:
            pass  # unreadable or gone: the slide fails alone when a stage opens it
        self.catalog.append(SLIDES, [row])
