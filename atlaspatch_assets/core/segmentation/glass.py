"""The glass (empty slide) of a brightfield thumbnail: its colour, its illumination field, its noise.

Transmitted light: a pixel is I = L(x, y) · T, with L the light through empty glass (the scanner's
illumination times the glass and mountant tint) and T the transmittance of what lies on it, so
optical density relative to the glass, OD = log L − log I, is what a stain adds, whatever the
brightness, tint or unevenness of the light. L is estimated here:

1. candidates: smooth pixels (glass has no texture at ~8 µm/px) of roughly the brightest smooth
   colour (the glass tint), not much darker than it;
2. the candidates are averaged on a grid of cells (~128 µm), and a smooth surface (2-D quadratic
   in log space) is fitted to the cells by asymmetric reweighted least squares: tissue only
   darkens, so cells far below the surface get almost no weight; each channel gets its own
   surface on the cells kept, so a tint that drifts across the slide is followed. Steps 1-2 run
   twice, the second time with candidates colourless relative to the first light;
3. the residuals of the cells kept are smoothed (normalized convolution, ~0.5 mm) and added back,
   for illumination the quadratic does not follow (stitching, mottle), at most ±3 %.

When no credible glass is found (slide all tissue, almost black, one flat colour), the light is a
standard white (`DEFAULT_GLASS`) and `credible` is False (the caller warns).

Planes are per channel, (h, w) float32, so every step is an OpenCV call over contiguous memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_GLASS = 240.0  # typical brightfield glass, when the slide shows none
SMOOTH_LOG = 0.03  # max local std (log units, 3x3) of a glass pixel: ~3 % at 8 µm/px
COLOURLESS_LOG = 0.04  # max chroma (max − min of log RGB, light removed) of a glass pixel
LOOSE_COLOUR_LOG = 0.15  # first pass: max chroma against the brightest smooth colour
MAX_GLASS_CHROMA = 0.18  # a brightest colour more coloured than this is not glass (e.g. pink)
MIN_GLASS_LEVEL = float(np.log(96.0))  # darker than this is not glass (almost black slide)
CELL_UM = 128.0
RESIDUAL_UM = 500.0
MAX_RESIDUAL = 0.03
STATS_SAMPLE = 400_000  # pixels enough for the robust statistics (percentiles, medians)
HALF_RES_PIXELS = 1_500_000  # thumbnails larger than this are modelled at half resolution

LOG_LUT = np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0)).astype(np.float32)


def log_planes(rgb: np.ndarray) -> list[np.ndarray]:
    """Natural log of max(I, 1) for each channel of an RGB uint8 image, as (h, w) float32 planes."""
    return [LOG_LUT[np.ascontiguousarray(rgb[..., c])] for c in range(3)]


def local_std(img: np.ndarray, k: int = 3) -> np.ndarray:
    """Standard deviation over a k x k box (float32), with two planes of working memory."""
    m = cv2.blur(img, (k, k))
    var = cv2.sqrBoxFilter(img, -1, (k, k))  # box mean of the squares
    cv2.subtract(var, cv2.multiply(m, m, dst=m), dst=var)
    del m
    np.maximum(var, 0.0, out=var)
    return cv2.sqrt(var, dst=var)


@dataclass
class Glass:
    """The glass light as a coarse log field per channel (upsampled on demand), tint, noise."""

    coarse: np.ndarray  # (gh, gw, 3) float32 log light at cell centres
    shape: tuple[int, int]  # (h, w) of the thumbnail
    log_tint: np.ndarray  # (3,) log RGB of the brightest smooth colour (or DEFAULT_GLASS)
    noise: float  # robust std of the glass pixels' log luminance around the field
    credible: bool
    fraction: float  # share of the thumbnail taken as glass candidates
    candidates: np.ndarray | None = None  # bool glass candidates while estimating (then dropped)
    chroma_noise: float = 0.0  # 90th percentile of the glass pixels' chroma against the light

    def plane(self, c: int) -> np.ndarray:
        """Full-resolution (h, w) float32 log light of channel c."""
        h, w = self.shape
        return cv2.resize(np.ascontiguousarray(self.coarse[..., c]), (w, h), interpolation=cv2.INTER_LINEAR)


def estimate_glass(planes: list[np.ndarray], thumb_mpp: float) -> Glass:
    """Glass model of a thumbnail given as log planes (`log_planes`).

    Big thumbnails are modelled at half resolution (the light is smooth; memory and time drop
    4x); the noise is measured on full-resolution pixels.
    """
    h, w = planes[0].shape
    f = 2 if h * w > HALF_RES_PIXELS else 1
    work = [cv2.resize(p, (w // f, h // f), interpolation=cv2.INTER_AREA) for p in planes] if f > 1 else planes
    glass = _estimate(work, thumb_mpp * f)
    glass.shape = (h, w)
    if glass.credible:
        glass.noise = _pixel_noise(planes, glass, f)
    return glass


def _estimate(planes: list[np.ndarray], mpp: float) -> Glass:
    h, w = planes[0].shape
    lum = (planes[0] + planes[1] + planes[2]) * np.float32(1.0 / 3.0)
    smooth = local_std(lum) < SMOOTH_LOG
    tint, credible = np.full(3, np.log(DEFAULT_GLASS), np.float32), False
    step = max(1, int(np.sqrt(h * w / STATS_SAMPLE)))  # statistics on a regular subsample
    sub_smooth, sub_lum = smooth[::step, ::step], lum[::step, ::step]
    if int(np.count_nonzero(sub_smooth)) >= 16:
        level = float(np.percentile(sub_lum[sub_smooth], 90))
        near = sub_smooth & (sub_lum >= level - 0.05)
        cand_tint = np.array([np.median(p[::step, ::step][near]) for p in planes], np.float32)
        if float(cand_tint.max() - cand_tint.min()) <= MAX_GLASS_CHROMA and float(cand_tint.mean()) >= MIN_GLASS_LEVEL:
            tint, credible = cand_tint, True
    if not credible:
        return Glass(np.broadcast_to(tint, (1, 1, 3)).copy(), (h, w), tint, 0.0, False, 0.0)
    # pass 1: smooth pixels roughly of the glass's colour; pass 2: colourless relative to the light
    # fitted in pass 1 (so a tint that drifts across the slide stays glass), then the final fit
    cand = smooth & (_chroma(planes, tint) < LOOSE_COLOUR_LOG) & (lum > float(tint.mean()) - 0.6)
    glass = _fit(planes, cand, mpp, tint)
    light = [glass.plane(c) for c in range(3)]
    cand = smooth & (_chroma(planes, light) < COLOURLESS_LOG)
    darker = (light[0] + light[1] + light[2]) * np.float32(1.0 / 3.0)
    cand &= lum > darker - 0.6
    del light, darker, smooth
    glass = _fit(planes, cand, mpp, tint)
    glass.fraction = float(np.count_nonzero(cand)) / cand.size
    glass.candidates = cand
    return glass


def _chroma(planes: list[np.ndarray], ref: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """max - min over channels of log I - ref (ref: a tint per channel or a light plane per
    channel), one channel at a time (no 3-plane temporary)."""
    hi = planes[0] - ref[0]
    lo = hi.copy()
    for p, r in zip(planes[1:], ref[1:], strict=True):
        rel = p - r
        cv2.max(hi, rel, dst=hi)
        cv2.min(lo, rel, dst=lo)
    return cv2.subtract(hi, lo, dst=hi)


def _pixel_noise(planes: list[np.ndarray], glass: Glass, f: int) -> float:
    """Robust per-pixel noise of the glass: MAD of horizontal neighbour differences of the log
    luminance over glass candidates (on a row subsample), / sqrt(2). No field needed."""
    cand = glass.candidates
    h, w = planes[0].shape
    rows = np.arange(0, h, max(1, int(h * w / STATS_SAMPLE)))  # ~STATS_SAMPLE pixels
    lum = (planes[0][rows] + planes[1][rows] + planes[2][rows]) * np.float32(1.0 / 3.0)
    ok = cand[np.minimum(rows // f, cand.shape[0] - 1)][:, np.minimum(np.arange(w) // f, cand.shape[1] - 1)]
    both = ok[:, 1:] & ok[:, :-1]
    d = (lum[:, 1:] - lum[:, :-1])[both]
    glass.candidates = None
    if d.size < 16:
        return 0.0
    # the chroma of glass pixels against the light: JPEG's subsampled colour adds some even where
    # the luminance is flat
    rel = [planes[c][rows] - glass.plane(c)[rows] for c in range(3)]
    chroma = (np.maximum(np.maximum(rel[0], rel[1]), rel[2]) - np.minimum(np.minimum(rel[0], rel[1]), rel[2]))[ok]
    glass.chroma_noise = float(np.percentile(chroma, 90)) if chroma.size else 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _design(yy: np.ndarray, xx: np.ndarray, terms: int) -> np.ndarray:
    return np.column_stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy])[:, :terms]


def _fit(planes: list[np.ndarray], cand: np.ndarray, thumb_mpp: float, tint: np.ndarray) -> Glass:
    h, w = cand.shape
    cell = max(4, int(round(CELL_UM / max(thumb_mpp, 1e-6))))
    gh, gw = max(1, h // cell), max(1, w // cell)
    wgt = cand.astype(np.float32)
    # mean of the candidates per cell: area sums of value x weight over area sums of weight
    n = cv2.resize(wgt, (gw, gh), interpolation=cv2.INTER_AREA)
    ok = n >= 0.3
    flat = Glass(np.broadcast_to(tint, (1, 1, 3)).copy(), (h, w), tint, 0.0, True, 0.0)
    if int(ok.sum()) < 6:  # too little glass for a surface: the tint everywhere
        return flat
    sums = [cv2.resize(p * wgt, (gw, gh), interpolation=cv2.INTER_AREA)[ok] for p in planes]
    vals = np.column_stack(sums) / n[ok][:, None]  # (k, 3) mean log RGB of the glass per cell
    gy, gx = np.nonzero(ok)
    cy = (gy + 0.5) / gh * 2 - 1  # cell centres, normalized to [-1, 1]
    cx = (gx + 0.5) / gw * 2 - 1
    terms = 6 if len(vals) >= 30 else 3
    a = _design(cy, cx, terms)
    lumv = vals.mean(axis=1)
    base = n[ok].astype(np.float64)
    weights = base.copy()
    coef = np.zeros(terms)
    ridge = 1e-9 * np.eye(terms)
    for _ in range(8):  # asymmetric reweighting: cells well below the surface are tissue
        aw = a * weights[:, None]
        coef = np.linalg.solve(aw.T @ a + ridge * weights.sum(), aw.T @ lumv)  # weighted normal equations
        r = lumv - a @ coef
        upper = r[r > np.percentile(r, 25)] if len(r) > 8 else r
        tol = max(0.015, 3.0 * float(np.std(upper)))
        weights = np.where(r > -tol, base, base * 1e-3)
    kept = weights >= base * 0.5
    # residuals of the kept cells, smoothed by normalized convolution, clipped
    resid = np.zeros((gh, gw), np.float32)
    rw = np.zeros((gh, gw), np.float32)
    resid[gy[kept], gx[kept]] = ((lumv - a @ coef) * base)[kept]
    rw[gy[kept], gx[kept]] = base[kept]
    sigma = max(0.5, RESIDUAL_UM / (cell * thumb_mpp))
    num = cv2.GaussianBlur(resid, (0, 0), sigma)
    den = cv2.GaussianBlur(rw, (0, 0), sigma)
    corr = np.clip(num / np.maximum(den, 1e-3) * (den / (den + 0.05)), -MAX_RESIDUAL, MAX_RESIDUAL)
    # one surface per channel, on the cells the luminance fit kept: the tint may drift too
    aw = a * weights[:, None]
    per_channel = np.linalg.solve(aw.T @ a + ridge * weights.sum(), aw.T @ vals)  # (terms, 3)
    yy, xx = np.mgrid[0:gh, 0:gw]
    grid = _design((yy.ravel() + 0.5) / gh * 2 - 1, (xx.ravel() + 0.5) / gw * 2 - 1, terms)
    coarse = (grid @ per_channel).reshape(gh, gw, 3).astype(np.float32) + corr[..., None]
    return Glass(coarse.astype(np.float32), (h, w), tint, 0.0, True, 0.0)
