"""Plain images (PNG, JPEG, ...; plain TIFF as a last resort): one level, decoded once into memory."""

from __future__ import annotations

import numpy as np

from .base import SlideBackend, paste_inside, to_rgb

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


def _load(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # plain scans can be large; we read them once
    try:
        with Image.open(path) as im:
            im.seek(0)
            return to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("P", "LA", "PA") else im))
    except Exception:
        import tifffile

        return to_rgb(np.asarray(tifffile.imread(path, key=0)))
