"""tifffile, one page: big single-level TIFFs in bounded memory (never the whole image at once).

For TIFFs that tiffslide declines because a strip/tile is too large to decode per read (typically
one huge strip): uncompressed data is read row by row with `os.pread` (any size), compressed
strips/tiles are decoded one at a time (each at most `MAX_DECODE_BYTES`) and kept in a small
byte-bounded cache so a thumbnail read in row strips decodes each of them once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from .base import MAX_DECODE_BYTES, SlideBackend, TooLargeToDecode, mib, paste_inside, to_rgb

CHUNK_CACHE_BYTES = 64 << 20  # decoded strips/tiles kept (at least the last one)
_RESOLUTION_UNITS = {1: "none", 2: "inch", 3: "centimeter"}


class TiffPageBackend(SlideBackend):
    name = "tifffile"
    extensions = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".qptiff")

    def __init__(self, path: str, tf: Any, page: Any) -> None:
        w, h = int(page.imagewidth), int(page.imagelength)
        super().__init__(path, _properties(page), ((w, h),), (1.0,), vendor=None)
        self._tf, self._page = tf, page
        self._w, self._h = w, h
        self._spp = int(page.samplesperpixel)
        self._dtype = np.dtype(page.dtype)
        if page.is_tiled:
            self._cw, self._ch = int(page.tilewidth), int(page.tilelength)
        else:
            self._cw, self._ch = w, min(int(page.rowsperstrip or h), h)
        self._nx = -(-w // self._cw)
        self._offsets = [int(o) for o in page.dataoffsets]
        self._counts = [int(c) for c in page.databytecounts]
        self._raw = int(page.compression) == 1 and int(page.predictor or 1) == 1 and int(page.fillorder or 1) == 1
        self._colormap = page.colormap if int(page.photometric) == 3 else None
        self._decode = page.decode  # tifffile builds the decoder lazily: once here
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0

    @classmethod
    def open(cls, path: str) -> TiffPageBackend:
        import tifffile

        tf = tifffile.TiffFile(path)
        try:
            page = tf.series[0].keyframe if tf.series else tf.pages.first
            why = _unsupported(page)
            if why:
                raise ValueError(why)
            chunk = int(np.prod(page.chunks)) * np.dtype(page.dtype).itemsize
            if int(page.compression) != 1 and chunk > MAX_DECODE_BYTES:
                kind = "tile" if page.is_tiled else "strip"
                raise TooLargeToDecode(
                    f"one compressed {kind} of {page.imagewidth}x{min(page.chunks[0], page.imagelength)} px "
                    f"needs {mib(chunk)} decoded at once, over the {mib(MAX_DECODE_BYTES)} limit; "
                    "re-save it tiled (e.g. vips tiffsave --tile --pyramid)"
                )
            return cls(path, tf, page)
        except BaseException:
            tf.close()
            raise

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return paste_inside(x, y, w, h, self._w, self._h, self._read_inside)

    def fast_path_refusal(self, level: int) -> str | None:
        return None  # one plain TIFF page: the fast reader's own strip/tile decoding applies

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]
        self._tf.close()

    # -- reading ------------------------------------------------------------------------------
    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB of the image box [x0, x1) x [y0, y1), assembled chunk by chunk."""
        out = np.empty((y1 - y0, x1 - x0, self._spp), self._dtype)
        cw, ch = self._cw, self._ch
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                bx0, by0 = max(x0, cx * cw), max(y0, cy * ch)
                bx1, by1 = min(x1, (cx + 1) * cw), min(y1, (cy + 1) * ch)
                i = cy * self._nx + cx
                if self._raw:
                    part = self._raw_rows(i, cx * cw, cy * ch, bx0, by0, bx1, by1)
                else:
                    chunk = self._chunk(i)
                    part = chunk[by0 - cy * ch : by1 - cy * ch, bx0 - cx * cw : bx1 - cx * cw]
                out[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] = part
        if self._colormap is not None:
            return to_rgb(self._colormap[:, out[..., 0]].transpose(1, 2, 0))
        return to_rgb(out[..., 0] if self._spp == 1 else out)

    def _raw_rows(self, i: int, cx0: int, cy0: int, bx0: int, by0: int, bx1: int, by1: int) -> np.ndarray:
        """Uncompressed chunk i: read only the box rows (and, when narrow, only its columns)."""
        px = self._spp * self._dtype.itemsize
        row = self._cw * px  # bytes per chunk row
        base = self._offsets[i]
        n = by1 - by0
        if (bx1 - bx0) * 4 >= self._cw:  # wide box: one read of whole chunk rows
            data = self._pread(base + (by0 - cy0) * row, n * row, i)
            rows = np.frombuffer(data, self._dtype).reshape(n, self._cw, self._spp)
            return rows[:, bx0 - cx0 : bx1 - cx0]
        out = np.empty((n, bx1 - bx0, self._spp), self._dtype)
        for r in range(n):
            off = base + (by0 - cy0 + r) * row + (bx0 - cx0) * px
            out[r] = np.frombuffer(self._pread(off, (bx1 - bx0) * px, i), self._dtype).reshape(-1, self._spp)
        return out

    def _pread(self, offset: int, n: int, i: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise ValueError(f"strip/tile {i}: file truncated ({len(data)} of {n} bytes at {offset})")
        return data

    def _chunk(self, i: int) -> np.ndarray:
        """Decoded chunk i as (chunk height, chunk width, samples), white/zero-padded at edges."""
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
        n = self._counts[i] if i < len(self._counts) else 0
        full = np.zeros((self._ch, self._cw, self._spp), self._dtype)
        if n > 0:
            data = self._pread(self._offsets[i], n, i)
            arr = self._decode(data, i, jpegtables=self._page.jpegtables)[0]
            arr = np.asarray(arr).reshape(np.asarray(arr).shape[-3:])
            full[: arr.shape[0], : arr.shape[1]] = arr[: self._ch, : self._cw]
        else:  # sparse chunk: nothing scanned there
            full[:] = np.iinfo(self._dtype).max if self._dtype.kind == "u" else 0
        with self._lock:
            self._cache[i] = full
            self._cache_bytes += full.nbytes
            while self._cache_bytes > CHUNK_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return full


def _unsupported(page: Any) -> str | None:
    if page.is_tiled and int(getattr(page, "imagedepth", 1)) > 1:
        return "volumetric TIFF pages are not slides"
    if page.dtype is None or np.dtype(page.dtype).kind not in "u":
        return f"{page.bitspersample}-bit {page.sampleformat!r} samples are not supported"
    spp, planar, photometric = int(page.samplesperpixel), int(page.planarconfig), int(page.photometric)
    if spp > 1 and planar != 1:
        return "separate colour planes are not supported"
    if photometric not in (1, 2, 3, 6) or (photometric == 6 and int(page.compression) not in (7, 6)):
        return f"photometric {photometric} is not supported"
    if spp not in (1, 2, 3, 4):
        return f"{spp} samples per pixel are not supported"
    return None


def _properties(page: Any) -> dict[str, str]:
    props = {"tiff.ImageWidth": str(page.imagewidth), "tiff.ImageLength": str(page.imagelength)}
    for tag in ("XResolution", "YResolution"):
        t = page.tags.get(tag)
        if t is not None:
            num, den = t.value
            props[f"tiff.{tag}"] = str(num / den if den else 0)
    unit = page.tags.get("ResolutionUnit")
    if unit is not None:
        props["tiff.ResolutionUnit"] = _RESOLUTION_UNITS.get(int(unit.value), str(unit.value))
    return props
