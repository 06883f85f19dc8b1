"""MOOZY (AtlasAnalyticsLab) on lunit_vit_small_patch8_dino features, 224 px at 20x.

The architecture is the ``moozy`` PyPI package's own: ``MOOZYSlideEncoder`` (ViT with 2-D ALiBi,
CLS + register tokens) and the ``CaseAggregator`` case transformer. The embedding is what
``moozy.encoding.run_encoding`` returns for a case made of this one slide: the case transformer's
CLS over the slide CLS. Inputs follow ``moozy.data.stage2.load_stage2_slide_sample``: coordinates
snapped to a grid whose step is the level-0 patch size, all-zero feature rows dropped (MOOZY's
"invalid" background cells), tokens in row-major grid order.

Memory: MOOZY's block builds a dense (1, heads, N, N) float32 bias per layer (12 × 50k² × 4 B =
120 GB at 50k patches). :func:`moozy_forward` runs the same blocks with row-chunked attention
(:mod:`.attention`) instead. The checkpoint (``moozy.pt``) is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..encoders.errors import WeightsLoadError
from ..encoders.weights import ResolvedWeights
from .attention import DEFAULT_MAX_ELEMENTS, alibi_attention
from .errors import SlideEncoderError

GRID_STEP_TOLERANCE = 0.25  # moozy.data.features.SLIDE_GRID_STEP_TOLERANCE

# released defaults (moozy.config: SlideEncoderConfig variant base_half_depth; stage-2 case transformer
# base_quarter_depth), used for random-weight builds; a checkpoint carries its own config
DEFAULT_SLIDE_CONFIG: dict[str, Any] = dict(
    feat_dim=384, d_model=768, n_layers=6, n_heads=12, dim_feedforward=3072, num_registers=4,
    learnable_alibi=False, qk_norm=False, layerscale_enabled=False, layerscale_init=0.0,
)  # fmt: skip
DEFAULT_CASE_CONFIG: dict[str, Any] = dict(
    d_model=768, num_layers=3, num_heads=12, dim_feedforward=3072, dropout=0.1, layerscale_init=1e-5,
    layer_drop=0.0, qk_norm=False, num_registers=0,
)  # fmt: skip


class MoozyModel(nn.Module):
    """MOOZY's slide encoder + case transformer (the parts of ``moozy.models.stage2_supervised.MOOZY``
    used for embeddings; the task heads are training-only)."""

    def __init__(self, slide_encoder: nn.Module, case_transformer: nn.Module):
        super().__init__()
        self.slide_encoder = slide_encoder
        self.case_transformer = case_transformer


def _build_case_transformer(cfg: dict[str, Any]) -> nn.Module:
    from moozy.models.case_transformer import CaseAggregator

    ffn = int(cfg.get("dim_feedforward") or 0)
    return CaseAggregator(
        d_model=int(cfg["d_model"]),
        num_layers=int(cfg["num_layers"]),
        num_heads=int(cfg["num_heads"]),
        dim_feedforward=ffn if ffn > 0 else None,
        dropout=float(cfg.get("dropout", 0.1)),
        layerscale_init=float(cfg.get("layerscale_init", 1e-5)),
        layer_drop=float(cfg.get("layer_drop", 0.0)),
        qk_norm=bool(cfg.get("qk_norm", False)),
        num_registers=int(cfg.get("num_registers", 0)),
    )


def _load_payload(resolved: ResolvedWeights) -> dict[str, Any]:
    try:
        payload = torch.load(resolved.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a weights problem
        raise WeightsLoadError(
            f"moozy: cannot read {resolved.path} with torch.load(weights_only=True) ({exc}). Expected the "
            "MOOZY release checkpoint moozy.pt (a dict of state dicts and configs); arbitrary pickles are "
            "never executed."
        ) from exc
    keys = ("teacher_slide_encoder", "slide_encoder_config", "case_transformer", "case_transformer_config")
    missing = [k for k in keys if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise WeightsLoadError(f"moozy: {resolved.path} is not a MOOZY stage-2 checkpoint (missing {missing})")
    return payload


def build_moozy(spec, device: torch.device, dtype: torch.dtype, weights: ResolvedWeights | None) -> nn.Module:
    from moozy.models.serialization import _build_slide_encoder_from_spec, _parse_slide_encoder_spec

    if weights is None:
        se = _build_slide_encoder_from_spec(_parse_slide_encoder_spec(DEFAULT_SLIDE_CONFIG))
        return MoozyModel(se, _build_case_transformer(DEFAULT_CASE_CONFIG))
    payload = _load_payload(weights)
    state = payload["teacher_slide_encoder"]
    se = _build_slide_encoder_from_spec(_parse_slide_encoder_spec(payload["slide_encoder_config"], state=state))
    ct = _build_case_transformer(payload["case_transformer_config"])
    try:
        se.load_state_dict(state, strict=True)
        ct.load_state_dict(payload["case_transformer"], strict=True)
    except RuntimeError as exc:
        raise WeightsLoadError(f"moozy: {weights.path} does not fit the architecture: {str(exc)[:600]}") from exc
    return MoozyModel(se, ct)


def grid_tokens(features: Tensor, coords: Tensor, patch_size_level0: int) -> tuple[Tensor, Tensor]:
    """MOOZY's token set: features and snapped level-0 positions of valid cells in row-major grid order."""
    step = float(patch_size_level0)
    xy = coords.detach().cpu().numpy().astype(np.float64)
    min_x, min_y = xy[:, 0].min(), xy[:, 1].min()
    col = np.round((xy[:, 0] - min_x) / step).astype(np.int64)
    row = np.round((xy[:, 1] - min_y) / step).astype(np.int64)
    snapped_x, snapped_y = min_x + col * step, min_y + row * step
    dev = max(np.abs(snapped_x - xy[:, 0]).max(), np.abs(snapped_y - xy[:, 1]).max())
    if dev > GRID_STEP_TOLERANCE * step:
        raise SlideEncoderError(
            f"moozy needs patches on a grid whose step is the patch size ({patch_size_level0} px at level 0); "
            f"coordinates deviate by up to {dev:.0f} px (overlapping patches?). Use --step-size equal to --patch-size."
        )
    cell = row * (int(col.max()) + 1) + col
    order = np.argsort(cell, kind="stable")
    _, last = np.unique(cell[order][::-1], return_index=True)  # a cell hit twice keeps the last patch
    order = order[::-1][last]
    idx = torch.from_numpy(order).to(features.device)
    feats = features.index_select(0, idx)
    pos = torch.from_numpy(np.stack([snapped_x[order], snapped_y[order]], axis=1)).to(features.device, torch.float32)
    valid = (feats != 0).any(dim=1)
    if not bool(valid.all()):
        feats, pos = feats[valid], pos[valid]
    if feats.shape[0] == 0:
        raise SlideEncoderError("slide has 0 patches with non-zero features; moozy has nothing to encode")
    return feats, pos


def _block_forward(block: nn.Module, x: Tensor, points: Tensor, n_prefix: int, max_elements: int) -> Tensor:
    """``moozy.models.moozy_slide_encoder.VisionTransformerBlock.forward`` (eval, no mask) with chunked attention."""
    b, n, d = x.shape
    h, hd = block.n_heads, block.head_dim
    xn = block.norm1(x)
    q = block.q_norm(block.q_proj(xn).reshape(b, n, h, hd).transpose(1, 2))
    k = block.k_norm(block.k_proj(xn).reshape(b, n, h, hd).transpose(1, 2))
    v = block.v_proj(xn).reshape(b, n, h, hd).transpose(1, 2)
    del xn
    slopes = block.pos_bias.slopes.reshape(-1)  # already negative: bias = slope * distance / patch size
    attn = alibi_attention(q, k, v, points, slopes, n_prefix=n_prefix, max_elements=max_elements)
    del q, k, v
    x = x + block.drop_path(block.ls_attn(block.out_proj(attn.transpose(1, 2).reshape(b, n, d))))
    mlp = block.fc2(block.mlp_dropout(block.activation(block.fc1(block.norm2(x)))))
    return x + block.drop_path(block.ls_mlp(block.mlp_dropout(mlp)))


def moozy_slide_cls(
    se: nn.Module, feats: Tensor, positions: Tensor, patch_size_level0: int, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Tensor:
    """``MOOZYSlideEncoder.forward`` for one slide without masks: the slide CLS (d_model,)."""
    dtype = se.input_proj[0].weight.dtype
    x = se.input_proj(feats.to(dtype).unsqueeze(0))
    prefix = [se.cls_token.expand(1, -1, -1)]
    if se.num_registers > 0 and se.register_tokens is not None:
        prefix.append(se.register_tokens.expand(1, -1, -1))
    n_prefix = 1 + (se.num_registers if se.register_tokens is not None else 0)
    x = torch.cat([*prefix, x], dim=1)
    pos = torch.cat([positions.new_zeros(n_prefix, 2), positions.float()], dim=0)
    points = pos / max(float(patch_size_level0), 1e-6)  # MOOZY scales distances by the level-0 patch size
    for block in se.blocks:
        x = _block_forward(block, x, points, n_prefix, max_elements)
    return se.norm(x)[0, 0]


def moozy_forward(model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
    assert isinstance(model, MoozyModel)
    feats, pos = grid_tokens(features, coords, patch_size_level0)
    cls = moozy_slide_cls(model.slide_encoder, feats, pos, patch_size_level0)
    return model.case_transformer(cls.unsqueeze(0))  # a case of one slide -> (d_model,)


def moozy_case_forward(model: nn.Module | None, slides: list[tuple[Tensor, Tensor, int]]) -> Tensor:
    """MOOZY's patient embedding (``moozy.encoding.run_encoding`` on several slides): the case
    transformer over the slide CLS tokens of all the case's slides."""
    assert isinstance(model, MoozyModel)
    tokens = []
    for features, coords, patch_size_level0 in slides:
        feats, pos = grid_tokens(features, coords, patch_size_level0)
        tokens.append(moozy_slide_cls(model.slide_encoder, feats, pos, patch_size_level0))
    return model.case_transformer(torch.stack(tokens))  # (S, d) -> (d_model,)
