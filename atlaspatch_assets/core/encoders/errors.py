"""Errors of the patch-encoder registry: each message names the encoder and what to do."""

from __future__ import annotations

from ..errors import UsageError


class EncoderError(RuntimeError):
    """Base class of every patch-encoder error."""


class UnknownEncoderError(EncoderError, UsageError):
    """An encoder name that is not registered (a usage error: CLI exit code 2)."""

    def __init__(self, name: str, suggestions: list[str], known: int):
        self.name = name
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"Unknown patch encoder {name!r}.{hint} ({known} encoders are registered; a custom "
            "encoder is added by a plugin defining register_feature_extractors(registry, device, "
            "dtype, num_workers).)"
        )


class EncoderUnavailableError(EncoderError):
    """The encoder's architecture needs code that is not installed / not available offline."""


class EncoderWeightsError(EncoderError):
    """Base class of weight resolution and loading errors."""


class WeightsNotFoundError(EncoderWeightsError, FileNotFoundError):
    """No local weights for an encoder (weights are never downloaded)."""


class WeightsLoadError(EncoderWeightsError):
    """A weights file exists but cannot be read or does not fit the architecture."""


class PluginError(EncoderError):
    """A plugin failed to import, raised, or registered something invalid."""
