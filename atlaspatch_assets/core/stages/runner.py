"""A slide through the stages of a plan, in dependency order: mask → coords → features (every
encoder in one read pass) → slide embeddings. A stage whose upstream failed in this run is not
run and fails with the upstream's reason; the others go on. This is what the Dagster assets, the
CLI, the sensor's runs and a Slurm job execute."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..source import SlideHandle, SlideRef
from .base import Outcome, StageEnv, not_run
from .compute import ComputeParams, ModelCache
from .coords import CoordsParams, patch_coords
from .embeddings import SlideEmbeddingParams, SlideTarget, patient_embedding, slide_embedding
from .features import FeatureParams, asset_name, patch_features
from .mask import MaskParams, tissue_mask


@dataclass(frozen=True)
class StagePlan:
    """Which stages run for each slide, with which parameters."""

    mask: MaskParams | None = None
    coords: CoordsParams | None = None
    encoders: tuple[str, ...] = ()
    features: FeatureParams = field(default_factory=FeatureParams)
    targets: tuple[SlideTarget, ...] = ()
    embedding: SlideEmbeddingParams = field(default_factory=SlideEmbeddingParams)
    compute: ComputeParams = field(default_factory=ComputeParams)

    @property
    def assets(self) -> list[str]:
        """Asset names in execution order."""
        out = (["tissue_mask"] if self.mask else []) + (["patch_coords"] if self.coords else [])
        return out + [asset_name(e) for e in self.encoders] + [t.asset for t in self.targets]


def _blocker(*outs: Outcome | None) -> Outcome | None:
    return next((o for o in outs if o is not None and not o.ok), None)


def run_slide(slide: SlideRef, plan: StagePlan, env: StageEnv, models: ModelCache | None = None) -> list[Outcome]:
    """Every planned stage for one slide; one outcome per planned asset, in `plan.assets` order."""
    models = models or ModelCache()
    sid = slide.slide_id
    outs: list[Outcome] = []
    mask_out = coords_out = None
    with SlideHandle(slide) as handle:
        if plan.mask is not None:
            mask_out = tissue_mask(handle, plan.mask, env, device=plan.compute.device)
            outs.append(mask_out)
        if plan.coords is not None:
            if (b := _blocker(mask_out)) is not None:
                coords_out = not_run("patch_coords", sid, b, env)
            else:
                coords_out = patch_coords(handle, plan.coords, env, mask=mask_out.value if mask_out else None)
            outs.append(coords_out)
        features: dict[str, Outcome] = {}
        if plan.encoders:
            if (b := _blocker(mask_out, coords_out)) is not None:
                features = {e: not_run(asset_name(e), sid, b, env) for e in plan.encoders}
            else:
                device, precision = plan.compute.model_device, plan.compute.model_precision
                encoders = {e: models.patch_encoder(e, device, precision) for e in plan.encoders}
                coords = coords_out.value if coords_out is not None else None
                for o in patch_features(handle, encoders, plan.features, plan.compute, env, coords=coords):
                    features[o.asset.removeprefix("features/")] = o
            outs += [features[e] for e in plan.encoders]
    for t in plan.targets:
        if (b := _blocker(mask_out, coords_out, features.get(t.patch_encoder))) is not None:
            outs.append(not_run(t.asset, sid, b, env))
        else:
            encoder = models.slide_encoder(t.slide_encoder, plan.compute.model_device)
            outs.append(slide_embedding(sid, t, encoder, plan.embedding, env))
    return outs


def run_slides(
    slides: Iterable[SlideRef],
    plan: StagePlan,
    env: StageEnv,
    models: ModelCache | None = None,
    on_slide: Callable[[SlideRef, list[Outcome]], None] | None = None,
) -> dict[str, list[Outcome]]:
    """`run_slide` for each slide (models loaded once); outcomes by slide id."""
    models = models or ModelCache()
    out: dict[str, list[Outcome]] = {}
    for s in slides:
        out[s.slide_id] = run_slide(s, plan, env, models)
        if on_slide is not None:
            on_slide(s, out[s.slide_id])
    return out


def run_patients(
    cases: Mapping[str, Sequence[str] | None],
    targets: Sequence[SlideTarget],
    env: StageEnv,
    compute: ComputeParams | None = None,
    models: ModelCache | None = None,
) -> dict[str, list[Outcome]]:
    """Patient embeddings of each case for each target (cases → slide ids; None = not registered)."""
    from .embeddings import needs_case_model

    compute = compute or ComputeParams()
    models = models or ModelCache()
    out: dict[str, list[Outcome]] = {}
    for case_id, slide_ids in cases.items():
        outs = []
        for t in targets:
            encoder = models.slide_encoder(t.slide_encoder, compute.model_device) if needs_case_model(t) else None
            outs.append(patient_embedding(case_id, slide_ids, t, encoder, env))
        out[case_id] = outs
    return out
