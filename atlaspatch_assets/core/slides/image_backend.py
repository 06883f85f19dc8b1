"""Plain images (PNG, JPEG, ...; plain TIFF as a last resort): one level, decoded once into memory.

PNG/JPEG cannot be decoded piecewise here, so an image whose decoded size exceeds
`MAX_DECODE_BYTES` is refused (from its header, before decoding) instead of exhausting RAM.
"""

from __future__ import annotations

import numpy as np

from .base import MAX_DECODE_BYTES, SlideBackend, TooLargeToDecode, mib, paste_inside, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


class ImageBackend(SlideBackend):
    name = "image"
    extensions = IMAGE_EXTENSIONS + (".tif", ".tiff")

    def __init__(self, path: str, rgb: np.ndarray) -> None:
        super().__init__(path, {}, ((rgb.shape[1], rgb.shape[0]),), (1.0,), vendor="image")
        self.rgb = rgb

    @classmethod
    def open(cls, path: str) -> ImageBackend:
        return cls(path, _load(path))

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        H, W = self.rgb.shape[:2]
        return paste_inside(x, y, w, h, W, H, lambda x0, y0, x1, y1: self.rgb[y0:y1, x0:x1])


def _check_size(w: int, h: int, bytes_per_px: int) -> None:
    need = int(w) * int(h) * max(3, bytes_per_px)
    if need > MAX_DECODE_BYTES:
        raise TooLargeToDecode(
            f"image of {w}x{h} px needs {mib(need)} decoded at once, over the {mib(MAX_DECODE_BYTES)} limit; "
            "convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
        )


def _load(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the size is checked against MAX_DECODE_BYTES instead
    try:
        with Image.open(path) as im:
            im.seek(0)
            _check_size(im.width, im.height, 4 if im.mode in ("P", "LA", "PA") else len(im.getbands()))
            return to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("P", "LA", "PA") else im))
    except TooLargeToDecode:
        raise
    except Exception:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            _check_size(page.imagewidth, page.imagelength, page.samplesperpixel * np.dtype(page.dtype).itemsize)
            return to_rgb(np.asarray(page.asarray()))
