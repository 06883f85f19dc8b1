"""tiffslide: TIFF variants OpenSlide rejects or misreads (OME-TIFF, QPTIFF, plain/stripped TIFF ...)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import SlideBackend, mib, to_rgb

# tiffslide decodes every strip/tile a read touches, each time: above this size per chunk
# (typically a plain TIFF stored as one huge strip) the tifffile page backend reads it instead.
MAX_CHUNK_BYTES = 64 << 20


class TiffSlideBackend(SlideBackend):
    name = "tiffslide"
    extensions = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".qptiff")

    def __init__(self, path: str, handle: Any) -> None:
        props = {k: str(v) for k, v in handle.properties.items() if v is not None}
        super().__init__(
            path,
            props,
            tuple(handle.level_dimensions),
            tuple(float(d) for d in handle.level_downsamples),
            vendor=props.get("tiffslide.vendor"),
        )
        self._h = handle

    @classmethod
    def open(cls, path: str) -> TiffSlideBackend:
        import tiffslide

        h = tiffslide.TiffSlide(path)
        try:
            _check_chunks(h)
        except BaseException:
            h.close()
            raise
        return cls(path, h)

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """tiffslide pads outside the image with black: read the inside only, pad with white."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = x / ds, y / ds
        x0, y0 = max(0, int(np.ceil(-lx))), max(0, int(np.ceil(-ly)))  # first inside column/row
        x1, y1 = min(w, int(np.floor(lw - lx))), min(h, int(np.floor(lh - ly)))
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            loc = (x + round(x0 * ds), y + round(y0 * ds))
            arr = np.asarray(self._h.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True))
            out[y0:y1, x0:x1] = to_rgb(arr)
        return out

    def fast_path_refusal(self, level: int) -> str | None:
        # Above level 0 tiffslide's levels may be SubIFDs or per-channel pages that the fast
        # reader's match by page size could confuse.
        if self.level_downsamples[level] == 1.0:
            return None
        return "tiffslide slide above level 0 is read through read_region"

    def close(self) -> None:
        self._h.close()


def _check_chunks(h: Any) -> None:
    series = h.ts_tifffile.series[int(h.properties.get("tiffslide.series-index") or 0)]
    for level in series.levels:
        page = level.keyframe
        n = int(np.prod(page.chunks)) * np.dtype(page.dtype).itemsize
        if n > MAX_CHUNK_BYTES:
            raise ValueError(
                f"a {'tile' if page.is_tiled else 'strip'} of {mib(n)} would be decoded on every read "
                f"(over {mib(MAX_CHUNK_BYTES)}); left to the bounded tifffile reader"
            )
