"""Architecture pieces the libraries lack: CTransPath's conv stem, EfficientNet-Lite key mapping."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ConvStem(nn.Module):
    """CTransPath patch embedding: two stride-2 3x3 conv-BN-ReLU stages then a 1x1 projection (stride 4).

    Drop-in ``embed_layer`` for timm's Swin Transformer (emits NHWC tokens, the layout timm expects).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        **_: Any,
    ):
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch != (4, 4) or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        self.img_size, self.patch_size = size, patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.output_fmt = output_fmt
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [
                nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else x.flatten(2).transpose(1, 2)
        return self.norm(x)


def ctranspath_arch(config: dict | None = None) -> nn.Module:
    """CHIEF CTransPath: Swin-T/4 window 7 with :class:`ConvStem`, global average pooled (768)."""
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem, num_classes=0)


def ctranspath_adapt(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Original (timm 0.5) Swin checkpoints -> current timm layout (downsample moved, buffers dropped)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return checkpoint_filter_fn(state, model)


# efficientnet_pytorch (lukemelas / EfficientNet-Lite-PyTorch) names -> timm EfficientNet names
_EFF_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EFF_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFF_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite_adapt(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an efficientnet_pytorch-layout EfficientNet-Lite checkpoint onto timm ``tf_efficientnet_lite*``."""
    if not any(k.startswith("_blocks.") for k in state):
        return state  # already timm layout
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            s, i = flat[int(parts[1])]
            table = _EFF_IR if hasattr(model.blocks[s][i], "conv_pwl") else _EFF_DS
            out[".".join([f"blocks.{s}.{i}", table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _EFF_TOP:
            out[".".join([_EFF_TOP[parts[0]], *parts[1:]])] = value
        else:
            out[key] = value
    return out


def efficientnet_lite0_arch(config: dict | None = None) -> nn.Module:
    """EfficientNet-Lite0 (TF 'SAME' padding, ReLU6, no SE) as converted from TensorFlow; pooled 1280."""
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


def token_cls_mean(tokens: Tensor, num_prefix: int) -> Tensor:
    """concat(CLS token, mean of patch tokens), skipping ``num_prefix`` CLS/register tokens."""
    return torch.cat([tokens[:, 0], tokens[:, num_prefix:].mean(dim=1)], dim=-1)


class _LinspaceOnCpu(torch.overrides.TorchFunctionMode):
    """Let ``torch.linspace(...).item()`` (drop-path schedules in constructors) run under the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def conch_v15_arch(config: dict | None = None) -> nn.Module:
    """CONCH v1.5 vision tower: ViT-L/16 (iBOT/timm 0.8 layout) + attentional pooler + LayerNorm (768).

    The authors' code as published with TITAN (``conch_v1_5.py``), vendored by the ``unicorn-baseline``
    PyPI package; checkpoint keys ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``.
    """
    from unicorn_baseline.vision.pathology.titan.conch_v1_5 import (
        AttentionalPooler,
        EncoderWithAttentionalPooler,
        VisionTransformer,
    )
    from unicorn_baseline.vision.pathology.titan.configuration_titan import ConchConfig

    c = ConchConfig(**(config or {}))
    with _LinspaceOnCpu():
        trunk = VisionTransformer(
            patch_size=c.patch_size,
            embed_dim=c.context_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            mlp_ratio=c.mlp_ratio,
            qkv_bias=c.qkv_bias,
            init_values=c.init_values,
        )
    pooler = AttentionalPooler(d_model=c.embed_dim, context_dim=c.context_dim, n_queries=c.pooler_n_queries_contrast)
    return EncoderWithAttentionalPooler(encoder=trunk, attn_pooler_contrast=pooler, embed_dim=c.embed_dim)
