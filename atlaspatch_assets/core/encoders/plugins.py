"""Encoder plugins: a Python file or an ``atlaspatch.encoders`` entry point registering extra encoders.

A plugin defines the seed's hook::

    def register_feature_extractors(registry, device, dtype, num_workers):
        registry.register(EncoderSpec(name="my_enc", dim=512, library="custom", arch=build_my_model, ...))
        # or: register_custom_encoder(registry=registry, name=..., embedding_dim=..., loader=...)

Registration is staged: a plugin that raises or registers something invalid changes nothing and
fails with a :class:`PluginError` naming the plugin.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import cached_registry
from .base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, validate_spec
from .errors import PluginError
from .registry import ENCODERS, EncoderRegistry

log = logging.getLogger(__name__)

HOOK_NAME = "register_feature_extractors"
ENTRY_POINT_GROUP = "atlaspatch.encoders"


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"atlaspatch_encoder_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"Encoder plugin {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"Encoder plugin {path}: import failed: {type(exc).__name__}: {exc}") from exc
    return module


def _run_hook(
    hook: Callable[..., Any],
    source: str,
    registry: EncoderRegistry,
    device: str | torch.device,
    dtype: torch.dtype,
    num_workers: int,
) -> list[str]:
    """Call ``hook`` on a staging copy, validate what it added, then commit to ``registry``."""
    if not callable(hook):
        raise PluginError(
            f"Encoder plugin {source}: must define a callable {HOOK_NAME}(registry, device, dtype, num_workers)"
        )
    staging = registry.copy()
    try:
        hook(staging, torch.device(device), dtype, num_workers)
    except Exception as exc:
        raise PluginError(f"Encoder plugin {source}: {HOOK_NAME} raised {type(exc).__name__}: {exc}") from exc
    added = [name for name, spec in staging.items() if registry.get(name) is not spec]
    for name in added:
        try:
            validate_spec(staging[name])
        except (TypeError, ValueError) as exc:
            raise PluginError(f"Encoder plugin {source}: invalid encoder {name!r}: {exc}") from exc
    if not added:
        log.warning("Encoder plugin %s registered no encoders", source)
    for name in added:
        registry.register(staging[name], replace=True)
    return added


def load_plugin_file(
    path: str | os.PathLike,
    registry: EncoderRegistry | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
) -> list[str]:
    """Import a plugin file and run its ``register_feature_extractors``; returns the new encoder names."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise PluginError(f"Encoder plugin {p}: file not found")
    module = _import_file(p)
    hook = getattr(module, HOOK_NAME, None)
    return _run_hook(hook, str(p), ENCODERS if registry is None else registry, device, dtype, num_workers)


def load_entry_point_plugins(
    registry: EncoderRegistry | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    group: str = ENTRY_POINT_GROUP,
) -> list[str]:
    """Run every installed ``atlaspatch.encoders`` entry point (a hook function or a module defining it)."""
    reg = ENCODERS if registry is None else registry
    added: list[str] = []
    for ep in importlib.metadata.entry_points(group=group):
        source = f"entry point {ep.name!r} ({ep.value})"
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(f"Encoder plugin {source}: import failed: {type(exc).__name__}: {exc}") from exc
        hook = getattr(obj, HOOK_NAME, None) if isinstance(obj, ModuleType) else obj
        added += _run_hook(hook, source, reg, device, dtype, num_workers)
    return added


def register_custom_encoder(
    *,
    registry: EncoderRegistry,
    name: str,
    embedding_dim: int,
    loader: Callable[[torch.device, torch.dtype], Any],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    input_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    forward_fn: Callable[[Tensor], Tensor] | None = None,
    model_id: str | None = None,
    replace: bool = False,
) -> EncoderSpec:
    """Seed-style helper: ``loader(device, dtype)`` returns a trained ``nn.Module`` (or an object with
    ``.model`` and optional ``.forward_fn``). Preprocessing is declared by input_size/mean/std."""
    fwd_holder: dict[str, Callable[[Tensor], Tensor] | None] = {"fn": forward_fn}

    def arch(config: dict | None = None) -> nn.Module:
        out = loader(torch.device("cpu"), torch.float32)
        model = getattr(out, "model", out)
        if not isinstance(model, nn.Module):
            raise TypeError(f"loader for {name!r} returned {type(out).__name__}, not an nn.Module")
        if fwd_holder["fn"] is None:
            fwd_holder["fn"] = getattr(out, "forward_fn", None)
        return model

    def forward(model: nn.Module, x: Tensor) -> Tensor:
        fn = fwd_holder["fn"]
        return fn(x) if fn is not None else model(x)

    spec = EncoderSpec(
        name=name,
        dim=embedding_dim,
        library="custom",
        arch=arch,
        forward=forward,
        input_size=input_size,
        mean=mean,
        std=std,
        interpolation=interpolation,
        model_id=model_id,
        needs_weights=False,
    )
    return registry.register(spec, replace=replace)


@cached_registry
def encoder_registry(plugin_files: tuple[str, ...] = ()) -> EncoderRegistry:
    """Built-ins + every installed `atlaspatch.encoders` entry point + these plugin files.

    Built once per process for each set of plugin files: the CLI, the Dagster assets and
    `atlaspatch info` share it, so an installed plugin's encoder is known everywhere.
    """
    reg = ENCODERS.copy()
    load_entry_point_plugins(reg)
    for path in plugin_files:
        load_plugin_file(path, reg)
    return reg
