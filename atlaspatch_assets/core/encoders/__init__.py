"""Patch encoders: registry of built-in feature extractors, offline weights, plugins (no Dagster)."""

from .base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PRECISIONS, Encoder, EncoderSpec
from .errors import (
    EncoderError,
    EncoderUnavailableError,
    EncoderWeightsError,
    PluginError,
    UnknownEncoderError,
    WeightsLoadError,
    WeightsNotFoundError,
)
from .plugins import (
    ENTRY_POINT_GROUP,
    encoder_registry,
    load_entry_point_plugins,
    load_plugin_file,
    register_custom_encoder,
)
from .registry import BUILTIN_ENCODERS, ENCODERS, EncoderRegistry, get_encoder_spec
from .weights import WEIGHTS_DIR_ENV, ResolvedWeights, file_sha256, resolve_weights

__all__ = [
    "BUILTIN_ENCODERS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ENCODERS",
    "ENTRY_POINT_GROUP",
    "Encoder",
    "EncoderError",
    "EncoderRegistry",
    "EncoderSpec",
    "EncoderUnavailableError",
    "EncoderWeightsError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRECISIONS",
    "PluginError",
    "ResolvedWeights",
    "UnknownEncoderError",
    "WEIGHTS_DIR_ENV",
    "WeightsLoadError",
    "WeightsNotFoundError",
    "encoder_registry",
    "file_sha256",
    "get_encoder_spec",
    "load_entry_point_plugins",
    "load_plugin_file",
    "register_custom_encoder",
    "resolve_weights",
]
