"""`patch_store/<kind>` (png, hdf5, lmdb): training patch stores of the stored coordinates, one asset per
kind, partitioned by slide, each partition written atomically by `core.training.patch_export` and
reported through the shared adapter (a slide that fails is Failed with its reason, the others
Materialized)."""

import os
from typing import Any

from dagster import AssetDep, AssetExecutionContext, AssetSpec, BackfillPolicy, Config, Failure, multi_asset

from ...core.errors import UsageError
from ...core.params import split_names
from ...core.training.patch_export import PatchExport, PatchStoreParams, asset_name
from ...core.training.patch_stores import STORES
from ..adapter import PartitionReporter, asset_key, dagster_ref
from ..config import derive, to_params
from ..partitions import slides_partitions
from ..resources import StoreResource
from .slides import backfill_batch_size, dagster_ref_text

# The kind is the asset; the other parameters are its run config.
PatchStoreConfig = derive(Config, PatchStoreParams, "PatchStoreConfig", exclude=("format",))


def build_patch_store_asset(kind: str) -> Any:
    spec = AssetSpec(
        asset_key(asset_name(kind)),
        deps=[AssetDep("patch_coords")],
        partitions_def=slides_partitions,
        group_name="training",
        code_version="1",
        kinds={"python", kind},
        description=f"Training patch store ({STORES[kind].summary}) of the stored coordinates, per slide.",
    )

    @multi_asset(
        name=f"patch_store_{kind}",
        specs=[spec],
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=backfill_batch_size()),
    )
    def patch_store(context: AssetExecutionContext, config: PatchStoreConfig, store: StoreResource):  # type: ignore[valid-type]
        from ...core.stages import StageEnv

        layout = store.layout
        env = StageEnv(layout=layout, catalog=store.catalog, run_id=context.run.run_id, render=dagster_ref)
        env.logger = context.log
        try:
            export = PatchExport(layout, to_params(PatchStoreParams, config, format=kind), env)
        except UsageError as e:  # the whole store (destination, labels): every partition of the step fails
            raise Failure(description=dagster_ref_text(str(e)), allow_retries=False) from e
        out = PartitionReporter(context)
        for sid in context.partition_keys:
            out.report(sid, [export.slide(sid)])
        out.finish()
        yield from ()

    return patch_store


PATCH_STORES_ENV = "ATLASPATCH_PATCH_STORES"


def configured_patch_stores() -> list[str]:
    """$ATLASPATCH_PATCH_STORES: which `patch_store/<kind>` assets exist (default all; `none`)."""
    raw = os.environ.get(PATCH_STORES_ENV)
    if raw is None or not raw.strip():
        return list(STORES)
    kinds = [k for k in split_names(raw) if k != "none"]
    unknown = sorted(set(kinds) - set(STORES))
    if unknown:
        raise ValueError(f"${PATCH_STORES_ENV}: unknown patch store kind(s) {unknown}; choose from {list(STORES)}")
    return kinds


def patch_store_assets() -> list[Any]:
    return [build_patch_store_asset(k) for k in configured_patch_stores()]
