"""What absorbs light on a slide but is not tissue: marker ink (hue rules) and colourless matter.

Both work on optical density relative to the glass (`glass.py`), so the glass tint and the light
level do not move them, and both are decided per region, not per pixel:

* ink, as HistoQC-style hue rules on the tint-corrected colour: blue and green markers are
  saturated colours few stains have (hematoxylin is violet-blue and weaker, the IHC counterstain
  pale blue), red marker is more saturated and redder than eosin, DAB and AEC. A rule hit seeds a
  region that grows into the stroke's lighter rim and into crossings with other strokes; the
  region is ink when it is smooth (ink has no texture at ~8 µm/px, tissue has) and lies on glass;
* colourless ("neutral") matter absorbs all channels alike, unlike stains: black ink, dark slide
  and cover-slip edges, dust, bubble rims, labels. Colourless pixels (chroma = max − min of the
  three ODs below `neutral_ratio` × density) count when their region lies on glass: inside tissue,
  brown DAB next to blue hematoxylin also averages to grey.

Known limits: a green-counterstained or blue-stained tissue piece that is also smooth (no visible
texture at the mask's resolution) reads as ink; a silver stain or melanin lying alone on glass
reads as colourless matter; set `ink=False` / `neutral_ratio=0` for such slides.
"""

from __future__ import annotations

import cv2
import numpy as np

from .glass import local_std

# (hue range in degrees, min saturation, min density) of strong ink; weak = grown region
INK_RULES: dict[str, tuple[tuple[float, float], float, float]] = {
    "blue": ((195.0, 240.0), 0.45, 0.45),
    "green": ((70.0, 190.0), 0.25, 0.25),
    "red": ((335.0, 375.0), 0.50, 0.60),  # wraps through 0°
}
WEAK_FACTOR = 0.6  # the rim of a stroke: same hue, lower saturation and density ...
RIM_UM = 24.0  # ... within this distance of the strong ink
INK_GLASS_AROUND = 0.4  # ink lies on glass: a same-hue region ringed by tissue is a stain
NEUTRAL_GLASS_AROUND = 0.6  # colourless matter lies on glass; grey spots inside tissue are tissue
MAX_ROUGHNESS = 0.08  # ink is smooth: local std / density of most of its pixels is below this
INK_MARGIN_UM = 8.0  # removed around ink, where the thumbnail mixes ink and glass
NEUTRAL_MIN_DENSITY = 0.05  # below this, chroma is mostly noise


def hue_saturation(od: list[np.ndarray], rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Hue (uint8, 0-255 for 0-360°) and HSV saturation (uint8, 0-255) of the tint-corrected
    colour exp(-OD), from OD planes (computed in strips of `rows`, for memory)."""
    h, w = od[0].shape
    hue = np.empty((h, w), np.uint8)
    sat = np.empty((h, w), np.uint8)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        t8 = [cv2.convertScaleAbs(cv2.exp(-np.maximum(p[y0:y1], 0.0)), alpha=255.0) for p in od]
        hsv = cv2.cvtColor(cv2.merge(t8), cv2.COLOR_RGB2HSV_FULL)
        hue[y0:y1] = hsv[..., 0]
        sat[y0:y1] = hsv[..., 1]
    return hue, sat


def _in_hue(hue8: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Hue within [lo, hi] degrees (hi > 360 wraps through 0), on the 0-255 hue scale."""
    a, b = int(np.floor(lo * 256 / 360)), int(np.ceil(hi * 256 / 360))
    if b > 255:
        return (hue8 >= a) | (hue8 <= b - 256)
    return (hue8 >= a) & (hue8 <= b)


def _disk(radius_um: float, thumb_mpp: float) -> np.ndarray:
    k = 2 * max(1, int(round(radius_um / max(thumb_mpp, 1e-6)))) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def ink_mask(
    hue: np.ndarray, sat: np.ndarray, dmax: np.ndarray, thumb_mpp: float, not_tissue: np.ndarray
) -> np.ndarray:
    """Bool mask of marker ink (blue, green, red; black is colourless matter), from the hue and
    saturation of the tint-corrected colour (`hue_saturation`) and the density.

    A region of ink colour is ink only when it also looks like ink: smooth (most of its pixels'
    3x3 std of density below MAX_ROUGHNESS x density; tissue has nuclei, fibres and gaps) and lying
    on glass (at least INK_GLASS_AROUND of the pixels around it are `not_tissue`). So a
    blue-stained tissue piece (alcian, toluidine, Giemsa) or trichrome's blue collagen inside
    tissue stays tissue, while a stroke crossing a tissue piece is ink.
    """
    sd = local_std(dmax, 3)
    thr = np.maximum(dmax, np.float32(1e-3))
    thr *= np.float32(MAX_ROUGHNESS)
    smooth = sd < thr
    del sd, thr
    candidates = np.zeros(dmax.shape, bool)
    rim = _disk(RIM_UM, thumb_mpp)
    for (lo, hi), min_sat, min_od in INK_RULES.values():
        in_hue = _in_hue(hue, lo, hi)
        strong = in_hue & (sat >= round(255 * min_sat)) & (dmax >= min_od)
        if not strong.any():
            continue
        near = cv2.dilate(strong.view(np.uint8), rim).view(bool)
        rim_px = in_hue & (sat >= round(255 * min_sat * WEAK_FACTOR)) & (dmax >= min_od * WEAK_FACTOR) & near
        # where strokes cross, the colours mix (blue + red reads violet): dense smooth pixels
        # connected to the stroke are ink too (tissue is rarely smooth over more than a pixel)
        candidates |= grow(strong, rim_px | (smooth & (dmax >= min_od)) | strong)
    if not candidates.any():
        return candidates
    out = regions_on_glass(candidates, not_tissue, INK_GLASS_AROUND, smooth)
    if out.any():
        out = cv2.dilate(out.view(np.uint8), _disk(INK_MARGIN_UM, thumb_mpp)).view(bool)
    return out


def neutral_mask(
    dmax: np.ndarray,
    chroma: np.ndarray,
    ratio: float,
    noise: float,
    glass_like: np.ndarray,
    chroma_noise: float = 0.0,
) -> np.ndarray:
    """Bool mask of colourless absorbing matter lying on glass.

    Pixels whose chroma is below `ratio` x density (+ the glass's own chroma noise) are colourless; single pixels inside
    tissue can be too (brown DAB next to blue hematoxylin averages to grey), so a colourless
    region counts only when at least NEUTRAL_GLASS_AROUND of the pixels around it are glass (or
    colourless themselves): dust, bubble rims, dark edges, labels and black strokes are.
    """
    if ratio <= 0:
        return np.zeros(dmax.shape, bool)
    floor = max(NEUTRAL_MIN_DENSITY, 4.0 * noise)
    thr = dmax * np.float32(ratio)
    thr += np.float32(max(2.0 * noise, chroma_noise))
    colourless = (chroma < thr) & (dmax > floor)
    del thr
    if not colourless.any():
        return colourless
    return regions_on_glass(colourless, glass_like | colourless, NEUTRAL_GLASS_AROUND)


def regions_on_glass(
    regions: np.ndarray, not_tissue: np.ndarray, min_share: float, smooth: np.ndarray | None = None
) -> np.ndarray:
    """The components of `regions` ringed by at least `min_share` of `not_tissue` pixels (and,
    given `smooth`, with at least half of their pixels smooth)."""
    n, labels = cv2.connectedComponents(regions.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if n <= 1:
        return regions.astype(bool)
    # a ring 2-4 px out: the pixels right at the edge mix the region and its surroundings
    r8 = regions.view(np.uint8)
    ring = cv2.dilate(r8, np.ones((9, 9), np.uint8)) > cv2.dilate(r8, np.ones((3, 3), np.uint8))
    # each ring pixel belongs to a nearby component (the largest label within 4 px)
    lab = labels.astype(np.uint16) if n < 65536 else labels.astype(np.float32)
    owner = cv2.dilate(lab, np.ones((9, 9), np.uint8))[ring].astype(np.int64)
    total = np.bincount(owner, minlength=n)
    free = np.bincount(owner[not_tissue[ring]], minlength=n)
    keep = free >= min_share * np.maximum(total, 1)
    if smooth is not None:
        flat = labels.ravel()
        size = np.bincount(flat, minlength=n)
        keep &= np.bincount(flat[smooth.ravel()], minlength=n) >= 0.5 * size
    keep[0] = False
    return keep[labels]


def grow(seeds: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Connected components of `region` (8-connected) that contain at least one seed pixel."""
    if not seeds.any():
        return np.zeros(region.shape, bool)
    n, labels = cv2.connectedComponents(region.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    keep = np.bincount(labels[seeds], minlength=n) > 0
    keep[0] = False
    return keep[labels]
