"""Reference patch reading: box at the read level, area-resized to the target size."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from .geometry import PatchGeometry
from .slide import Slide


def read_patch(slide: Slide, g: PatchGeometry, x: int, y: int) -> np.ndarray:
    """RGB uint8 (patch_size, patch_size, 3) for the patch whose level-0 top-left is (x, y)."""
    box = slide.read_region((x, y), g.read_level, (g.read_size, g.read_size))
    if g.read_size == g.patch_size:
        return box
    return cv2.resize(box, (g.patch_size, g.patch_size), interpolation=cv2.INTER_AREA)


def read_patches(
    slide: Slide, g: PatchGeometry, coords: np.ndarray, workers: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, patch) in coordinate order, read by `workers` threads (bounded look-ahead)."""
    if workers <= 1:
        for i, (x, y) in enumerate(coords):
            yield i, read_patch(slide, g, int(x), int(y))
        return
    window = workers * 4
    with ThreadPoolExecutor(workers) as pool:
        futures = []
        for i, (x, y) in enumerate(coords):
            futures.append(pool.submit(read_patch, slide, g, int(x), int(y)))
            if len(futures) >= window:
                j = i - len(futures) + 1
                yield j, futures.pop(0).result()
        start = len(coords) - len(futures)
        for k, f in enumerate(futures):
            yield start + k, f.result()
