"""Thumbnail overlays: tissue mask, contours and patch grid (PNG bytes or arrays)."""

from __future__ import annotations

import cv2
import numpy as np
from shapely.geometry import Polygon


def _fit(img: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    if not max_side or max(img.shape[:2]) <= max_side:
        return img.copy(), 1.0
    s = max_side / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA), s


def mask_overlay(thumb: np.ndarray, mask: np.ndarray, max_side: int | None = None) -> np.ndarray:
    img, _ = _fit(thumb, max_side)
    m = cv2.resize(mask.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    tint = np.zeros_like(img)
    tint[..., 1] = 255
    sel = m.astype(bool)
    img[sel] = (0.6 * img[sel] + 0.4 * tint[sel]).astype(np.uint8)
    return img


def contour_overlay(
    thumb: np.ndarray, polygons: list[Polygon], max_side: int | None = None, thickness: int = 2
) -> np.ndarray:
    img, s = _fit(thumb, max_side)
    for p in polygons:
        ext = np.round(np.asarray(p.exterior.coords) * s).astype(np.int32)
        cv2.polylines(img, [ext], True, (0, 160, 0), thickness)
        for h in p.interiors:
            cv2.polylines(img, [np.round(np.asarray(h.coords) * s).astype(np.int32)], True, (0, 0, 255), 1)
    return img


def grid_overlay(
    thumb: np.ndarray, coords: np.ndarray, size0: int, dx: float, dy: float, max_side: int | None = None
) -> np.ndarray:
    img, s = _fit(thumb, max_side)
    for x, y in coords:
        p0 = (int(x / dx * s), int(y / dy * s))
        p1 = (int((x + size0) / dx * s), int((y + size0) / dy * s))
        cv2.rectangle(img, p0, p1, (30, 30, 220), 1)
    return img


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
