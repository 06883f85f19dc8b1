"""The pipeline's stages (Dagster-free): one typed parameters object and one function per step.

    tissue_mask(slide, MaskParams, env)              → Outcome
    patch_coords(slide, CoordsParams, env)           → Outcome
    patch_features(slide, encoders, FeatureParams, ComputeParams, env) → one Outcome per encoder
    slide_embedding(slide_id, target, encoder, SlideEmbeddingParams, env) → Outcome
    patient_embedding(case_id, slide_ids, target, encoder, env)         → Outcome

Each skips by stored recipe, computes, saves atomically and then records its catalog event.
`run_slide(slide, StagePlan, env)` chains them for one slide; the CLI, the Dagster assets, the
sensor's runs and Slurm jobs all go through it.
"""

from .base import DONE, FAILED, SKIPPED, Outcome, StageEnv, StageInterrupted
from .compute import ComputeParams, ModelCache, ModelParams
from .coords import CoordsParams, CoordsResult, load_patch_coords, patch_coords
from .embeddings import (
    Manifest,
    SlideEmbeddingParams,
    SlideEncoderPlan,
    SlideTarget,
    parse_target,
    patient_embedding,
    plan_slide_encoders,
    read_manifest,
    slide_embedding,
)
from .features import FeatureParams, FeatureResult, load_features, patch_features
from .mask import MaskParams, MaskResult, load_tissue_mask, tissue_mask
from .runner import StagePlan, run_patients, run_slide, run_slides

__all__ = [
    "DONE",
    "FAILED",
    "SKIPPED",
    "ComputeParams",
    "CoordsParams",
    "CoordsResult",
    "FeatureParams",
    "FeatureResult",
    "Manifest",
    "MaskParams",
    "MaskResult",
    "ModelCache",
    "ModelParams",
    "Outcome",
    "SlideEmbeddingParams",
    "SlideEncoderPlan",
    "SlideTarget",
    "StageEnv",
    "StageInterrupted",
    "StagePlan",
    "load_features",
    "load_patch_coords",
    "load_tissue_mask",
    "parse_target",
    "patch_coords",
    "patch_features",
    "patient_embedding",
    "plan_slide_encoders",
    "read_manifest",
    "run_patients",
    "run_slide",
    "run_slides",
    "slide_embedding",
    "tissue_mask",
]
