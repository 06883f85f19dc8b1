"""Slides behind one interface: a `SlideBackend` class per reader, tried in registry order."""

from __future__ import annotations

from .base import SlideBackend, file_extension, to_rgb
from .image_backend import ImageBackend
from .openslide_backend import OpenSlideBackend
from .registry import (
    BACKENDS,
    IMAGE_EXTENSIONS,
    OPENSLIDE_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    backends_for,
    is_supported,
    unsupported_reason,
)
from .slide import Slide, SlideInfo, best_level, open_slide
from .tiffslide_backend import TiffSlideBackend

__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "OPENSLIDE_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "ImageBackend",
    "OpenSlideBackend",
    "Slide",
    "SlideBackend",
    "SlideInfo",
    "TiffSlideBackend",
    "backends_for",
    "best_level",
    "file_extension",
    "is_supported",
    "open_slide",
    "to_rgb",
    "unsupported_reason",
]
