"""The per-slide assets: `tissue_mask → patch_coords → features/<encoder> → slide_features/<name>`,
partitioned by slide, as one subsettable multi-asset so that a run's slides go through every
selected stage in one step (`core.stages.run_slide`), each encoder's pixels are read once, and
a slide that fails stops only its own downstream stages (see `defs.adapter` for what the UI shows).
"""

import os
import warnings
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    BackfillPolicy,
    Config,
    multi_asset,
)
from pydantic import Field

from ...core.params import check_params
from ...core.stages import (
    CoordsParams,
    FeatureParams,
    MaskParams,
    SlideEmbeddingParams,
    SlideTarget,
    StageEnv,
    StagePlan,
)
from ..adapter import PartitionReporter, asset_key, dagster_ref, interruptible, selected_names
from ..config import derive, to_params
from ..execution import execute_locally, resolve_refs
from ..partitions import slides_partitions
from ..resources import ComputeResource, ModelsResource, ReporterResource, SlideSourceResource, StoreResource
from ..slurm import SlurmResource

BACKFILL_BATCH_ENV = "ATLASPATCH_BACKFILL_BATCH"
DEFAULT_BATCH_SIZE = 25
STEP = "slide_stages"


def backfill_batch_size() -> int:
    """Slides per backfill run: $ATLASPATCH_BACKFILL_BATCH (an integer >= 1), default 25.

    Read when the code location loads (set it for the webserver/daemon/run processes alike).
    """
    raw = os.environ.get(BACKFILL_BATCH_ENV, "").strip()
    if not raw:
        return DEFAULT_BATCH_SIZE
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        warnings.warn(f"{BACKFILL_BATCH_ENV}={raw!r} is not an integer >= 1; using {DEFAULT_BATCH_SIZE}", stacklevel=2)
        return DEFAULT_BATCH_SIZE
    return value


MaskConfig = derive(Config, MaskParams, "MaskConfig")
CoordsConfig = derive(Config, CoordsParams, "CoordsConfig")
FeaturesConfig = derive(Config, FeatureParams, "FeaturesConfig")
SlideFeaturesConfig = derive(Config, SlideEmbeddingParams, "SlideFeaturesConfig")


class SlideStagesConfig(Config):
    """Run config of the per-slide stages (one section per stage; fields = the core parameters)."""

    tissue_mask: MaskConfig = Field(default_factory=MaskConfig)  # type: ignore[valid-type]
    patch_coords: CoordsConfig = Field(default_factory=CoordsConfig)  # type: ignore[valid-type]
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)  # type: ignore[valid-type]
    slide_features: SlideFeaturesConfig = Field(default_factory=SlideFeaturesConfig)  # type: ignore[valid-type]


def encoder_key(name: str) -> AssetKey:
    return AssetKey(["features", name])


def slide_key(target: SlideTarget) -> AssetKey:
    return AssetKey(["slide_features", target.name])


def _cannot_run(asset: str, cannot_run: dict[str, str]) -> dict[str, Any]:
    """Description prefix and metadata saying why an asset cannot run on this deployment."""
    why = cannot_run.get(asset)
    return {"why": why, "md": {"cannot_run_here": why} if why else {}}


def _specs(
    encoders: Sequence[str], targets: Sequence[SlideTarget], registry: Any, cannot_run: dict[str, str]
) -> list[AssetSpec]:
    common: dict[str, Any] = {"partitions_def": slides_partitions}
    specs = [
        AssetSpec(
            "tissue_mask",
            group_name="slides",
            code_version="1",
            kinds={"python", "hdf5"},
            description="Tissue mask on a thumbnail at a fixed physical resolution (tissue/mask + GeoJSON contours).",
            **common,
        ),
        AssetSpec(
            "patch_coords",
            deps=[AssetDep("tissue_mask")],
            group_name="slides",
            code_version="1",
            kinds={"python", "hdf5"},
            description="Level-0 patch lattice with per-patch tissue fraction (coords, coords_ext, tissue_fraction).",
            **common,
        ),
    ]
    for name in encoders:
        spec = registry[name]
        c = _cannot_run(f"features/{name}", cannot_run)
        warn = f"CANNOT RUN HERE: {c['why']} — " if c["why"] else ""
        specs.append(
            AssetSpec(
                encoder_key(name),
                deps=[AssetDep("patch_coords")],
                group_name="features",
                code_version=f"1-{name}",
                kinds={"pytorch", "hdf5"},
                description=f"{warn}{name} patch features ({spec.dim}-d, {spec.input_size}px input, {spec.library}).",
                metadata={"dim": spec.dim, "model_id": spec.model_id or "", "library": spec.library, **c["md"]},
                **common,
            )
        )
    for t in targets:
        from ...core.slide_encoders import get_slide_encoder_spec  # torch: only when there are targets

        sspec = get_slide_encoder_spec(t.slide_encoder)
        c = _cannot_run(t.asset, cannot_run)
        warn = f"CANNOT RUN HERE: {c['why']} — " if c["why"] else ""
        specs.append(
            AssetSpec(
                slide_key(t),
                deps=[AssetDep(encoder_key(t.patch_encoder))],
                group_name="slide_features",
                code_version=f"1-{t.name}",
                kinds={"pytorch", "hdf5"},
                description=f"{warn}{t.name} slide embedding from features/{t.patch_encoder} ({sspec.requirement()}).",
                metadata={"slide_encoder": t.slide_encoder, "patch_encoder": t.patch_encoder, **c["md"]},
                **common,
            )
        )
    return [s.with_io_manager_key("slide_store_io") for s in specs]


def _check_specs(encoders: Sequence[str]) -> list[AssetCheckSpec]:
    common: dict[str, Any] = {"partitions_def": slides_partitions}
    checks = [
        AssetCheckSpec("has_tissue", asset="tissue_mask", description="The mask finds tissue.", **common),
        AssetCheckSpec(
            "has_patches", asset="patch_coords", description="Coordinates exist and are non-empty.", **common
        ),
    ]
    checks += [
        AssetCheckSpec(
            "rows_match_patches_and_finite",
            asset=encoder_key(n),
            description="One finite feature row per patch.",
            **common,
        )
        for n in encoders
    ]
    return checks


def plan_for(context: AssetExecutionContext, config: SlideStagesConfig, compute: Any, targets: Sequence[SlideTarget]):
    """The stage plan of this step: the selected assets with the run's parameters."""
    keys = context.selected_asset_keys
    mask = to_params(MaskParams, config.tissue_mask) if AssetKey("tissue_mask") in keys else None
    coords = to_params(CoordsParams, config.patch_coords) if AssetKey("patch_coords") in keys else None
    plan = StagePlan(
        mask=mask,
        coords=coords,
        encoders=tuple(selected_names(context, "features")),
        features=to_params(FeatureParams, config.features),
        targets=tuple(t for t in targets if slide_key(t) in keys),
        embedding=to_params(SlideEmbeddingParams, config.slide_features),
        compute=compute.params(),
    )
    for p in (plan.mask, plan.coords, plan.features, plan.embedding, plan.compute):
        if p is not None:
            check_params(p)
    return plan


def build_slide_assets(
    encoders: Sequence[str], targets: Sequence[SlideTarget], registry: Any, cannot_run: dict[str, str] | None = None
) -> Any:
    """The `slide_stages` multi-asset for these patch encoders and slide-embedding targets."""
    encoders = sorted(dict.fromkeys(encoders))
    targets = list(dict.fromkeys(targets))

    @multi_asset(
        name=STEP,
        specs=_specs(encoders, targets, registry, cannot_run or {}),
        check_specs=_check_specs(encoders),
        can_subset=True,
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=backfill_batch_size()),
    )
    def slide_stages(
        context: AssetExecutionContext,
        config: SlideStagesConfig,
        store: StoreResource,
        slide_source: SlideSourceResource,
        compute: ComputeResource,
        models: ModelsResource,
        reporter: ReporterResource,
        slurm: SlurmResource,
    ):
        from dagster import Failure

        from ...core.errors import UsageError

        try:
            plan = plan_for(context, config, compute, targets)
        except UsageError as e:
            raise Failure(description=dagster_ref_text(e.raw), allow_retries=False) from e
        layout = store.layout
        if swept := layout.sweep_orphans():
            context.log.info(f"removed {swept} temporary file(s) left by killed writers in {layout.root}")
        env = StageEnv(
            layout=layout,
            catalog=store.catalog,
            run_id=context.run.run_id,
            render=reporter.renderer() or dagster_ref,
            logger=context.log,
            on_progress=reporter.progress_callback(),
        )
        out = PartitionReporter(context, layout)

        def report(sid: str, outcomes: list) -> None:
            out.report(sid, outcomes)
            reporter.outcomes(sid, outcomes)

        with interruptible(context, out):
            refs = resolve_refs(list(context.partition_keys), plan, env, slide_source)
            execute = slurm.executor(context) if slurm.enabled else execute_locally  # same signature
            execute(refs, plan, env, models, report)
        out.finish()
        yield from ()

    return slide_stages


def dagster_ref_text(text: str) -> str:
    from ...core.params import render_refs

    return render_refs(" ".join(text.split()), dagster_ref)


__all__ = ["asset_key", "build_slide_assets", "encoder_key", "slide_key"]
