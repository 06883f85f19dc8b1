"""Functions run in child processes (importable by spawn/forkserver children)."""

from __future__ import annotations

import os
from pathlib import Path

PRELOAD = [
    "torch",
    "torchvision",
    "h5py",
    "atlaspatch_assets.core.stages",
    "atlaspatch_assets.core.encoders",
    "atlaspatch_assets.core.catalog",
    "reliability.workers",
]


def run_stages(output: str, slide: str, slide_id: str, patch: int, step: int, stage: str, encoder: str) -> None:
    """The real stages on one slide with a forced recompute of `stage` (coords or features):
    compute, atomic store write, then the catalog event — what a killed process was doing."""
    import torch

    torch.set_num_threads(1)
    from atlaspatch_assets.core.catalog import Catalog
    from atlaspatch_assets.core.source import SlideRef
    from atlaspatch_assets.core.stages import CoordsParams, FeatureParams, MaskParams, StageEnv, StagePlan, run_slide
    from atlaspatch_assets.core.store import RunLayout

    out = Path(output)
    layout = RunLayout.create(out, patch, step, target_mag=20)
    env = StageEnv(layout=layout, catalog=Catalog(out / "catalog"), run_id=f"pid-{os.getpid()}")
    plan = StagePlan(
        mask=MaskParams(),
        coords=CoordsParams(skip_existing=stage != "coords"),
        encoders=(encoder,) if stage == "features" else (),
        features=FeatureParams(skip_existing=stage != "features"),
    )
    outs = run_slide(SlideRef(slide_id, slide), plan, env)
    bad = [o.reason for o in outs if not o.ok]
    if bad:
        raise RuntimeError("; ".join(bad))
