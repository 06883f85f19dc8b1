"""slide2vec's patient_embeddings/: the run folder's patient files of the slides exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store.patients import PatientFile, patient_paths, read_patient
from .base import ExportContext
from .commit import Plan, commit_or_skip, json_writer, torch_writer
from .meta import EXPORT_VERSION, SAFE_NAME, attrs_json, json_fingerprint, sha256, short_hash, software, stamp
from .report import PatientExport, describe


def export_patients(ctx: ExportContext) -> list[PatientExport]:
    """Patients of `patient_features/<slide encoder>` (else `<encoder>`) with a slide among those exported."""
    names = [n for n in (ctx.slide_encoder, ctx.encoder) if n]
    found = next(((n, ps) for n in names if (ps := patient_paths(ctx.run, n))), None)
    if found is None:
        return []
    name, paths = found
    out = [_export_patient(ctx, name, path) for path in paths]
    return [p for p in out if p is not None]


def _export_patient(ctx: ExportContext, name: str, path: Path) -> PatientExport | None:
    pid = path.stem
    try:
        patient = read_patient(path)
    except (OSError, ValueError, KeyError) as e:
        return PatientExport(pid, "failed", f"{pid}: [export] cannot read {path}: {describe(e, with_type=False)}")
    slide_ids = patient.slide_ids
    if slide_ids and not set(ctx.wanted).intersection(slide_ids):
        return None
    vec = patient.vector.astype(np.float32, copy=False)
    if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
        return PatientExport(pid, "failed", f"{pid}: [export] {path} features has shape {vec.shape} (expected (D,))")
    case_id = patient.case_id if SAFE_NAME.match(patient.case_id) else pid
    pt = ctx.dest / "patient_embeddings" / f"{case_id}.pt"
    meta_path = ctx.dest / "patient_embeddings" / f"{case_id}.meta.json"
    fp = short_hash([EXPORT_VERSION, name, slide_ids, sha256(vec.tobytes())])
    plans = [Plan(pt, torch_writer(vec)), Plan(meta_path, json_writer(_meta(ctx, patient, vec, case_id, name, fp)))]
    status, why = commit_or_skip(plans, fp, lambda: json_fingerprint(meta_path), ctx.force)
    if status == "failed":
        return PatientExport(case_id, status, f"{case_id}: [export] cannot write: {why}", num_slides=len(slide_ids))
    return PatientExport(case_id, status, files=[str(pt), str(meta_path)], num_slides=len(slide_ids))


def _meta(
    ctx: ExportContext, patient: PatientFile, vec: np.ndarray, case_id: str, name: str, fp: str
) -> dict[str, Any]:
    return {
        "patient_id": case_id,
        "artifact_type": "patient_embeddings",
        "encoder_name": str(patient.attrs.get("encoder") or name),
        "encoder_level": "patient",
        "format": "pt",
        "feature_dim": int(vec.shape[0]),
        "feature_dtype": "fp32",
        "num_slides": len(patient.slide_ids),
        "slide_ids": patient.slide_ids,
        "provenance": {
            **software(),
            "source_path": str(patient.path),
            "attrs": attrs_json(patient.attrs),
            **stamp(ctx, fp),
        },
    }
