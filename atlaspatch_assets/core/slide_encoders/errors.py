"""Errors of the slide-encoder registry; weights and availability errors are the patch encoders' own."""

from __future__ import annotations

from ..encoders.errors import EncoderError
from ..errors import UsageError


class SlideEncoderError(EncoderError):
    """Base class of slide-encoder errors raised while encoding (bad inputs, empty slides)."""


class SlideEncoderMismatchError(SlideEncoderError, UsageError):
    """Patch features of the wrong encoder, patch size or magnification (a usage error: exit code 2)."""


class UnknownSlideEncoderError(SlideEncoderError, UsageError):
    """A slide-encoder name that is not registered (a usage error: exit code 2)."""

    def __init__(self, name: str, suggestions: list[str], known: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"Unknown slide encoder {name!r}.{hint} Registered slide encoders: {', '.join(known)}.")
