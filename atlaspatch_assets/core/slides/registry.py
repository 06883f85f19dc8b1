"""The slide backends, in the order `open_slide` tries them on a file they claim.

A new reader is one module with a `SlideBackend` subclass plus one entry here.
"""

from __future__ import annotations

from pathlib import Path

from .base import SlideBackend, file_extension
from .image_backend import IMAGE_EXTENSIONS, ImageBackend
from .openslide_backend import OpenSlideBackend
from .tiff_backend import TiffPageBackend
from .tiffslide_backend import TiffSlideBackend

BACKENDS: list[type[SlideBackend]] = [OpenSlideBackend, TiffSlideBackend, TiffPageBackend, ImageBackend]

# Known slide formats without a reader here: discovery reports them instead of skipping them.
UNSUPPORTED_FORMATS = {
    ".czi": "Zeiss CZI has no reader here; convert it to OME-TIFF (e.g. bfconvert or QuPath)",
}


def backends_for(path: str | Path) -> list[type[SlideBackend]]:
    """The registered backends that claim `path`, in trial order."""
    return [b for b in BACKENDS if b.claims(path)]


def supported_extensions() -> tuple[str, ...]:
    """Every extension some registered backend claims (registry order, no duplicates)."""
    return tuple(dict.fromkeys(ext for b in BACKENDS for ext in b.extensions))


def is_supported(path: str | Path) -> bool:
    return bool(backends_for(path))


def unsupported_reason(path: str | Path) -> str | None:
    """One-line reason for a known slide format that no backend reads, else None."""
    ext = file_extension(path)
    why = UNSUPPORTED_FORMATS.get(ext)
    return f"unsupported: {ext} ({why})" if why and not is_supported(path) else None


OPENSLIDE_EXTENSIONS = OpenSlideBackend.extensions
SUPPORTED_EXTENSIONS = supported_extensions()

__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "OPENSLIDE_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "UNSUPPORTED_FORMATS",
    "backends_for",
    "is_supported",
    "supported_extensions",
    "unsupported_reason",
]
