"""Slide encoders: registry, geometry checks, pooling numerics, random-weight end-to-end runs of the
architectures available offline (TITAN, PRISM, MOOZY), equivalence of the memory-safe attention
with the reference code, weights loading, and bounded memory on large slides. Never touches the network."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from atlaspatch_assets.core.encoders import ENCODERS, EncoderUnavailableError, WeightsNotFoundError
from atlaspatch_assets.core.errors import UsageError
from atlaspatch_assets.core.slide_encoders import (
    SLIDE_ENCODERS,
    SlideEncoder,
    SlideEncoderError,
    SlideEncoderMismatchError,
    UnknownSlideEncoderError,
    check_slide_encoder_run,
    compatible_groups,
    get_slide_encoder_spec,
    required_patch_encoders,
)
from atlaspatch_assets.core.slide_encoders.attention import alibi_attention, alibi_slopes

HAS = {
    "titan": importlib.util.find_spec("unicorn_baseline") is not None,
    "prism": all(importlib.util.find_spec(m) is not None for m in ("prism_embedder", "environs")),
    "moozy": importlib.util.find_spec("moozy") is not None,
}
needs = {k: pytest.mark.skipif(not v, reason=f"{k} architecture package not installed") for k, v in HAS.items()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing is found there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.delenv("ATLASPATCH_WEIGHTS_DIR", raising=False)


def grid_coords(n: int, step: int, seed: int = 0, fill: float = 0.7) -> np.ndarray:
    """Level-0 (x, y) of n distinct cells of a square lattice (a tissue-like layout with holes)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n / fill)))
    cells = np.sort(rng.choice(side * side, size=n, replace=False))
    return (np.stack([cells % side, cells // side], axis=1) * step + 100).astype(np.int64)


@pytest.fixture(scope="module")
def titan():
    if not HAS["titan"]:
        pytest.skip("unicorn-baseline not installed")
    torch.manual_seed(0)
    return SlideEncoder.load("titan", random_weights=True)


@pytest.fixture(scope="module")
def moozy():
    if not HAS["moozy"]:
        pytest.skip("moozy not installed")
    torch.manual_seed(0)
    return SlideEncoder.load("moozy", random_weights=True)


@pytest.fixture(scope="module")
def prism():
    if not HAS["prism"]:
        pytest.skip("prism-embedder not installed")
    torch.manual_seed(0)
    return SlideEncoder.load("prism", random_weights=True)


# ------------------------------------------------------------------ registry


def test_registry_rows_state_encoder_geometry_and_dims():
    expected = {
        # name: (patch encoder, patch size, magnification, output dim, input dim)
        "titan": ("conch_v15", 512, 20.0, 768, 768),
        "prism": ("virchow_v1", 224, 20.0, 1280, 2560),
        "moozy": ("lunit_vit_small_patch8_dino", 224, 20.0, 768, 384),
        "gigapath_slide": ("prov_gigapath", 256, 20.0, 768, 1536),
        "feather": ("conch_v15", 512, 20.0, 512, 768),
        "madeleine": ("conch_v1", 256, 10.0, 512, 512),
        "chief": ("chief_ctranspath", 256, 10.0, 768, 768),
        "mean": (None, None, None, None, None),
        "max": (None, None, None, None, None),
    }
    assert set(SLIDE_ENCODERS) == set(expected)
    for name, (enc, size, mag, dim, din) in expected.items():
        spec = SLIDE_ENCODERS[name]
        assert (spec.patch_encoder, spec.patch_size, spec.target_magnification, spec.dim, spec.input_dim) == (
            enc,
            size,
            mag,
            dim,
            din,
        ), name
        if enc is not None:  # the required patch encoder exists and produces the expected dim
            assert ENCODERS[enc].dim == din, name
    assert SLIDE_ENCODERS["titan"].needs_coords and SLIDE_ENCODERS["moozy"].needs_coords
    assert not SLIDE_ENCODERS["prism"].needs_coords and not SLIDE_ENCODERS["mean"].needs_coords
    json.dumps({n: s.describe() for n, s in SLIDE_ENCODERS.items()})  # storage-attr safe


def test_lookup_is_forgiving_and_suggests():
    assert get_slide_encoder_spec("TITAN").name == "titan"
    assert get_slide_encoder_spec("gigapath-slide").name == "gigapath_slide"
    with pytest.raises(UnknownSlideEncoderError) as err:
        get_slide_encoder_spec("titn")
    assert "titan" in err.value.suggestions and isinstance(err.value, UsageError)
    assert "Registered slide encoders" in str(err.value)


def test_required_patch_encoders():
    assert required_patch_encoders(["prism", "moozy", "mean", "prism"]) == ["virchow_v1", "lunit_vit_small_patch8_dino"]


# ------------------------------------------------------------------ geometry checks


def test_check_compatible_accepts_the_right_geometry():
    SLIDE_ENCODERS["titan"].check_compatible("conch_v15", 512, 20)
    SLIDE_ENCODERS["prism"].check_compatible("virchow_v1", 224, 20.0)
    for pool in ("mean", "max"):
        SLIDE_ENCODERS[pool].check_compatible("resnet50", 333, 7.5)  # any encoder, any geometry


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        (("virchow_v1", 224, 20), "patch size 512 px (given 224 px)"),
        (("conch_v15", 512, 40), "magnification 20x (given 40x)"),
        (("uni_v1", 512, 20), "patch encoder 'conch_v15' (given 'uni_v1')"),
    ],
)
def test_check_compatible_mismatch_is_a_clear_usage_error(given, needle):
    with pytest.raises(SlideEncoderMismatchError) as err:
        SLIDE_ENCODERS["titan"].check_compatible(*given)
    msg = str(err.value)
    assert needle in msg
    assert "features/conch_v15 from 512 px patches at 20x" in msg  # what is required
    assert "--patch-size 512 --target-mag 20" in msg  # how to fix it
    assert "prism" in msg and "cannot share one run" in msg
    assert isinstance(err.value, UsageError)


def test_compatible_groups_by_patch_geometry():
    assert compatible_groups(["prism", "moozy"]) == [((224, 20.0), ["prism", "moozy"])]
    groups = dict(compatible_groups(["titan", "prism", "mean"]))
    assert groups == {(512, 20.0): ["titan", "mean"], (224, 20.0): ["prism", "mean"]}
    assert compatible_groups(["mean", "max"]) == [(None, ["mean", "max"])]
    assert dict(compatible_groups(["titan", "feather"])) == {(512, 20.0): ["titan", "feather"]}


def test_check_slide_encoder_run():
    specs = check_slide_encoder_run(["prism", "moozy", "mean"], 224, 20)
    assert [s.name for s in specs] == ["prism", "moozy", "mean"]
    with pytest.raises(SlideEncoderMismatchError, match=r"cannot share one run.*titan need 512 px.*prism need 224 px"):
        check_slide_encoder_run(["titan", "prism"])
    with pytest.raises(SlideEncoderMismatchError, match=r"prism.*patch size 224 px \(given 256 px\)"):
        check_slide_encoder_run(["prism", "moozy"], 256, 20)
    check_slide_encoder_run(["mean", "max"], 999, 3)


# ------------------------------------------------------------------ mean / max


@pytest.mark.parametrize("name", ["mean", "max"])
def test_pooling_matches_numpy(name):
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((5000, 37)) * 100 + 1000).astype(np.float32)
    enc = SlideEncoder.load(name)
    out = enc.encode(feats)
    ref = feats.astype(np.float64).mean(0) if name == "mean" else feats.max(0)
    assert out.dtype == np.float32 and out.shape == (37,)
    np.testing.assert_allclose(out, ref.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(enc.encode(feats[:1]), feats[0])  # one patch: itself
    half = enc.encode(feats.astype(np.float16))  # float16 stored features work too
    assert half.dtype == np.float32 and half.shape == (37,)
    attrs = enc.attrs(source_patch_encoder="uni_v1")
    assert attrs["encoder"] == name and attrs["source_patch_encoder"] == "uni_v1"
    assert attrs["weights_sha256"] == "" and attrs["precision"] == "float32" and "torch" in attrs["library_versions"]


@pytest.mark.parametrize("name", ["mean", "max"])
def test_empty_slide_is_a_clear_error(name):
    with pytest.raises(SlideEncoderError, match="slide has 0 patches"):
        SlideEncoder.load(name).encode(np.zeros((0, 16), np.float32))


def test_bad_inputs_are_clear_errors():
    enc = SlideEncoder.load("mean")
    with pytest.raises(SlideEncoderError, match=r"must be \(N, D\)"):
        enc.encode(np.zeros(16, np.float32))
    with pytest.raises(SlideEncoderError, match="NaN"):
        enc.encode(np.array([[1.0, np.nan]], np.float32))


# ------------------------------------------------------------------ unavailable / missing weights


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("gigapath_slide", "prov-gigapath/prov-gigapath"),
        ("madeleine", "mahmoodlab/MADELEINE"),
        ("chief", "hms-dbmi/CHIEF"),
    ],
)
def test_encoders_without_offline_code_say_what_is_needed(name, needle):
    for kw in ({}, {"random_weights": True}):
        with pytest.raises(EncoderUnavailableError) as err:
            SlideEncoder.load(name, **kw)
        assert needle in str(err.value) and "not on PyPI" in str(err.value)


def test_feather_needs_its_snapshot(tmp_path):
    with pytest.raises(EncoderUnavailableError, match="remote code of MahmoodLab/abmil"):
        SlideEncoder.load("feather", random_weights=True)
    with pytest.raises(WeightsNotFoundError, match="slide encoder 'feather'.*never downloaded"):
        SlideEncoder.load("feather", hf_cache_dir=tmp_path / "empty_cache")


@pytest.mark.parametrize(("name", "repo"), [("titan", "MahmoodLab/TITAN"), ("moozy", "AtlasAnalyticsLab/MOOZY")])
def test_missing_weights_are_never_downloaded(name, repo, tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        SlideEncoder.load(name, hf_cache_dir=tmp_path / "empty_cache")
    msg = str(err.value)
    assert f"slide encoder {name!r}" in msg and repo in msg and "never downloaded" in msg


def test_snapshot_without_code_or_weights(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        SlideEncoder.load("titan", weights=tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EncoderUnavailableError, match="holds no remote code"):
        SlideEncoder.load("feather", weights=tmp_path)


# ------------------------------------------------------------------ memory-safe attention


def test_chunked_alibi_attention_equals_dense():
    torch.manual_seed(0)
    h, t, d = 4, 97, 16
    q, k, v = (torch.randn(1, h, t, d) for _ in range(3))
    pts = torch.randint(0, 20, (t, 2)).float()
    slopes = -torch.tensor(alibi_slopes(h))
    dist = torch.cdist(pts.double(), pts.double()).float()
    bias = slopes.view(h, 1, 1) * dist
    bias[:, :2] = 0
    bias[:, :, :2] = 0
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    for max_elements in (1, 3 * h * t, 10**9):  # one row per block, a few rows, everything at once
        out = alibi_attention(q, k, v, pts, slopes, n_prefix=2, max_elements=max_elements)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert alibi_slopes(8) == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(12) == pytest.approx(alibi_slopes(8) + alibi_slopes(16)[0::2][:4])
    if HAS["moozy"]:
        from moozy.models.moozy_slide_encoder import _get_alibi_slopes

        assert alibi_slopes(12) == pytest.approx(_get_alibi_slopes(12))


# ------------------------------------------------------------------ TITAN


@needs["titan"]
def test_titan_random_weights_end_to_end(titan):
    coords = grid_coords(100, 1024)
    feats = np.random.default_rng(0).standard_normal((100, 768)).astype(np.float32)
    out = titan.encode(feats, coords, 1024)
    assert out.shape == (768,) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, titan.encode(feats, coords, 1024))  # deterministic
    perm = np.random.default_rng(1).permutation(100)  # patch order does not matter (grid rebuilt from coords)
    np.testing.assert_allclose(titan.encode(feats[perm], coords[perm], 1024), out, atol=1e-5)
    assert titan.attrs()["weights_source"] == "random"
    with pytest.raises(SlideEncoderMismatchError, match="expects 768-dim features"):
        titan.encode(feats[:, :512], coords, 1024)
    with pytest.raises(SlideEncoderError, match="needs the patch coords"):
        titan.encode(feats)


@needs["titan"]
def test_titan_chunked_path_equals_reference_remote_code(titan):
    from atlaspatch_assets.core.slide_encoders.titan import titan_vision_forward

    coords = torch.from_numpy(grid_coords(150, 1024, seed=3))
    feats = torch.randn(150, 768)
    with torch.inference_mode():
        ref = titan.model.encode_slide_from_patch_features(feats.unsqueeze(0), coords.unsqueeze(0), 1024)[0]
        out = titan_vision_forward(titan.model.vision_encoder, feats, coords, 1024, max_elements=4000)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs["titan"]
def test_titan_loads_weights_and_local_remote_code_snapshot(titan, tmp_path):
    import safetensors.torch
    import unicorn_baseline.vision.pathology.titan as vendored

    coords = grid_coords(60, 1024, seed=5)
    feats = np.random.default_rng(5).standard_normal((60, 768)).astype(np.float32)
    ref = titan.encode(feats, coords, 1024)
    state = {k: v.contiguous() for k, v in titan.model.state_dict().items()}
    state["text_encoder.dummy"] = torch.zeros(2)  # the real checkpoint also holds the text tower

    # weights only (architecture from unicorn-baseline)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    safetensors.torch.save_file(state, str(weights_only / "model.safetensors"))
    enc = SlideEncoder.load("titan", weights=weights_only)
    np.testing.assert_allclose(enc.encode(feats, coords, 1024), ref, atol=1e-5)
    attrs = enc.attrs()
    assert attrs["weights_source"] == "explicit" and len(attrs["weights_sha256"]) == 64

    # a local snapshot with the remote code (the vendored copy of TITAN's modeling files)
    snap = tmp_path / "TITAN"
    snap.mkdir()
    for f in ("configuration_titan.py", "modeling_titan.py", "vision_transformer.py", "conch_v1_5.py"):
        shutil.copy(Path(vendored.__file__).parent / f, snap / f)
    cfg = titan.model.config.to_dict()
    cfg["auto_map"] = {"AutoConfig": "configuration_titan.TitanConfig", "AutoModel": "modeling_titan.Titan"}
    (snap / "config.json").write_text(json.dumps(cfg))
    shutil.copy(weights_only / "model.safetensors", snap / "model.safetensors")
    enc = SlideEncoder.load("titan", weights={"titan": snap})
    assert type(enc.model).__module__.startswith("transformers_modules")  # the snapshot's own code ran
    np.testing.assert_allclose(enc.encode(feats, coords, 1024), ref, atol=1e-5)


# ------------------------------------------------------------------ MOOZY


@needs["moozy"]
def test_moozy_random_weights_end_to_end(moozy):
    coords = grid_coords(100, 448)
    feats = np.random.default_rng(0).standard_normal((100, 384)).astype(np.float32)
    out = moozy.encode(feats, coords, 448)
    assert out.shape == (768,) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, moozy.encode(feats, coords, 448))
    with pytest.raises(SlideEncoderError, match="step is the patch size"):
        moozy.encode(feats, coords // 2, 448)  # overlapping patches (step = half a patch)


@needs["moozy"]
def test_moozy_equals_its_own_h5_pipeline(moozy, tmp_path):
    """Same embedding as moozy.encoding's path: load_stage2_slide_sample(AtlasPatch H5) + encode_case_batch."""
    h5py = pytest.importorskip("h5py")
    from moozy.data.stage2 import build_case_sample, collate_stage2_batch, load_stage2_slide_sample
    from moozy.models.stage2_encoding import encode_case_batch

    coords = grid_coords(120, 448, seed=7)
    feats = np.random.default_rng(7).standard_normal((120, 384)).astype(np.float32)
    feats[5] = 0  # an all-zero row is a background cell for MOOZY
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("coords", data=coords.astype(np.int32))
        fh.create_dataset("features/lunit_vit_small_patch8_dino", data=feats)
        fh.attrs["patch_size_level0"] = 448
        fh.attrs["patch_size"] = 224
    slide = load_stage2_slide_sample("s", str(path), feature_h5_key="lunit_vit_small_patch8_dino")
    with torch.inference_mode():
        cls, *_ = encode_case_batch(
            moozy.model.slide_encoder,
            moozy.model.case_transformer,
            collate_stage2_batch([build_case_sample(slides=[slide])]),
        )
    np.testing.assert_allclose(moozy.encode(feats, coords, 448), cls[0].numpy(), rtol=1e-4, atol=1e-5)


@needs["moozy"]
def test_moozy_patient_is_its_case_transformer_over_all_slides(moozy, tmp_path):
    """encode_case = moozy's own multi-slide case (run_encoding on several H5s), not a mean of slides."""
    h5py = pytest.importorskip("h5py")
    from moozy.data.stage2 import build_case_sample, collate_stage2_batch, load_stage2_slide_sample
    from moozy.models.stage2_encoding import encode_case_batch

    slides, samples = [], []
    for i, n in enumerate((80, 50)):
        coords = grid_coords(n, 448, seed=10 + i)
        feats = np.random.default_rng(10 + i).standard_normal((n, 384)).astype(np.float32)
        slides.append((feats, coords, 448))
        path = tmp_path / f"slide{i}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("coords", data=coords.astype(np.int32))
            fh.create_dataset("features/lunit_vit_small_patch8_dino", data=feats)
            fh.attrs["patch_size_level0"] = 448
            fh.attrs["patch_size"] = 224
        samples.append(load_stage2_slide_sample(f"s{i}", str(path), feature_h5_key="lunit_vit_small_patch8_dino"))
    with torch.inference_mode():
        cls, *_ = encode_case_batch(
            moozy.model.slide_encoder,
            moozy.model.case_transformer,
            collate_stage2_batch([build_case_sample(slides=samples)]),
        )
    case = moozy.encode_case(slides)
    np.testing.assert_allclose(case, cls[0].numpy(), rtol=1e-4, atol=1e-5)
    assert moozy.has_case_model and SLIDE_ENCODERS["moozy"].case_aggregation.startswith("MOOZY case transformer")


def test_encode_case_without_a_case_model_is_the_mean_of_slides():
    enc = SlideEncoder.load("max")
    rng = np.random.default_rng(3)
    slides = [(rng.standard_normal((n, 8)).astype(np.float32), None, None) for n in (5, 9)]
    assert not enc.has_case_model
    np.testing.assert_allclose(enc.encode_case(slides), np.mean([s[0].max(0) for s in slides], axis=0), rtol=1e-6)
    with pytest.raises(SlideEncoderError, match="at least one slide"):
        enc.encode_case([])


@needs["moozy"]
def test_moozy_loads_its_checkpoint_format(moozy, tmp_path):
    from moozy.models.serialization import extract_case_transformer_config, extract_slide_encoder_config

    se, ct = moozy.model.slide_encoder, moozy.model.case_transformer
    payload = {
        "teacher_slide_encoder": se.state_dict(),
        "slide_encoder_config": extract_slide_encoder_config(se),
        "case_transformer": ct.state_dict(),
        "case_transformer_config": extract_case_transformer_config(ct),
    }
    torch.save(payload, tmp_path / "moozy.pt")
    enc = SlideEncoder.load("moozy", weights_dir=tmp_path)  # <dir>/moozy.pt
    coords = grid_coords(50, 448, seed=2)
    feats = np.random.default_rng(2).standard_normal((50, 384)).astype(np.float32)
    np.testing.assert_allclose(enc.encode(feats, coords, 448), moozy.encode(feats, coords, 448), atol=1e-5)
    assert enc.attrs()["weights_source"] == "weights_dir"


# ------------------------------------------------------------------ PRISM


@needs["prism"]
def test_prism_random_weights_end_to_end(prism):
    feats = np.random.default_rng(0).standard_normal((100, 2560)).astype(np.float32)
    out = prism.encode(feats)  # PRISM ignores coordinates
    assert out.shape == (1280,) and out.dtype == np.float32 and np.isfinite(out).all()
    with pytest.raises(SlideEncoderMismatchError, match="expects 2560-dim features from 'virchow_v1'"):
        prism.encode(feats[:, :1280])


@needs["prism"]
def test_prism_loads_a_checkpoint_with_shared_layers_stored_once(prism, tmp_path):
    import safetensors.torch

    from atlaspatch_assets.core.slide_encoders.prism import PREFIX

    seen, state = set(), {}
    for key, tensor in prism.model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # like the published file: one copy per shared layer
            seen.add(id(tensor))
            state[PREFIX + key] = tensor.detach().clone().contiguous()
    state["text_decoder.dummy"] = torch.zeros(3)  # BioGPT weights are ignored
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    enc = SlideEncoder.load("prism", weights=tmp_path / "model.safetensors")
    got, want = enc.model.state_dict(), prism.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    del state[PREFIX + "perceiver.latents"]
    safetensors.torch.save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(Exception, match=r"1 missing \(e.g. \['perceiver.latents'\]\)"):
        SlideEncoder.load("prism", weights=tmp_path / "broken.safetensors")


# ------------------------------------------------------------------ memory safety on a large slide

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch
    name, n = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n / 0.8)))
    cells = rng.choice(side * side, size=n, replace=False)
    if name == "titan":
        from unicorn_baseline.vision.pathology.titan.configuration_titan import TitanConfig
        from unicorn_baseline.vision.pathology.titan.modeling_titan import Titan
        from atlaspatch_assets.core.slide_encoders.titan import titan_vision_forward
        vit = Titan(TitanConfig(vision_config=dict(depth=1))).eval().vision_encoder
        coords = torch.from_numpy(np.stack([cells % side, cells // side], 1) * 1024)
        feats = torch.randn(n, 768)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            out = titan_vision_forward(vit, feats, coords, 1024)
    else:
        from moozy.models.moozy_slide_encoder import MOOZYSlideEncoder
        from atlaspatch_assets.core.slide_encoders.moozy import moozy_slide_cls
        se = MOOZYSlideEncoder(n_layers=1, num_registers=4).eval()
        pos = torch.from_numpy(np.stack([cells % side, cells // side], 1) * 448).float()
        feats = torch.randn(n, 384)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            out = moozy_slide_cls(se, feats, pos, 448)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (peak - before) / 1024, "finite": bool(torch.isfinite(out).all())}))
    """
)


@pytest.mark.parametrize("name", ["titan", "moozy"])
def test_large_slide_memory_is_bounded(name):
    """6000 patches: the reference dense ALiBi path needs > 1.5 GiB per layer (TITAN ~6 GiB); chunked stays small."""
    if not HAS[name]:
        pytest.skip(f"{name} architecture package not installed")
    n = 6000
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, name, str(n)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    dense_gib = (n + 5) ** 2 * 12 * 4 / 2**30  # just the float32 (1, 12, N, N) bias both models build
    assert dense_gib > 1.5
    assert res["finite"] and res["extra_mib"] < 600, res
