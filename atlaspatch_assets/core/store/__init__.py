"""Per-slide stores and the run-folder layout (see `layout` for every dataset and path name)."""

from .base import DatasetWrite, SlideStore, StoreMissingError, json_attr
from .files import TMP_MARK, remove_orphan_temps, remove_orphans_in, write_dir_atomic, write_file_atomic
from .layout import (
    COORDS,
    COORDS_EXT,
    FEATURES,
    FOCUS,
    INK_FRACTION,
    MASK,
    SLIDE_FEATURES,
    STORE_FORMATS,
    THUMBNAIL,
    TISSUE_FRACTION,
    GeometryParams,
    RunLayout,
    features_name,
    slide_features_name,
)

__all__ = [
    "COORDS",
    "COORDS_EXT",
    "DatasetWrite",
    "FEATURES",
    "FOCUS",
    "INK_FRACTION",
    "GeometryParams",
    "MASK",
    "RunLayout",
    "SLIDE_FEATURES",
    "STORE_FORMATS",
    "SlideStore",
    "StoreMissingError",
    "THUMBNAIL",
    "TISSUE_FRACTION",
    "TMP_MARK",
    "features_name",
    "json_attr",
    "remove_orphan_temps",
    "remove_orphans_in",
    "slide_features_name",
    "write_dir_atomic",
    "write_file_atomic",
]
