"""SAM2 tissue segmentation (AtlasPatch-style): square thumbnail + full-frame box prompt → one mask."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import SegmentationError
from .base import SegmentationParams

CHECKPOINT_ENV = "ATLASPATCH_SAM2_CHECKPOINT"
_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
# (config, checkpoint, device) → (SAM2ImagePredictor, lock guarding its per-image state)
_CACHE: dict[tuple[str, str, str], tuple[Any, threading.Lock]] = {}
_CACHE_LOCK = threading.Lock()


def expected_checkpoint_name(config: str) -> str:
    """Official weights file for a config, e.g. sam2.1_hiera_t.yaml → sam2.1_hiera_tiny.pt."""
    prefix, _, size = Path(config).stem.rpartition("_")
    return f"{prefix}_{_SIZES.get(size, size)}.pt" if prefix else f"{size}.pt"


def _resolve_checkpoint(params: SegmentationParams) -> str:
    ckpt = params.sam2_checkpoint or os.environ.get(CHECKPOINT_ENV) or None
    if ckpt and Path(ckpt).expanduser().is_file():
        return str(Path(ckpt).expanduser().resolve())
    where = f"checkpoint not found at {ckpt}" if ckpt else "no checkpoint given"
    raise SegmentationError(
        f"sam2: {where}; expected a local {expected_checkpoint_name(params.sam2_config)} "
        f"for {params.sam2_config} (weights are never downloaded); "
        f"pass --sam2-checkpoint PATH or set {CHECKPOINT_ENV}"
    )


@contextmanager
def _sam2_hydra() -> Iterator[None]:
    """Point Hydra's global config search at the sam2 package for one compose, then restore it."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    previous = gh.hydra
    gh.clear()
    try:
        initialize_config_module("sam2", version_base="1.2")
        yield
    finally:
        gh.clear()
        gh.hydra = previous


def _import_sam2() -> None:
    try:
        import sam2.build_sam  # noqa: F401
        import sam2.sam2_image_predictor  # noqa: F401
    except ImportError as e:
        raise SegmentationError(
            f"sam2 method needs the sam2 package ({e}): pip install torch, then "
            "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2 (extra atlaspatch-assets[sam2])"
        ) from e


def _build(config: str, ckpt: str, device: str) -> Any:
    """Load weights (weights_only, {"model": state_dict}), build the model, wrap it in a predictor."""
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise SegmentationError(
            f"sam2: cannot read checkpoint {ckpt} with torch.load(weights_only=True) "
            f"({type(e).__name__}: {why[:200]}); expected {expected_checkpoint_name(config)}"
        ) from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise SegmentationError(f"sam2: {ckpt} is not a SAM2 checkpoint (expected {{'model': state_dict}})")
    try:
        with _sam2_hydra():
            model = build_sam2(config, None, device="cpu")  # weights loaded below, for clearer errors
    except Exception as e:
        raise SegmentationError(f"sam2: cannot build model from config {config!r}: {e}") from e
    mismatch = f"sam2: checkpoint {ckpt} does not match config {config} (state-dict mismatch"
    try:
        res = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # shape mismatch, e.g. hiera-small weights with the tiny config
        raise SegmentationError(f"{mismatch}: {str(e)[:300]}); expected {expected_checkpoint_name(config)}") from e
    if res.missing_keys or res.unexpected_keys:
        raise SegmentationError(
            f"{mismatch}: {len(res.missing_keys)} missing keys e.g. {res.missing_keys[:3]}, "
            f"{len(res.unexpected_keys)} unexpected e.g. {res.unexpected_keys[:3]}); "
            f"expected {expected_checkpoint_name(config)}"
        )
    with warnings.catch_warnings():  # SAM2Transforms uses torch.jit.script (deprecated in torch 2.x)
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
        return SAM2ImagePredictor(model.to(device).eval())


def _predictor(params: SegmentationParams) -> tuple[Any, threading.Lock]:
    _import_sam2()
    key = (params.sam2_config, _resolve_checkpoint(params), params.device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = (_build(*key), threading.Lock())
        return _CACHE[key]


def segment_sam2(thumb: np.ndarray, thumb_mpp: float, params: SegmentationParams) -> np.ndarray:
    """Boolean tissue mask (thumbnail HxW) from SAM2 prompted with a box around the whole image."""
    predictor, lock = _predictor(params)
    h, w = thumb.shape[:2]
    if thumb.size == 0:
        return np.zeros((h, w), bool)
    import torch

    rgb = np.ascontiguousarray(np.dstack([thumb] * 3) if thumb.ndim == 2 else thumb[..., :3], np.uint8)
    side = int(params.sam2_thumbnail)
    square = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    box = np.array([0, 0, side - 1, side - 1], np.float32)
    with lock, torch.inference_mode():
        predictor.set_image(square)
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        predictor.reset_predictor()  # drop the image embedding; the predictor stays cached
    mask = (masks[0] > 0).astype(np.uint8)  # already thresholded at predictor.mask_threshold
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
