"""TITAN (Mahmood Lab) on conch_v15 features (768), 512 px at 20x; and FEATHER (ABMIL, same geometry).

Architecture sources, in order:
1. a local snapshot of ``MahmoodLab/TITAN`` holding the authors' remote code (``modeling_titan.py``,
   ``vision_transformer.py``, ...), loaded by :mod:`.remote`;
2. the same modeling code as vendored by the ``unicorn-baseline`` PyPI package
   (``unicorn_baseline.vision.pathology.titan``), used when the snapshot holds only weights, and for
   random-weight builds (tests, benchmarks).

Memory: TITAN's ``VisionTransformer.get_alibi`` builds the distances of every pair of patches as an
N×N float64 numpy array (plus N×N×2 int64 coordinate differences and a dense (heads, N, N) bias):
about 64 GB at 50k patches. :func:`titan_vision_forward` replays ``encode_slide_from_patch_features``
(batch 1, ALiBi, ``no_proj=True``) on the model's own modules with row-chunked attention instead.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..encoders.errors import EncoderUnavailableError, WeightsLoadError
from ..encoders.weights import ResolvedWeights, load_state_dict_file, snapshot_config
from .attention import DEFAULT_MAX_ELEMENTS, alibi_attention, alibi_slopes
from .errors import SlideEncoderError
from .remote import load_remote_code_model, snapshot_auto_map

UNICORN_HINT = "pip install --no-deps unicorn-baseline==1.4.4 einops einops-exts"
VISION_PREFIX = "vision_encoder."
_VIT_ATTRS = ("pos_encode_type", "num_heads", "patch_embed", "cls_token", "norm_pre", "blocks", "norm")
_ATTN_ATTRS = ("num_heads", "head_dim", "qkv", "q_norm", "k_norm", "proj", "proj_drop")


def _unicorn_titan() -> tuple[type, type]:
    try:
        from unicorn_baseline.vision.pathology.titan.configuration_titan import TitanConfig
        from unicorn_baseline.vision.pathology.titan.modeling_titan import Titan
    except ImportError as exc:
        raise EncoderUnavailableError(
            "Slide encoder 'titan' needs its architecture code: either a local MahmoodLab/TITAN snapshot "
            "directory with the authors' remote code (config.json, modeling_titan.py, vision_transformer.py, "
            f"model.safetensors) passed as its weights, or the unicorn-baseline package ({UNICORN_HINT}); "
            f"import failed: {exc}"
        ) from exc
    return Titan, TitanConfig


def build_titan(spec: Any, device: torch.device, dtype: torch.dtype, weights: ResolvedWeights | None) -> nn.Module:
    if weights is not None and snapshot_auto_map(weights.path.parent) is not None:
        # the text tower and CONCH v1.5 are not used for slide embeddings
        return load_remote_code_model("titan", weights, ignore_keys=("text_encoder.", "conch"))
    titan_cls, config_cls = _unicorn_titan()
    cfg = snapshot_config(weights) or {}
    kwargs = {k: cfg[k] for k in ("vision_config", "text_config", "conch_config") if isinstance(cfg.get(k), dict)}
    model = titan_cls(config_cls(**kwargs))
    if weights is None:
        return model
    state = load_state_dict_file(weights)
    sub = {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    if not sub:
        raise WeightsLoadError(f"titan: {weights.path} has no '{VISION_PREFIX}*' tensors (not a TITAN checkpoint?)")
    try:
        model.vision_encoder.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        raise WeightsLoadError(f"titan: {weights.path} does not fit the vision encoder: {str(exc)[:600]}") from exc
    return model


def supports_chunked(vit: Any) -> bool:
    """True when ``vit`` has the structure of TITAN's VisionTransformer with ALiBi (chunked path applies)."""
    if vit is None or any(not hasattr(vit, a) for a in _VIT_ATTRS) or vit.pos_encode_type != "alibi":
        return False
    if getattr(vit, "masked_im_modeling", False) or not hasattr(vit.blocks, "modules_list"):
        return False
    module = sys.modules.get(type(vit).__module__)
    if module is None or not callable(getattr(module, "preprocess_features", None)):
        return False
    return all(all(hasattr(b.attn, a) for a in _ATTN_ATTRS) for b in vit.blocks.modules_list)


def titan_vision_forward(
    vit: nn.Module, features: Tensor, coords: Tensor, patch_size_level0: int, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Tensor:
    """``VisionTransformer.forward(features, coords, patch_size_lv0, no_proj=True)`` for one slide, chunked."""
    preprocess = sys.modules[type(vit).__module__].preprocess_features
    dtype = vit.cls_token.dtype
    grid, _, bg_mask = preprocess(features.float(), coords.long(), patch_size_level0)  # (1, C, w, h), (1, w, h)
    keep = bg_mask[0].reshape(-1)
    if not bool(keep.any()):
        raise SlideEncoderError("slide has 0 patches with non-zero features; titan has nothing to encode")
    tokens = grid.flatten(2, 3).transpose(1, 2)[0][keep]  # background cells dropped (ALiBi: no pos embedding)
    del grid
    x = vit.patch_embed(tokens.to(dtype).unsqueeze(0))
    x = vit.norm_pre(torch.cat((vit.cls_token.expand(1, -1, -1), x), dim=1))
    points = torch.nonzero(bg_mask[0]).to(torch.float32)  # grid (i, j) of kept cells, in token order
    points = torch.cat([points.new_zeros(1, 2), points])
    slopes = -torch.tensor(alibi_slopes(vit.num_heads), dtype=torch.float32)
    b, n, c = x.shape
    for blk in vit.blocks.modules_list:
        attn = blk.attn
        qkv = attn.qkv(blk.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        del qkv
        out = alibi_attention(q, k, v, points, slopes, n_prefix=1, max_elements=max_elements)
        del q, k, v
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, c)))
        x = x + blk.drop_path1(blk.ls1(out))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = vit.norm(x)
    if getattr(vit, "attn_pool", None) is not None:
        return vit.attn_pool_contrastive(x, bg_mask=bg_mask).squeeze(1)[0]  # CoCa pooled, no projection
    return vit.forward_head(x)[0]


def reference_bias_bytes(n_patches: int, num_heads: int) -> int:
    """Approximate peak bytes of TITAN's dense get_alibi path (int64 diffs, float64 distances, bias copies)."""
    t = n_patches + 1
    return t * t * (16 + 8 + 4 + 3 * 4 * num_heads)


def titan_forward(model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
    assert model is not None
    vit = getattr(model, "vision_encoder", None)
    if supports_chunked(vit):
        return titan_vision_forward(vit, features, coords, patch_size_level0)
    # unknown remote-code layout: the reference path, only when its dense N×N bias surely fits
    import psutil

    need = reference_bias_bytes(features.shape[0], int(getattr(vit, "num_heads", 12)))
    avail = psutil.virtual_memory().available
    if need > avail // 2:
        raise SlideEncoderError(
            f"titan: this remote code does not have the expected VisionTransformer layout, and its reference "
            f"path would need ~{need / 2**30:.0f} GiB for {features.shape[0]} patches (N×N ALiBi bias; "
            f"{avail / 2**30:.0f} GiB available). Use the MahmoodLab/TITAN remote code or unicorn-baseline."
        )
    feats, xy = features.float().unsqueeze(0), coords.long().unsqueeze(0)
    out = model.encode_slide_from_patch_features(feats, xy, patch_size_level0)
    return out.reshape(-1)


def feather_forward(model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
    """FEATHER (ABMIL) remote code: ``model.forward_features(x) -> (embedding, attention)`` as TRIDENT calls it."""
    assert model is not None
    out = model.forward_features(features.unsqueeze(0))
    z = out[0] if isinstance(out, tuple | list) else out
    return z.reshape(-1)
