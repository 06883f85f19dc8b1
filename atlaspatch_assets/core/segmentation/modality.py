"""Brightfield or fluorescence, from the thumbnail: the background is glass (bright) or dark."""

from __future__ import annotations

import numpy as np

MODALITIES = ("auto", "brightfield", "fluorescence")
DARK_BACKGROUND = 60  # median of the per-pixel max channel below this: a dark (fluorescence) background


def detect_modality(thumb: np.ndarray) -> str:
    """'fluorescence' when most of the slide is dark, else 'brightfield'.

    Brightfield slides are mostly glass (≈ 240) or stained tissue (rarely below 100 in every
    channel); fluorescence slides are mostly black background with bright signal.
    """
    if thumb.size == 0:
        return "brightfield"
    brightest = thumb.max(axis=2) if thumb.ndim == 3 else thumb
    return "fluorescence" if float(np.median(brightest)) < DARK_BACKGROUND else "brightfield"


def resolve_modality(thumb: np.ndarray, requested: str) -> str:
    if requested not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {requested!r}")
    return detect_modality(thumb) if requested == "auto" else requested
