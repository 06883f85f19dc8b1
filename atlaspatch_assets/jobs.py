"""Jobs: the default slide job (mask → coords) used by the CLI, the sensor and the demo."""

from dagster import AssetSelection, define_asset_job

SEGMENT_AND_COORDS = "segment_and_get_coords"
NEW_SLIDES_JOB = "new_slides_job"  # mask → coords → $ATLASPATCH_SENSOR_ENCODERS
PROCESS = "process"  # mask → coords → features/<encoders> (defined with the encoder assets)

segment_and_coords_job = define_asset_job(
    SEGMENT_AND_COORDS,
    selection=AssetSelection.assets("tissue_mask", "patch_coords"),
    description="Tissue mask and patch coordinates for the selected slides.",
)
