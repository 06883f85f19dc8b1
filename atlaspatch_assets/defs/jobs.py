"""Jobs: subsets of the slide stages (one step each) and the patient stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dagster import AssetKey, AssetSelection, define_asset_job

SEGMENT_AND_COORDS = "segment_and_get_coords"  # mask → coords (CLI, sensor, demo)
PROCESS = "process"  # mask → coords → features/<encoders>
ENCODE_SLIDE = "encode_slide"  # … → features → slide_features/<names>
ENCODE_PATIENT = "encode_patient"  # patient_features/<names> over the patients partitions
NEW_SLIDES_JOB = "new_slides_job"  # mask → coords → $ATLASPATCH_SENSOR_ENCODERS

SLIDE_GEOMETRY = (AssetKey("tissue_mask"), AssetKey("patch_coords"))

DESCRIPTIONS = {
    SEGMENT_AND_COORDS: "Tissue mask and patch coordinates for the selected slides.",
    PROCESS: "Mask, coordinates and patch features (select the encoders you need).",
    ENCODE_SLIDE: "Mask → coords → patch features → slide embeddings.",
    ENCODE_PATIENT: "Patient embeddings over the patients partitions.",
    NEW_SLIDES_JOB: "What the new_slides sensor runs: mask, coordinates, default encoders.",
}


GPU_TAG = "atlaspatch/gpu"  # runs that load models; dagster.yaml's run queue limits them (one GPU)


def slide_job(name: str, *extra: Sequence[AssetKey]) -> Any:
    keys = [*SLIDE_GEOMETRY, *(k for group in extra for k in group)]
    # The per-slide stages are one step, so a Dagster pool cannot single out their GPU part:
    # jobs that run models carry a run tag the run queue counts instead.
    tags = {GPU_TAG: "true"} if any(k.path[0] in ("features", "slide_features") for g in extra for k in g) else {}
    return define_asset_job(name, selection=AssetSelection.assets(*keys), description=DESCRIPTIONS[name], tags=tags)


def patient_job(keys: Sequence[AssetKey]) -> Any:
    return define_asset_job(
        ENCODE_PATIENT, selection=AssetSelection.assets(*keys), description=DESCRIPTIONS[ENCODE_PATIENT]
    )
