"""The glass (empty slide) of a brightfield thumbnail: its colour, its illumination field, its noise.

Transmitted light: a pixel is I = L(x, y) · T, with L the light through empty glass (the scanner's
illumination times the glass and mountant tint) and T the transmittance of what lies on it, so
optical density relative to the glass, OD = log L − log I, is what a stain adds, whatever the
brightness, tint or unevenness of the light. L is estimated here:

1. candidates: smooth pixels (glass has no texture at ~8 µm/px) that are colourless relative to the
   brightest smooth colour (the glass tint) and not much darker than it;
2. the candidates are averaged on a grid of cells (~128 µm), and a smooth surface (2-D quadratic
   per channel, log space) is fitted to the cells by asymmetric reweighted least squares: tissue
   only darkens, so cells far below the surface are given almost no weight;
3. the residuals of the cells kept are smoothed (normalized convolution, ~0.5 mm) and added back,
   for illumination the quadratic does not follow (stitching, mottle), at most ±3 %.

When no credible glass is found (slide all tissue, almost black, one flat colour), the light is a
standard white (`DEFAULT_GLASS`) and `credible` is False (the caller warns).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .artifacts import local_std

DEFAULT_GLASS = 240.0  # typical brightfield glass, when the slide shows none
SMOOTH_LOG = 0.03  # max local std (log units, 3x3) of a glass pixel: ~3 % at 8 µm/px
COLOURLESS_LOG = 0.04  # max chroma (max - min of log RGB, tint removed) of a glass pixel
MAX_GLASS_CHROMA = 0.18  # a brightest colour more coloured than this is not glass (e.g. pink)
MIN_GLASS_LEVEL = np.log(96.0)  # darker than this is not glass (almost black slide)
CELL_UM = 128.0
RESIDUAL_UM = 500.0
MAX_RESIDUAL = 0.03


@dataclass
class Glass:
    """Log illumination field (h, w, 3) float32, the tint (log RGB), noise and credibility."""

    log_field: np.ndarray
    log_tint: np.ndarray  # (3,) log RGB of the brightest smooth colour (or DEFAULT_GLASS)
    noise: float  # robust std of the glass pixels' log luminance around the field
    credible: bool
    fraction: float  # share of the thumbnail taken as glass candidates


def estimate_glass(log_rgb: np.ndarray, thumb_mpp: float) -> Glass:
    """Glass model of a thumbnail given as log RGB float32 (h, w, 3) (natural log of max(I, 1))."""
    h, w = log_rgb.shape[:2]
    lum = log_rgb.mean(axis=2)
    smooth = local_std(lum) < SMOOTH_LOG
    n_smooth = int(smooth.sum())
    tint, credible = np.full(3, np.log(DEFAULT_GLASS), np.float32), False
    if n_smooth >= 16:
        ls = lum[smooth]
        level = float(np.percentile(ls, 90))
        near = smooth & (lum >= level - 0.05)
        cand_tint = np.median(log_rgb[near], axis=0).astype(np.float32)
        chroma = float(cand_tint.max() - cand_tint.min())
        if chroma <= MAX_GLASS_CHROMA and float(cand_tint.mean()) >= MIN_GLASS_LEVEL:
            tint, credible = cand_tint, True
    if not credible:
        field = np.broadcast_to(tint, (h, w, 3)).astype(np.float32)
        return Glass(field, tint, 0.0, False, 0.0)

    rel = log_rgb - tint  # tint removed: glass is ~(0, 0, 0) up to a common brightness shift
    chroma = rel.max(axis=2) - rel.min(axis=2)
    cand = smooth & (chroma < COLOURLESS_LOG) & (lum > float(tint.mean()) - 0.6)
    fraction = float(cand.mean())
    field = _fit_field(log_rgb, cand, thumb_mpp, tint)
    resid = (lum - field.mean(axis=2))[cand]
    if resid.size > 200_000:  # a robust spread needs no more
        resid = resid[:: resid.size // 200_000]
    noise = float(1.4826 * np.median(np.abs(resid - np.median(resid)))) if resid.size else 0.0
    return Glass(field, tint, noise, True, fraction)


def _design(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy])


def _fit_field(log_rgb: np.ndarray, cand: np.ndarray, thumb_mpp: float, tint: np.ndarray) -> np.ndarray:
    h, w = cand.shape
    cell = max(4, int(round(CELL_UM / max(thumb_mpp, 1e-6))))
    gh, gw = max(1, h // cell), max(1, w // cell)
    wgt = cand.astype(np.float32)
    # mean of the candidates per cell (area sums), per channel
    n = cv2.resize(wgt, (gw, gh), interpolation=cv2.INTER_AREA)
    sums = cv2.resize(log_rgb * wgt[..., None], (gw, gh), interpolation=cv2.INTER_AREA)
    ok = n >= 0.3
    if int(ok.sum()) < 6:  # too little glass for a surface: the tint everywhere
        return np.broadcast_to(tint, (h, w, 3)).astype(np.float32).copy()
    vals = sums[ok] / n[ok][:, None]  # (k, 3)
    gy, gx = np.nonzero(ok)
    # cell centres in normalized image coordinates [-1, 1]
    cy = ((gy + 0.5) * (h / gh)) / h * 2 - 1
    cx = ((gx + 0.5) * (w / gw)) / w * 2 - 1
    a = _design(cy, cx) if len(vals) >= 30 else _design(cy, cx)[:, :3]
    lumv = vals.mean(axis=1)
    weights = n[ok].astype(np.float64)
    base = weights.copy()
    coef = None
    for _ in range(8):
        sw = np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(a * sw, lumv * sw[:, 0], rcond=None)
        r = lumv - a @ coef
        inl = r > -max(0.015, 3 * float(np.std(r[r > np.percentile(r, 25)]) if len(r) > 8 else 0.015))
        weights = np.where(inl, base, base * 1e-3)
    assert coef is not None
    inl = weights >= base * 0.5
    # per-channel offsets (the tint, constant) on the kept cells
    offsets = np.median(vals[inl] - lumv[inl][:, None], axis=0).astype(np.float32)
    # residual map of kept cells, smoothed by normalized convolution, clipped
    resid = np.zeros((gh, gw), np.float32)
    rw = np.zeros((gh, gw), np.float32)
    resid[gy[inl], gx[inl]] = (lumv - a @ coef)[inl] * n[ok][inl]
    rw[gy[inl], gx[inl]] = n[ok][inl]
    sigma = max(0.5, RESIDUAL_UM / (cell * thumb_mpp))
    num = cv2.GaussianBlur(resid, (0, 0), sigma)
    den = cv2.GaussianBlur(rw, (0, 0), sigma)
    corr = np.clip(num / np.maximum(den, 1e-3) * (den / (den + 0.05)), -MAX_RESIDUAL, MAX_RESIDUAL)
    # evaluate the surface at full resolution through a coarse grid (the surface is smooth)
    yy, xx = np.mgrid[0:gh, 0:gw]
    py = ((yy + 0.5) * (h / gh)) / h * 2 - 1
    px = ((xx + 0.5) * (w / gw)) / w * 2 - 1
    d = _design(py.ravel(), px.ravel())[:, : len(coef)]
    surf = (d @ coef).reshape(gh, gw).astype(np.float32) + corr
    surf_full = cv2.resize(surf, (w, h), interpolation=cv2.INTER_LINEAR)
    return surf_full[..., None] + offsets
