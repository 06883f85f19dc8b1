"""Slide and patient embeddings from stored patch features (no Dagster).

`slide_features/<name>` in the slide's store holds one (D,) vector per slide encoder; for the
pooling encoders (`mean`, `max`), which work on any patch encoder, the name carries the patch
encoder: `mean_uni_v1`. Patient embeddings, one file per case at
`<run>/patient_features/<name>/<case_id>.h5`, come from the model's own case-level aggregator
when it has one (MOOZY's case transformer over all the case's slides), else they are the mean
of the case's slide embeddings.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .errors import SlideError
from .features import feature_path
from .pipeline import COORDS, RunLayout
from .storage import DatasetWrite, recipe_hash, write_file_atomic

SLIDE_FEATURES = "slide_features"
POOLING = ("mean", "max")


class SlideFeatureError(SlideError):
    stage = "slide_features"


@dataclass(frozen=True)
class SlideTarget:
    """A slide-level output: which slide encoder, on which patch encoder, stored under which name."""

    slide_encoder: str
    patch_encoder: str

    @property
    def name(self) -> str:
        return f"{self.slide_encoder}_{self.patch_encoder}" if self.slide_encoder in POOLING else self.slide_encoder


def parse_target(name: str, default_patch_encoder: str | None = None) -> SlideTarget:
    """`titan` → titan on its own patch encoder; `mean_uni_v1` / `mean` + default → pooling."""
    from .slide_encoders import get_slide_encoder_spec

    for pool in POOLING:
        if name.startswith(pool + "_"):
            return SlideTarget(pool, name[len(pool) + 1 :])
    spec = get_slide_encoder_spec(name)
    patch = spec.patch_encoder or default_patch_encoder
    if not patch:
        raise SlideFeatureError(
            f"slide encoder {spec.name!r} pools any patch encoder: say which, e.g. {spec.name}_uni_v1"
        )
    return SlideTarget(spec.name, patch)


def slide_feature_path(target: SlideTarget) -> str:
    return f"{SLIDE_FEATURES}/{target.name}"


@dataclass
class SlideFeatureResult:
    slide_id: str
    target: SlideTarget
    vector: np.ndarray
    attrs: dict[str, Any]
    seconds: float = 0.0
    reused: bool = False


def slide_recipe(encoder: Any, target: SlideTarget, features_hash: str) -> dict[str, Any]:
    return {
        "stage": "slide_features",
        "version": 1,
        "slide_encoder": target.slide_encoder,
        "patch_encoder": target.patch_encoder,
        "weights_sha256": getattr(encoder, "weights_sha256", None) or "",
        "precision": getattr(encoder, "precision", "float32"),
        "features_recipe": features_hash,
    }


def stored_slide_recipe(layout: RunLayout, slide_id: str, target: SlideTarget) -> str | None:
    return layout.store(slide_id).dataset_attrs(slide_feature_path(target)).get("recipe_hash") or None


def patch_features_recipe(layout: RunLayout, slide_id: str, patch_encoder: str) -> str | None:
    return layout.store(slide_id).dataset_attrs(feature_path(patch_encoder)).get("recipe_hash") or None


def encode_slide(layout: RunLayout, slide_id: str, encoder: Any, target: SlideTarget) -> SlideFeatureResult:
    """Encode one slide from its stored `features/<patch encoder>` and coords."""
    t0 = time.perf_counter()
    store = layout.store(slide_id)
    fpath = feature_path(target.patch_encoder)
    if not store.has(fpath):
        raise SlideFeatureError(
            f"no {fpath} in {store.path}: compute it with --feature-extractors {target.patch_encoder}", slide=slide_id
        )
    attrs = store.attrs()
    encoder.check_compatible(target.patch_encoder, int(attrs["patch_size"]), float(attrs["target_magnification"]))
    feats, fattrs = store.read(fpath)
    coords, _ = store.read(COORDS)
    try:
        vector = encoder.encode(feats, coords.reshape(-1, 2), int(attrs["patch_size_level0"]))
    except SlideError:
        raise
    except Exception as e:
        raise SlideFeatureError(f"{target.name}: {type(e).__name__}: {e}", slide=slide_id) from e
    recipe = slide_recipe(encoder, target, str(fattrs.get("recipe_hash", "")))
    out_attrs = {
        **{k: v for k, v in encoder.attrs(target.patch_encoder).items() if k != "name"},
        "encoder": target.name,
        "slide_encoder": target.slide_encoder,
        "patch_encoder": target.patch_encoder,
        "source_patch_encoder": target.patch_encoder,
        "num_patches": int(feats.shape[0]),
        "patch_size": int(attrs["patch_size"]),
        "target_magnification": float(attrs["target_magnification"]),
        "patch_size_level0": int(attrs["patch_size_level0"]),
        "recipe": recipe,
        "recipe_hash": recipe_hash(recipe),
        "software_version": __version__,
    }
    return SlideFeatureResult(
        slide_id, target, np.asarray(vector, np.float32), out_attrs, seconds=time.perf_counter() - t0
    )


def save_slide_features(layout: RunLayout, results: Sequence[SlideFeatureResult]) -> None:
    todo = [r for r in results if not r.reused]
    if todo:
        layout.store(todo[0].slide_id).write(
            {slide_feature_path(r.target): DatasetWrite(r.vector, r.attrs) for r in todo}
        )


# -- patients -----------------------------------------------------------------------------------


@dataclass
class PatientResult:
    case_id: str
    name: str
    path: Path | None = None
    status: str = "done"
    error: str = ""
    slide_ids: list[str] = field(default_factory=list)


def patients_dir(layout: RunLayout) -> Path:
    return layout.root / "patient_features"


def patient_path(layout: RunLayout, name: str, case_id: str) -> Path:
    return patients_dir(layout) / name / f"{case_id}.h5"


def patients_manifest_path(layout: RunLayout) -> Path:
    return patients_dir(layout) / "patients.json"


def load_patients(layout: RunLayout) -> dict[str, list[str]]:
    """case_id → slide ids, as registered by `atlaspatch encode-patient`."""
    p = patients_manifest_path(layout)
    return json.loads(p.read_text()) if p.is_file() else {}


def register_patients(layout: RunLayout, cases: Mapping[str, Sequence[str]]) -> None:
    merged = {**load_patients(layout), **{k: list(v) for k, v in cases.items()}}
    write_file_atomic(patients_manifest_path(layout), json.dumps(merged, indent=1, sort_keys=True).encode())


def encode_patient(
    layout: RunLayout, case_id: str, slide_ids: Sequence[str], target: SlideTarget, encoder: Any = None
) -> PatientResult:
    """Patient embedding of a case → `patient_features/<name>/<case_id>.h5` (atomic).

    With an ``encoder`` that has a case model (``encoder.has_case_model``), that model encodes the
    case from every slide's patch features and coords; otherwise the slide embeddings are averaged.
    """
    if not slide_ids:
        raise SlideFeatureError(f"case {case_id} has no slides", slide=case_id, stage="patient_features")
    vectors, attrs = [], []
    for sid in slide_ids:
        store = layout.store(sid)
        path = slide_feature_path(target)
        if not store.has(path):
            raise SlideFeatureError(
                f"case {case_id}: slide {sid} has no {path}", slide=case_id, stage="patient_features"
            )
        v, a = store.read(path)
        vectors.append(np.asarray(v, np.float32))
        attrs.append(a)
    if len({v.shape for v in vectors}) != 1:
        raise SlideFeatureError(f"case {case_id}: slide embeddings differ in shape", slide=case_id)
    aggregation = "mean of slide embeddings"
    vector = np.mean(vectors, axis=0).astype(np.float32)
    if encoder is not None and getattr(encoder, "has_case_model", False):
        slides = []
        for sid in slide_ids:
            store = layout.store(sid)
            feats, _ = store.read(feature_path(target.patch_encoder))
            coords, _ = store.read(COORDS)
            slides.append((feats, coords.reshape(-1, 2), int(store.attrs()["patch_size_level0"])))
        try:
            vector = encoder.encode_case(slides)
        except SlideError:
            raise
        except Exception as e:
            raise SlideFeatureError(f"case {case_id}: {type(e).__name__}: {e}", slide=case_id) from e
        aggregation = encoder.spec.case_aggregation
    out = patient_path(layout, target.name, case_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("features", data=vector)
            prov = {
                "case_id": case_id,
                "slide_ids": json.dumps(list(slide_ids)),
                "encoder": target.name,
                "slide_encoder": target.slide_encoder,
                "patch_encoder": target.patch_encoder,
                "aggregation": aggregation,
                "slide_recipe_hashes": json.dumps([str(a.get("recipe_hash", "")) for a in attrs]),
                "weights_sha256": str(attrs[0].get("weights_sha256", "")),
                "software_version": __version__,
            }
            for k, v in prov.items():
                ds.attrs[k] = v
                f.attrs[k] = v
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return PatientResult(case_id, target.name, out, slide_ids=list(slide_ids))
