"""Jobs: the default slide job (mask → coords) used by the CLI, the sensor and the demo."""

from dagster import AssetSelection, define_asset_job

SEGMENT_AND_COORDS = "segment_and_get_coords"
NEW_SLIDES_JOB = "new_slides_job"  # mask → coords → $ATLASPATCH_SENSOR_ENCODERS
# The jobs below are defined in definitions.py together with the encoder assets they select.
PROCESS = "process"  # mask → coords → features/<encoders>
ENCODE_SLIDE = "encode_slide"  # … → features → slide_features/<names>
ENCODE_PATIENT = "encode_patient"  # patient_features/<names> over the patients partitions

segment_and_coords_job = define_asset_job(
    SEGMENT_AND_COORDS,
    selection=AssetSelection.assets("tissue_mask", "patch_coords"),
    description="Tissue mask and patch coordinates for the selected slides.",
)
