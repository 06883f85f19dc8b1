"""Plans, slides, layouts and outcomes survive the JSON round trip a Slurm job makes."""

from __future__ import annotations

import json
from pathlib import Path

from atlaspatch_assets.core.params import ref
from atlaspatch_assets.core.source import SlideRef
from atlaspatch_assets.core.stages import (
    ComputeParams,
    CoordsParams,
    FeatureParams,
    MaskParams,
    ModelParams,
    Outcome,
    SlideTarget,
    StagePlan,
)
from atlaspatch_assets.core.stages.serialize import (
    layout_from_dict,
    layout_to_dict,
    outcome_from_dict,
    outcome_to_dict,
    params_from_dict,
    params_to_dict,
    plan_from_dict,
    plan_to_dict,
    ref_from_dict,
    ref_to_dict,
    render_table,
    table_renderer,
)
from atlaspatch_assets.core.store import RunLayout
from atlaspatch_assets.defs.adapter import dagster_ref


def _json(d: dict) -> dict:
    return json.loads(json.dumps(d))  # what a file or a Pipes message carries


def test_plan_round_trip() -> None:
    plan = StagePlan(
        mask=MaskParams(method="otsu", tissue_thresh=0.02, visualize_mask=True, device="cuda:1"),
        coords=CoordsParams(min_tissue_fraction=0.3, fast_mode=False, patch_workers=3),
        encoders=("mobilenet_v2", "uni_v1"),
        features=FeatureParams(store_dtype="float16", scaled_decode=True),
        targets=(SlideTarget("mean", "mobilenet_v2"), SlideTarget("titan", "conch_v15")),
        compute=ComputeParams(device="cuda", batch_size=8, precision="bfloat16"),
    )
    back = plan_from_dict(_json(plan_to_dict(plan)))
    assert back == plan
    assert back.assets == plan.assets
    assert plan_from_dict(_json(plan_to_dict(StagePlan(encoders=("resnet50",))))) == StagePlan(encoders=("resnet50",))


def test_outcome_round_trip_keeps_metadata_and_preview_bytes() -> None:
    import numpy as np

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    o = Outcome(
        asset="features/mobilenet_v2",
        slide_id="cmu",
        status="done",
        metadata={"rows": np.int64(32), "preview": png, "mpp": 0.499, "levels": (1, 2), "path": Path("/x/y.h5")},
        warnings=["low tissue"],
        written=["/x/y.h5"],
        seconds=1.25,
        recipe_hash="abc",
        parent_hashes={"patch_coords": "def"},
        rows=32,
        dim=1280,
        parameters={"batch_size": 32},
        weights_hash="w",
        versions={"torch": "2"},
        value=object(),  # in-memory only: stays behind
    )
    back = outcome_from_dict(_json(outcome_to_dict(o)))
    assert back.metadata == {"rows": 32, "preview": png, "mpp": 0.499, "levels": [1, 2], "path": "/x/y.h5"}
    assert back.value is None
    for name in ("asset", "slide_id", "status", "warnings", "written", "seconds", "recipe_hash", "parent_hashes"):
        assert getattr(back, name) == getattr(o, name)
    assert (back.rows, back.dim, back.parameters, back.weights_hash, back.versions) == (
        32,
        1280,
        {"batch_size": 32},
        "w",
        {"torch": "2"},
    )
    failed = Outcome("tissue_mask", "bad", "failed", reason="bad: [open] cannot open", transient=True)
    assert outcome_from_dict(_json(outcome_to_dict(failed))) == failed


def test_refs_layout_and_params_round_trip(tmp_path: Path) -> None:
    r = SlideRef("cmu", "/slides/cmu.svs", 0.25)
    assert ref_from_dict(_json(ref_to_dict(r))) == r
    layout = RunLayout.create(tmp_path, 256, 224, target_mag=20)
    back = layout_from_dict(_json(layout_to_dict(layout)))
    assert back == layout and back.root == layout.root
    m = ModelParams(weights_dir="/w", encoder_weights={"uni_v1": "/w/uni.bin"}, plugins=["/p.py"])
    assert params_from_dict(ModelParams, _json(params_to_dict(m))) == m


def test_render_table_names_parameters_like_the_renderer() -> None:
    table = render_table(dagster_ref)
    render = table_renderer(_json(table))
    for section, name in (("slide_source", "mpp_csv"), ("store", "patch_size"), ("features", "encoders")):
        assert render(section, name) == dagster_ref(section, name)
    assert render("unknown", "x") == "unknown.x"
    from atlaspatch_assets.core.params import render_refs

    msg = f"set {ref('tissue_mask', 'tissue_thresh')}"
    assert render_refs(msg, render) == render_refs(msg, dagster_ref)
