"""Quality-control pictures: tissue mask, contours and patch grid over a picture of the slide.

Every overlay is drawn on a base image (the mask's thumbnail, or `read_overlay_base`: the slide
read at ~`max_side` px on its long side) and is at most `max_side` px on its long side, never
larger than that base: pictures are shrunk, never upscaled. Colours and line widths follow the
base: on a dark (fluorescence) background the lines are bright, and every line is drawn over a
dark or light halo so it stays visible on tissue of any colour.

Coordinates: polygons are in mask (thumbnail) pixels and need the mask's downsample when the base
has another resolution (`OverlayBase.contours`); grid coordinates are level-0 pixels.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from shapely.geometry import Polygon

if TYPE_CHECKING:
    from .slide import Slide

DEFAULT_MAX_SIDE = 2000
PREVIEW_SIDE = 1024  # the Dagster metadata preview: the same picture, smaller (it lives in the event log)
DARK_BACKGROUND = 60  # median brightest channel below this: a dark (fluorescence) picture

# (line, halo) colours, RGB, for light and dark backgrounds
CONTOUR = {False: ((0, 150, 0), (255, 255, 255)), True: ((80, 255, 80), (0, 0, 0))}
HOLE = {False: ((0, 60, 230), (255, 255, 255)), True: ((0, 200, 255), (0, 0, 0))}
GRID = {False: ((20, 20, 200), None), True: ((255, 215, 0), None)}
MASK_TINT = {False: (0, 200, 0), True: (0, 255, 120)}


def is_dark(rgb: np.ndarray) -> bool:
    """Dark background: the median of the per-pixel brightest channel is below DARK_BACKGROUND."""
    if rgb.size == 0:
        return False
    brightest = rgb.max(axis=2) if rgb.ndim == 3 else rgb
    step = max(1, int(np.sqrt(brightest.size / 250_000)))  # a subsample is plenty for a median
    return float(np.median(brightest[::step, ::step])) < DARK_BACKGROUND


def fit(img: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """A copy of `img` shrunk (area interpolation) to at most `max_side` px on its long side, and
    the scale applied (<= 1: never upscaled)."""
    if img.ndim == 2:
        img = np.dstack([img] * 3)
    if not max_side or max(img.shape[:2]) <= max_side:
        return np.ascontiguousarray(img[..., :3]).copy(), 1.0
    s = max_side / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
    return cv2.resize(np.ascontiguousarray(img[..., :3]), size, interpolation=cv2.INTER_AREA), s


def line_width(img: np.ndarray) -> int:
    """Contour width for a picture: 1 px up to ~700 px, then ~1 px per 700 px of long side."""
    return max(1, round(max(img.shape[:2]) / 700))


def _polyline(img: np.ndarray, pts: np.ndarray, colours: tuple, width: int) -> None:
    line, halo = colours
    if halo is not None:
        cv2.polylines(img, [pts], True, halo, width + 2, cv2.LINE_AA)
    cv2.polylines(img, [pts], True, line, width, cv2.LINE_AA)


def mask_overlay(
    thumb: np.ndarray, mask: np.ndarray, max_side: int | None = DEFAULT_MAX_SIDE, alpha: float = 0.4
) -> np.ndarray:
    """The mask as a translucent tint (mask resized to the picture: both cover the whole slide)."""
    img, _ = fit(thumb, max_side)
    dark = is_dark(img)
    m = cv2.resize(mask.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    tint = np.array(MASK_TINT[dark], np.float32)
    img[m] = ((1 - alpha) * img[m] + alpha * tint).astype(np.uint8)
    # the outline too, so the mask's edge reads even where the tint is faint
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    img[edge] = CONTOUR[dark][0]
    return img


def contour_overlay(
    thumb: np.ndarray,
    polygons: list[Polygon],
    max_side: int | None = DEFAULT_MAX_SIDE,
    thickness: int | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Tissue outlines (green) and holes (blue) over the picture.

    `scale` = picture px per polygon px (x, y) at the picture's full size, for polygons in mask
    pixels drawn on a base of another resolution (mask downsample / base downsample).
    """
    img, s = fit(thumb, max_side)
    dark = is_dark(img)
    width = thickness or line_width(img)
    sx, sy = scale[0] * s, scale[1] * s
    for p in polygons:
        ext = np.round(np.asarray(p.exterior.coords) * (sx, sy)).astype(np.int32)
        _polyline(img, ext, CONTOUR[dark], width)
        for h in p.interiors:
            _polyline(img, np.round(np.asarray(h.coords) * (sx, sy)).astype(np.int32), HOLE[dark], max(1, width - 1))
    return img


def grid_overlay(
    thumb: np.ndarray,
    coords: np.ndarray,
    size0: int,
    dx: float,
    dy: float,
    max_side: int | None = DEFAULT_MAX_SIDE,
    thickness: int | None = None,
) -> np.ndarray:
    """Patch outlines; (dx, dy) = level-0 px per picture px of `thumb` at its full size.

    Lines are 1 px while patches are small on the picture (so the grid does not hide the tissue),
    2 px once a patch spans 24 px or more; yellow on dark backgrounds, dark blue on light ones.
    """
    img, s = fit(thumb, max_side)
    dark = is_dark(img)
    colour = GRID[dark][0]
    side = size0 / max(dx, dy) * s
    width = thickness or (2 if side >= 24 else 1)
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    if len(c):
        x0 = np.round(c[:, 0] / dx * s).astype(np.int32)
        y0 = np.round(c[:, 1] / dy * s).astype(np.int32)
        x1 = np.round((c[:, 0] + size0) / dx * s).astype(np.int32)
        y1 = np.round((c[:, 1] + size0) / dy * s).astype(np.int32)
        for a, b, cc, d in zip(x0, y0, x1, y1, strict=True):
            cv2.rectangle(img, (int(a), int(b)), (int(cc), int(d)), colour, width)
    return img


@dataclass
class OverlayBase:
    """A picture of the whole slide and its downsample (level-0 px per picture px, x and y)."""

    rgb: np.ndarray
    downsample: tuple[float, float]

    def mask(self, mask: np.ndarray, max_side: int | None = DEFAULT_MAX_SIDE) -> np.ndarray:
        return mask_overlay(self.rgb, mask, max_side)

    def contours(
        self, polygons: list[Polygon], mask_downsample: tuple[float, float], max_side: int | None = DEFAULT_MAX_SIDE
    ) -> np.ndarray:
        scale = (mask_downsample[0] / self.downsample[0], mask_downsample[1] / self.downsample[1])
        return contour_overlay(self.rgb, polygons, max_side, scale=scale)

    def grid(self, coords: np.ndarray, size0: int, max_side: int | None = DEFAULT_MAX_SIDE) -> np.ndarray:
        return grid_overlay(self.rgb, coords, size0, self.downsample[0], self.downsample[1], max_side)


def read_overlay_base(slide: Slide, max_side: int = DEFAULT_MAX_SIDE) -> OverlayBase:
    """The whole slide at ~`max_side` px on its long side, never finer than level 0.

    Read like the mask's thumbnail (`Slide.read_thumbnail`: best pyramid level, in strips), so
    memory stays bounded whatever the slide size. Slides without an MPP are read from the best
    level directly (one region, then shrunk).
    """
    info = slide.info
    ds = max(1.0, max(info.width, info.height) / max(1, max_side))
    if info.mpp:
        rgb, dx, dy = slide.read_thumbnail(ds * info.mpp)
        return OverlayBase(rgb, (dx, dy))
    level = slide.best_level_for_downsample(ds)
    lw, lh = info.level_dimensions[level]
    region = slide.read_region((0, 0), level, (lw, lh))
    tw, th = max(1, round(info.width / ds)), max(1, round(info.height / ds))
    if (tw, th) != (lw, lh):
        region = cv2.resize(region, (tw, th), interpolation=cv2.INTER_AREA)
    return OverlayBase(region, (info.width / tw, info.height / th))


def overlay_base(
    slide: Slide | None, thumbnail: np.ndarray | None, downsample: tuple[float, float], max_side: int
) -> OverlayBase | None:
    """The mask's thumbnail when it is large enough (or as fine as the slide), else the slide read
    at `max_side` (cheap then: the slide is small). None when there is nothing to draw on."""
    if thumbnail is not None and (max(thumbnail.shape[:2]) >= max_side or max(downsample) <= 1.0 or slide is None):
        return OverlayBase(thumbnail, downsample)
    return read_overlay_base(slide, max_side) if slide is not None else None


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def jpeg_bytes(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG: ~10x smaller than PNG for slide pictures (metadata previews)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def markdown_image(data: bytes, alt: str = "preview", mime: str | None = None) -> str:
    """Markdown showing the image inline (a data URI), e.g. for Dagster `MetadataValue.md`."""
    mime = mime or ("image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg")
    return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"
