"""PRISM (Paige) on virchow_v1 features (2560 = CLS + mean patch token), 224 px at 20x.

The slide embedding is ``Prism.slide_representations(x)['image_embedding']`` (1280), computed by
PRISM's Perceiver resampler alone (the BioGPT text decoder is not needed for embeddings). The
architecture is PRISM's modeling code as shipped by the ``prism-embedder`` PyPI package
(``prism_embedder/models/prism/perceiver.py``). That package's ``__init__`` chain loads WSI
tooling and a config file missing from its wheel, so only the two model modules are imported (see
:func:`perceiver_modules`). Memory is linear in N: 513 latent queries cross-attend to N patches.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..encoders.errors import WeightsLoadError
from ..encoders.weights import ResolvedWeights, load_state_dict_file

_PKG = "prism_embedder"
_SUBPKGS = ("prism_embedder.models", "prism_embedder.models.prism")
PREFIX = "image_resampler."


def perceiver_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``configuring_prism`` and ``perceiver`` from prism-embedder, without its package ``__init__`` chain.

    Importing ``prism_embedder.models`` runs ``from .models import Virchow, PRISM`` (timm, omegaconf,
    a YAML config absent from the 1.1.1 wheel). The two sub-packages are registered as plain
    namespace modules pointing at their real directories, so only the model files execute.
    """
    spec = importlib.util.find_spec(_PKG)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'prism_embedder'")
    root = Path(next(iter(spec.submodule_search_locations)))
    if _PKG not in sys.modules:
        importlib.import_module(_PKG)  # its __init__ only sets __version__
    for name in _SUBPKGS:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = mod
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = importlib.import_module("prism_embedder.models.prism.configuring_prism")
        perceiver = importlib.import_module("prism_embedder.models.prism.perceiver")
    return config, perceiver


def _perceiver_config(weights: ResolvedWeights | None):
    config_mod, _ = perceiver_modules()
    kwargs = {}
    if weights is not None:
        cfg_file = weights.path.parent / "config.json"
        if cfg_file.is_file():
            try:
                kwargs = dict(json.loads(cfg_file.read_text()).get("perceiver_config") or {})
            except ValueError as exc:
                raise WeightsLoadError(f"prism: {cfg_file} is not valid JSON ({exc})") from exc
    kwargs = {k: v for k, v in kwargs.items() if k in config_mod.PerceiverConfig().to_dict()}
    return config_mod.PerceiverConfig(**kwargs)


def shared_aliases(model: nn.Module) -> dict[str, set[str]]:
    """state_dict key -> the other keys naming the same tensor (PRISM shares layers across depth)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return {k: set(g) - {k} for g in groups.values() for k in g}


def build_prism(spec, device: torch.device, dtype: torch.dtype, weights: ResolvedWeights | None) -> nn.Module:
    _, perceiver = perceiver_modules()
    model = perceiver.PerceiverResampler(_perceiver_config(weights))
    if weights is None:
        return model
    state = load_state_dict_file(weights)
    sub = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not sub:
        raise WeightsLoadError(
            f"prism: {weights.path} has no '{PREFIX}*' tensors; expected the paige-ai/Prism model.safetensors"
        )
    try:
        result = model.load_state_dict(sub, strict=False)
    except RuntimeError as exc:
        raise WeightsLoadError(f"prism: {weights.path} does not fit the Perceiver: {str(exc)[:600]}") from exc
    aliases = shared_aliases(model)
    # the checkpoint stores one copy of each shared layer: a key is only missing if no alias was loaded
    missing = [k for k in result.missing_keys if not (aliases.get(k, set()) & sub.keys())]
    if missing or result.unexpected_keys:
        raise WeightsLoadError(
            f"prism: {weights.path} does not match the Perceiver: {len(missing)} missing (e.g. {missing[:4]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:4]})"
        )
    return model


def prism_forward(model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
    assert model is not None
    dtype = model.perceiver.latents.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.backends.cuda.sdp_kernel deprecation
        out = model(features.to(dtype).unsqueeze(0))
    return out["image_embedding"][0]
