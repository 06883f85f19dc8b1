"""Compatibility module: slides now live in `core/slides/` (one class per backend)."""

from __future__ import annotations

from .slides import (
    BACKENDS,
    IMAGE_EXTENSIONS,
    OPENSLIDE_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    Slide,
    SlideBackend,
    SlideInfo,
    best_level,
    open_slide,
    to_rgb,
)

__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "OPENSLIDE_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "Slide",
    "SlideBackend",
    "SlideInfo",
    "best_level",
    "open_slide",
    "to_rgb",
]
