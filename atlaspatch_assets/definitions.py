"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

from dagster import Definitions

from .assets import patch_coords, tissue_mask
from .checks import has_patches, has_tissue
from .io_managers import SlideStoreIOManager
from .jobs import segment_and_coords_job
from .resources import ComputeResource, SlideSourceResource, StoreResource


def build_definitions(
    store: StoreResource | None = None,
    slide_source: SlideSourceResource | None = None,
    compute: ComputeResource | None = None,
) -> Definitions:
    store = store or StoreResource()
    return Definitions(
        assets=[tissue_mask, patch_coords],
        asset_checks=[has_tissue, has_patches],
        jobs=[segment_and_coords_job],
        resources={
            "store": store,
            "slide_source": slide_source or SlideSourceResource(output_dir=store.output_dir),
            "compute": compute or ComputeResource(),
            "slide_store_io": SlideStoreIOManager(store=store),
        },
    )


defs = build_definitions()
