"""Models published as Hugging Face remote code (TITAN, FEATHER), loaded from a local snapshot only.

The snapshot directory (``hf download MahmoodLab/TITAN`` on a machine with access, then copied) holds
``config.json`` with an ``auto_map``, the authors' ``*.py`` files and ``model.safetensors``. It is
loaded with ``AutoModel.from_pretrained(dir, trust_remote_code=True, local_files_only=True)``; remote
code written for transformers 4 (no ``post_init()`` call) fails in transformers 5, so on that failure
the same classes are taken from the snapshot (``get_class_from_dynamic_module``), instantiated from
its config and given the checkpoint with a strict key check. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..encoders.errors import EncoderUnavailableError, WeightsLoadError
from ..encoders.weights import ResolvedWeights, load_state_dict_file

log = logging.getLogger(__name__)


def snapshot_auto_map(snapshot: Path) -> dict[str, str] | None:
    """The snapshot's ``auto_map`` when its config and the referenced code files are present."""
    cfg_file = snapshot / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return None
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not isinstance(auto_map, dict) or "AutoModel" not in auto_map:
        return None
    module = str(auto_map["AutoModel"]).split("--")[-1].rsplit(".", 1)[0]
    return auto_map if (snapshot / f"{module}.py").is_file() else None


def _check_keys(name: str, source: Path, missing: list[str], unexpected: list[str], ignore: tuple[str, ...]) -> None:
    missing = [k for k in missing if not k.startswith(ignore)]
    unexpected = [k for k in unexpected if not k.startswith(ignore)]
    if missing or unexpected:
        raise WeightsLoadError(
            f"{name}: weights {source} do not match the remote-code architecture: {len(missing)} missing "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]})"
        )


def load_remote_code_model(
    name: str, weights: ResolvedWeights, *, ignore_keys: tuple[str, ...] = (), force_manual: bool = False
) -> nn.Module:
    """Build the snapshot's AutoModel class with the snapshot's weights (offline, strict keys)."""
    snapshot = weights.path.parent
    auto_map = snapshot_auto_map(snapshot)
    if auto_map is None:
        raise EncoderUnavailableError(
            f"Slide encoder {name!r}: {snapshot} holds no remote code (config.json with an auto_map and the "
            "referenced *.py files). Pass the whole local Hugging Face snapshot directory as its weights."
        )
    try:
        import transformers
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the features extra
        raise EncoderUnavailableError(f"Slide encoder {name!r} needs transformers ({exc})") from exc

    if not force_manual:
        try:
            model, info = transformers.AutoModel.from_pretrained(
                str(snapshot), trust_remote_code=True, local_files_only=True, output_loading_info=True
            )
        except (AttributeError, TypeError, KeyError, NotImplementedError) as exc:
            log.info("%s: AutoModel.from_pretrained failed (%s); building the remote-code classes directly", name, exc)
        else:
            _check_keys(name, weights.path, list(info["missing_keys"]), list(info["unexpected_keys"]), ignore_keys)
            return model

    try:
        config_cls = get_class_from_dynamic_module(auto_map["AutoConfig"], str(snapshot), local_files_only=True)
        model_cls = get_class_from_dynamic_module(auto_map["AutoModel"], str(snapshot), local_files_only=True)
    except (ImportError, OSError, KeyError) as exc:
        raise EncoderUnavailableError(
            f"Slide encoder {name!r}: the remote code in {snapshot} cannot be imported ({exc}); install the "
            "packages it imports."
        ) from exc
    config = config_cls.from_pretrained(str(snapshot), local_files_only=True)
    model = model_cls(config)
    state = load_state_dict_file(weights)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsLoadError(f"{name}: weights {weights.path} do not fit: {str(exc)[:600]}") from exc
    _check_keys(name, weights.path, list(result.missing_keys), list(result.unexpected_keys), ignore_keys)
    return model


def remote_only_build(spec: Any, device: Any, dtype: Any, weights: ResolvedWeights | None) -> nn.Module:
    """Build for encoders whose only code is the remote code of their snapshot (FEATHER)."""
    if weights is None:
        raise EncoderUnavailableError(
            f"Slide encoder {spec.name!r} has no offline architecture code (it ships as remote code of "
            f"{spec.model_id}), so it cannot be built with random weights; pass its local snapshot directory."
        )
    return load_remote_code_model(spec.name, weights)
