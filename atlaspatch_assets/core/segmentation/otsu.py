"""Classical tissue detection (no weights): optical density against the glass, ink and artifact rules.

Brightfield, for any stain (the method keeps the name `otsu`: Otsu picks the seed threshold):

1. the glass is modelled (`glass.py`: tint, illumination field, noise) and every pixel becomes
   optical density relative to it, per channel;
2. ink (hue rules) and colourless matter (dark edges, dust, bubble rims, labels, black ink) are
   set aside (`artifacts.py`);
3. the density left (max over channels: DAB, eosin, pale hematoxylin all count) is thresholded by
   hysteresis: a pixel is tissue when it is above the low threshold (a multiple of the glass noise,
   at least `min_density`) and connected to pixels above the high one (Otsu's threshold of the
   density, kept between 2x the low one and 0.15). Faint but textured tissue (fat: thin
   membranes around empty cells) is added where faint pixels are dense, and holes whose inside
   is textured that way are filled;
4. edge pixels below half the nearby tissue density (only partly tissue) are dropped, then a
   morphological closing (`close_um`); the area filters and hole filling follow in
   `TissueMask.from_raw`.

When the thumbnail shows no credible glass (all tissue, almost black, one flat colour), density
is measured against a standard white and a warning is logged.

Fluorescence slides (dark background, detected or given as `modality`) use the brightest
channel instead: tissue is where the signal density is, above Otsu's threshold in log space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from .artifacts import grow, hue_saturation, ink_mask, neutral_mask
from .base import SegmentationParams
from .glass import Glass, estimate_glass, local_std, log_planes
from .modality import resolve_modality

log = logging.getLogger("atlaspatch")

FLUORESCENCE_FLOOR = 8  # brightest-channel value below which a fluorescence pixel is background
NOISE_FACTOR = 5.0  # low threshold = this many glass-noise deviations (at least min_density)
MAX_HIGH = 0.15  # the high (seed) threshold never exceeds this density
TEXTURE_UM = 72.0  # window of the weak-pixel density (a few fat cells)
TEXTURE_DENSITY = 0.15  # share of faint pixels (half the low threshold to FAINT_MAX) that makes it tissue
FAINT_MAX = 0.2  # denser pixels are tissue by themselves, not texture
HOLE_TEXTURE = 0.1  # a hole with at least this share of faint pixels inside is tissue (fat)


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


@dataclass
class Layers:
    """Per-pixel maps of a brightfield thumbnail (all (h, w), at thumbnail resolution)."""

    glass: Glass
    density: np.ndarray  # float32: max over channels of OD relative to the glass
    ink: np.ndarray  # bool
    neutral: np.ndarray  # bool


def brightfield_layers(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> Layers:
    """Glass model, density, ink and colourless-matter masks of an RGB uint8 thumbnail.

    Memory: the three OD planes plus ~3 planes of work at a time (float32, thumbnail size).
    """
    od = log_planes(thumb)
    glass = estimate_glass(od, thumb_mpp)
    for c in range(3):  # OD per channel, in place over the log planes
        cv2.subtract(glass.plane(c), od[c], dst=od[c])
    density = cv2.max(od[0], od[1])
    cv2.max(density, od[2], dst=density)
    chroma = cv2.min(od[0], od[1])
    cv2.min(chroma, od[2], dst=chroma)
    cv2.subtract(density, chroma, dst=chroma)  # max - min over channels
    glass_like = density < max(params.min_density, NOISE_FACTOR * glass.noise)
    neutral = neutral_mask(density, chroma, params.neutral_ratio, glass.noise, glass_like, glass.chroma_noise)
    del chroma
    if params.ink:
        hue, sat = hue_saturation(od)
        del od
        ink = ink_mask(hue, sat, density, thumb_mpp, glass_like | neutral)
    else:
        ink = np.zeros(density.shape, bool)
    return Layers(glass, density, ink, neutral)


def segment_otsu(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail; kernel sizes are physical (µm)."""
    if thumb.size == 0:
        return np.zeros(thumb.shape[:2], bool)
    if thumb.ndim == 2:
        thumb = np.dstack([thumb] * 3)
    if resolve_modality(thumb, params.modality) == "fluorescence":
        return _close(_fluorescence(thumb, thumb_mpp, params), thumb_mpp, params)
    return _close(_brightfield(thumb, thumb_mpp, params), thumb_mpp, params)


def _brightfield(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    lay = brightfield_layers(thumb, thumb_mpp, params)
    if not lay.glass.credible:
        log.warning(
            "tissue mask: no glass found on the thumbnail (all tissue, dark or one flat colour); "
            "density measured against a standard white"
        )
    score = lay.density  # reused in place: ink and colourless matter have no tissue density
    score[lay.ink | lay.neutral] = 0.0
    low = max(params.min_density, NOISE_FACTOR * lay.glass.noise)
    seeds = cv2.GaussianBlur(score, (0, 0), 0.7)  # seeds from a slightly smoothed density (noise)
    high = min(max(2.0 * low, _otsu(seeds)), max(MAX_HIGH, 2.0 * low))
    strong = seeds > high
    del seeds
    weak = score > low
    # faint texture: a little density that stands out from its 3x3 neighbourhood (membranes, fibres),
    # not an even veil (glass a little darker here, stitching stripes, mountant)
    textured = (score > 0.5 * low) & (local_std(score, 3) > 0.25 * low)
    k = _odd(TEXTURE_UM / thumb_mpp)
    if k >= 3:
        # only faint pixels count (not dense tissue): so the thin band of partly covered pixels and
        # JPEG ringing along a tissue edge is not dense over a whole window, a fat lobule is
        faint = (textured & (score < FAINT_MAX)).view(np.uint8)
        count = cv2.boxFilter(faint, cv2.CV_16U, (k, k), normalize=False)  # faint pixels per window
        dense = (count >= TEXTURE_DENSITY * k * k).view(np.uint8)
        del faint, count
        # the window reaches k/2 beyond a dense region: erode that back
        dense = cv2.erode(dense, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool)
        weak |= dense & ~(lay.ink | lay.neutral)
    mask = grow(strong, weak)
    del strong, weak
    mask = _refine_edges(mask, score)
    return _fill_textured_holes(mask, textured)


def _fill_textured_holes(mask: np.ndarray, faint: np.ndarray, rim: int = 3) -> np.ndarray:
    """Fill holes whose inside (away from their rim) has faint density in at least HOLE_TEXTURE of
    its pixels: a fat lobule inside tissue (thin membranes), not a lumen or glass (nothing)."""
    n, labels = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if n <= 2:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    k = 2 * rim + 1
    inside = cv2.erode((~mask).view(np.uint8), np.ones((k, k), np.uint8)).view(bool)
    total = np.bincount(labels[inside], minlength=n)
    textured = np.bincount(labels[inside & faint], minlength=n)
    fill = (total > 0) & (textured >= HOLE_TEXTURE * np.maximum(total, 1))
    fill[border] = False
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels] if fill.any() else mask


def _refine_edges(mask: np.ndarray, score: np.ndarray, passes: int = 2) -> np.ndarray:
    """Drop edge pixels whose density is below half the tissue's nearby (interior) density, or
    that have no interior pixel within 3 px.

    The low threshold also takes pixels only partly covered by tissue; a pixel is tissue when
    most of it is, i.e. when its density reaches half of what full cover gives nearby.
    """
    m = mask.astype(np.uint8)
    if not m.any():
        return mask
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for _ in range(passes):
        inner = cv2.erode(m, cross)
        edge = (m > 0) & (inner == 0)
        if not edge.any():
            break
        # mean density of the interior pixels around each edge pixel (box sums, compared at the
        # edge pixels only)
        num = cv2.boxFilter(np.where(inner > 0, score, np.float32(0.0)), -1, (7, 7), normalize=False)
        den = cv2.boxFilter(inner, cv2.CV_32F, (7, 7), normalize=False)
        ys, xs = np.nonzero(edge)
        d = den[ys, xs]
        # no interior pixel nearby (a strand 1-2 px wide, below the mask's resolution): dropped too
        low_px = (d == 0) | (score[ys, xs] * d < 0.5 * num[ys, xs])
        del num, den
        drop = np.zeros_like(edge)
        drop[ys[low_px], xs[low_px]] = True
        if not drop.any():
            break
        m[drop] = 0
    return m.astype(bool)


def _otsu(score: np.ndarray) -> float:
    """Otsu's threshold of the density (0-1 mapped to 0-255)."""
    s8 = np.clip(score * 255.0, 0, 255).astype(np.uint8)
    if int(s8.max()) - int(s8.min()) < 2:
        return MAX_HIGH
    t, _ = cv2.threshold(s8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _fluorescence(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    """Signal density (brightest channel, box mean over `median_blur_um`) above Otsu's threshold
    in log space, never below FLUORESCENCE_FLOOR.

    A mean, not a median: in nuclear stains (DAPI) tissue is sparse bright dots on black, and
    their local density, not the typical pixel, tells tissue from background. The log spreads
    the dim tissue signal away from the near-zero background before Otsu.
    """
    signal = (thumb.max(axis=2) if thumb.ndim == 3 else thumb).astype(np.float32)
    k = min(_odd(params.median_blur_um / thumb_mpp), 255)
    density = cv2.blur(signal, (k, k))
    scale = np.log1p(255.0)
    log8 = np.clip(np.log1p(density) / scale * 255.0, 0, 255).astype(np.uint8)
    if int(log8.max()) - int(log8.min()) < 2:
        return (density > FLUORESCENCE_FLOOR).astype(np.uint8)
    t, _ = cv2.threshold(log8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(np.expm1(t / 255.0 * scale)), FLUORESCENCE_FLOOR)
    return (density > threshold).astype(np.uint8)


def _close(mask: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    k = _odd(params.close_um / thumb_mpp)
    mask = mask.astype(np.uint8)
    if k > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return mask.astype(bool)
