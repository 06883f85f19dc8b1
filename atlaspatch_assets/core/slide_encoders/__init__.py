"""Slide encoders: patch features of one slide -> one embedding (no Dagster).

Registry rows state the patch encoder, patch size and magnification each model needs; a mismatch
is a :class:`SlideEncoderMismatchError` before any work. Weights resolve offline through the patch
encoders' :func:`~atlaspatch_assets.core.encoders.resolve_weights`; architectures come from the
authors' code (PyPI packages ``moozy``, ``prism-embedder``, ``unicorn-baseline``, or the remote code
of a local Hugging Face snapshot). ``mean``/``max`` pooling work offline on any features.
"""

from ..encoders.errors import EncoderUnavailableError, WeightsLoadError, WeightsNotFoundError
from .base import SlideEncoder, SlideEncoderSpec
from .errors import SlideEncoderError, SlideEncoderMismatchError, UnknownSlideEncoderError
from .registry import (
    BUILTIN_SLIDE_ENCODERS,
    SLIDE_ENCODERS,
    check_slide_encoder_run,
    compatible_groups,
    get_slide_encoder_spec,
    required_patch_encoders,
    slide_encoder_registry,
)

__all__ = [
    "BUILTIN_SLIDE_ENCODERS",
    "EncoderUnavailableError",
    "SLIDE_ENCODERS",
    "SlideEncoder",
    "SlideEncoderError",
    "SlideEncoderMismatchError",
    "SlideEncoderSpec",
    "UnknownSlideEncoderError",
    "WeightsLoadError",
    "WeightsNotFoundError",
    "check_slide_encoder_run",
    "compatible_groups",
    "get_slide_encoder_spec",
    "required_patch_encoders",
    "slide_encoder_registry",
]
