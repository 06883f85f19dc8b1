"""The interface every slide reader implements, and the pixel helpers they share.

A backend opens one file and exposes its pyramid (level sizes and downsamples, level 0 first)
and its metadata properties; `read_region` returns RGB uint8 with everything outside the image
(or not scanned) white. `Slide` (slides/slide.py) wraps a backend with the MPP, the thumbnail
and error handling; `registry.BACKENDS` lists the backends in the order they are tried.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import SlideTooLargeError

# Largest decoded buffer a backend may materialise at once (a whole plain image, one TIFF strip).
MAX_DECODE_BYTES = 512 << 20
TooLargeToDecode = SlideTooLargeError  # what backends raise to refuse such a file (one line)

# Extensions made of two suffixes: matched before the last suffix alone.
COMPOUND_EXTENSIONS = (".ome.tiff", ".ome.tif")


def file_extension(path: str | Path) -> str:
    """Lower-case extension a backend claims: '.ome.tiff' for 'x.OME.TIFF', else the last suffix."""
    name = Path(path).name.lower()
    for ext in COMPOUND_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return Path(name).suffix


# Formats whose main file is a text index (MIRAX, Hamamatsu VMS/VMU): no binary signature.
TEXT_INDEX_EXTENSIONS = (".mrxs", ".vms", ".vmu")
HEAD_BYTES = 512  # what `sniff_format` looks at
KNOWN_SIGNATURES = "TIFF/BigTIFF, JPEG, PNG, BMP, GIF, WebP, DICOM"


def sniff_format(head: bytes) -> str | None:
    """Container format named by a file's first bytes (`HEAD_BYTES` of them), or None."""
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "tiff"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM":
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:10] == b"ZISRAWFILE":
        return "czi"
    return None


class SlideBackend(ABC):
    """One way of reading slide files (one subclass per library).

    Subclasses set `name` (short, shown in metadata) and `extensions` (what `open` is tried on),
    implement `open` and `read_region`, and are listed in `registry.BACKENDS`. `open` may raise
    anything: `open_slide` turns it into a one-line `SlideOpenError` and tries the next backend.
    """

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        path: str,
        properties: dict[str, str],
        level_dimensions: tuple[tuple[int, int], ...],
        level_downsamples: tuple[float, ...],
        vendor: str | None = None,
    ) -> None:
        self.path = path
        self.properties = properties
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.vendor = vendor

    @classmethod
    def claims(cls, path: str | Path) -> bool:
        """Whether `open` is worth trying on this file (by extension; the content decides later)."""
        return file_extension(path) in cls.extensions

    @classmethod
    @abstractmethod
    def open(cls, path: str) -> SlideBackend:
        """Open `path`; raise (any exception, one-line message) when this backend cannot read it."""

    @abstractmethod
    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`, top-left at level-0 (x, y); white outside the image."""

    def tile_cache(self, capacity: int) -> contextlib.AbstractContextManager[None]:
        """Context in which the backend's tile cache holds at most `capacity` bytes (if it has one)."""
        return contextlib.nullcontext()

    def fast_path_refusal(self, level: int) -> str | None:
        """None when the fast reader may decode `level` straight from the file's TIFF pages
        (tifffile; it still self-checks against `read_region`), else why it must not."""
        return f"backend {self.name!r} is read through read_region"

    def close(self) -> None:  # noqa: B027 -- optional hook: most handles need no explicit close
        """Release file handles."""


def mib(n: float) -> str:
    """Byte count for messages: '858 MiB', '4.5 GiB'."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 from gray/RGB/RGBA; transparent pixels (no scanned data) become white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4]
        rgb = arr[..., :3]
        if alpha.min() < 255:
            a = alpha.astype(np.float32) / 255.0
            rgb = (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
        return np.ascontiguousarray(rgb)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    hi = float(a.max()) or 1.0
    return np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)


def paste_inside(
    x: int, y: int, w: int, h: int, width: int, height: int, read: Callable[[int, int, int, int], np.ndarray]
) -> np.ndarray:
    """A white (h, w, 3) canvas with `read(x0, y0, x1, y1)` (RGB of that image box) pasted where
    the box (x, y, w, h) overlaps a `width` x `height` single-level image."""
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = read(x0, y0, x1, y1)
    return out
