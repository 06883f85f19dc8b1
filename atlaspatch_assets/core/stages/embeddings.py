"""Stages `slide_features/<name>` and `patient_features/<name>`: embeddings from stored patch
features (never computing them: the patch features are an upstream asset).

`slide_features/<name>` in the slide's store holds one (D,) vector per slide encoder; for the
pooling encoders (`mean`, `max`), which work on any patch encoder, the name carries the patch
encoder: `mean_uni_v1`. Patient embeddings, one file per case at
`<run>/patient_features/<name>/<case_id>.h5`, come from the model's own case-level aggregator
when it has one (MOOZY's case transformer over all the case's slides), else they are the mean
of the case's slide embeddings.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from ... import __version__
from ..errors import SlideError, UsageError
from ..params import param, recipe_hash, ref
from ..store import DatasetWrite, RunLayout, slide_features_name, write_file_atomic
from .base import DONE, SKIPPED, Outcome, StageEnv, failed, guard, upstream_missing

POOLING = ("mean", "max")
RECIPE_VERSION = 1


class SlideFeatureError(SlideError):
    stage = "slide_features"


@dataclass(frozen=True)
class SlideEmbeddingParams:
    SECTION: ClassVar[str] = "slide_features"

    skip_existing: bool = param(True, "Reuse stored slide embeddings whose recipe matches", recipe=False, cli="")


@dataclass(frozen=True)
class SlideTarget:
    """A slide-level output: which slide encoder, on which patch encoder, stored under which name."""

    slide_encoder: str
    patch_encoder: str

    @property
    def name(self) -> str:
        return f"{self.slide_encoder}_{self.patch_encoder}" if self.slide_encoder in POOLING else self.slide_encoder

    @property
    def asset(self) -> str:
        return f"slide_features/{self.name}"


def parse_target(name: str, default_patch_encoder: str | None = None) -> SlideTarget:
    """`titan` → titan on its own patch encoder; `mean_uni_v1` / `mean` + default → pooling."""
    from ..slide_encoders import get_slide_encoder_spec

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


@dataclass(frozen=True)
class SlideEncoderPlan:
    """What a run of slide encoders needs: the targets, their patch encoders and the geometry."""

    targets: tuple[SlideTarget, ...]
    patch_encoders: tuple[str, ...]  # every patch encoder the targets read, in first-seen order
    patch_size: int | None
    target_mag: float | None


def plan_slide_encoders(
    names: Sequence[str],
    patch_encoders: Sequence[str] = (),
    patch_size: int | None = None,
    target_mag: float | None = None,
    target_mpp: float | None = None,
) -> SlideEncoderPlan:
    """Resolve slide encoder names into stored targets and check that they can share one run.

    Pooling encoders (`mean`, `max`) pool each given patch encoder; the others bring their own.
    The geometry defaults to what the encoders need when not given, and a given geometry that
    does not fit is an error (UsageError) before any work.
    """
    from ..slide_encoders import check_slide_encoder_run, get_slide_encoder_spec

    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        raise UsageError("give at least one slide encoder (e.g. titan, prism, mean)")
    specs = [get_slide_encoder_spec(n) for n in names]
    check_slide_encoder_run([sp.name for sp in specs], patch_size, target_mag)
    targets: list[SlideTarget] = []
    for sp in specs:
        if sp.name in POOLING:
            if not patch_encoders:
                raise UsageError(
                    f"slide encoder {sp.name} pools patch features: give the patch encoders "
                    f"({ref('features', 'encoders')})"
                )
            targets += [SlideTarget(sp.name, p) for p in patch_encoders]
        else:
            targets.append(SlideTarget(sp.name, sp.patch_encoder or ""))
        if sp.geometry is not None:  # the encoder fixes the geometry when the user did not
            patch_size = patch_size or sp.patch_size
            if target_mag is None and target_mpp is None:
                target_mag = sp.target_magnification
    required = list(dict.fromkeys([*patch_encoders, *(t.patch_encoder for t in targets)]))
    return SlideEncoderPlan(tuple(dict.fromkeys(targets)), tuple(required), patch_size, target_mag)


@dataclass
class SlideFeatureResult:
    slide_id: str
    target: SlideTarget
    vector: np.ndarray
    attrs: dict[str, Any]
    seconds: float = 0.0


def slide_recipe(encoder: Any, target: SlideTarget, features_hash: str) -> dict[str, Any]:
    return {
        "stage": "slide_features",
        "version": RECIPE_VERSION,
        "slide_encoder": target.slide_encoder,
        "patch_encoder": target.patch_encoder,
        "weights_sha256": getattr(encoder, "weights_sha256", None) or "",
        "precision": getattr(encoder, "precision", "float32"),
        "features_recipe": features_hash,
    }


def encode_slide(layout: RunLayout, slide_id: str, encoder: Any, target: SlideTarget) -> SlideFeatureResult:
    """Encode one slide from its stored `features/<patch encoder>` and coords."""
    t0 = time.perf_counter()
    store = layout.store(slide_id)
    attrs = store.attrs()
    encoder.check_compatible(target.patch_encoder, int(attrs["patch_size"]), float(attrs["target_magnification"]))
    feats, fattrs = store.features(target.patch_encoder)
    coords = store.coords()
    try:
        vector = encoder.encode(feats, coords, int(attrs["patch_size_level0"]))
    except SlideError:
        raise
    except Exception as e:
        raise SlideFeatureError(f"{target.name}: {type(e).__name__}: {e}", slide=slide_id) from e
    vector = np.asarray(vector, np.float32)
    recipe = slide_recipe(encoder, target, str(fattrs.get("recipe_hash", "")))
    out_attrs = {
        **{k: v for k, v in encoder.attrs(target.patch_encoder).items() if k != "name"},
        "encoder": target.name,
        "dim": int(vector.shape[0]),  # pooling encoders have no fixed dim: the vector's
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
    return SlideFeatureResult(slide_id, target, vector, out_attrs, seconds=time.perf_counter() - t0)


def save_slide_features(layout: RunLayout, results: Sequence[SlideFeatureResult]) -> list[str]:
    if not results:
        return []
    store = layout.store(results[0].slide_id)
    store.write({slide_features_name(r.target.name): DatasetWrite(r.vector, r.attrs) for r in results})
    return [str(store.path)]


def slide_embedding(
    slide_id: str, target: SlideTarget, encoder: Any, params: SlideEmbeddingParams, env: StageEnv
) -> Outcome:
    """Run the stage for one slide (`encoder` is the loaded slide encoder, or its load error)."""
    asset = target.asset
    if isinstance(encoder, BaseException):
        out = failed(asset, slide_id, env.text(f"{slide_id}: [{asset}] {' '.join(str(encoder).split())}"))
        env.logger.error(f"FAILED {out.reason}")
        env.record(out)
        return out

    def work() -> Outcome:
        store = env.layout.store(slide_id)
        if not store.has_features(target.patch_encoder):
            raise upstream_missing(
                env, slide_id, asset, f"features/{target.patch_encoder}", f"no features/{target.patch_encoder} stored"
            )
        fhash = str(store.feature_attrs(target.patch_encoder).get("recipe_hash", ""))
        want = recipe_hash(slide_recipe(encoder, target, fhash))
        if params.skip_existing and store.recipe_hash_of(asset) == want:
            status, written = SKIPPED, [str(store.path)]
            dim = int(store.slide_feature_attrs(target.name).get("dim") or 0) or None
            seconds = 0.0
        else:
            result = encode_slide(env.layout, slide_id, encoder, target)
            written = save_slide_features(env.layout, [result])
            status, dim, seconds = DONE, int(result.vector.shape[0]), result.seconds
        return Outcome(
            asset,
            slide_id,
            status,
            metadata={"reused": status == SKIPPED, "recipe_hash": want, "dim": dim, "store": str(store.path)},
            written=written,
            seconds=seconds,
            recipe_hash=want,
            parent_hashes={f"features/{target.patch_encoder}": fhash},
            dim=dim,
            weights_hash=getattr(encoder, "weights_sha256", None) or None,
        )

    return guard(asset, slide_id, env, work)


# -- patients -----------------------------------------------------------------------------------


@dataclass
class Manifest:
    """A patient manifest: case → slide paths, cases that cannot run (→ reason), slide → mpp."""

    cases: dict[str, list[str]] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    mpp: dict[str, float] = field(default_factory=dict)

    @property
    def slide_paths(self) -> list[str]:
        return list(dict.fromkeys(p for paths in self.cases.values() for p in paths))


def read_manifest(path: str | Path) -> Manifest:
    """`case_id,slide_path[,mpp]` CSV (paths relative to the CSV); duplicate or missing slides fail their case."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest not found: {path}")
    base = path.resolve().parent
    m = Manifest()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "case_id" not in cols or "slide_path" not in cols:
            raise UsageError(f"{path}: needs columns case_id and slide_path (found {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            case = (row.get(cols["case_id"]) or "").strip()
            slide = (row.get(cols["slide_path"]) or "").strip()
            if not case or not slide:
                raise UsageError(f"{path}:{i}: empty case_id or slide_path")
            slide = os.path.abspath(os.path.join(base, slide))
            if slide in m.cases.get(case, []):
                m.bad[case] = f"duplicate row for slide {slide} (line {i})"
            elif not os.path.exists(slide):
                m.bad[case] = f"slide not found: {slide}"
            m.cases.setdefault(case, []).append(slide)
            mpp = (row.get(cols["mpp"]) or "").strip() if "mpp" in cols else ""
            if mpp:
                try:
                    m.mpp[slide] = float(mpp)
                except ValueError as e:
                    raise UsageError(f"{path}:{i}: mpp {mpp!r} is not a number") from e
    m.cases = {c: p for c, p in m.cases.items() if c not in m.bad}
    return m


def load_patients(layout: RunLayout) -> dict[str, list[str]]:
    """case_id → slide ids, as registered by `atlaspatch encode-patient`."""
    p = layout.patients_manifest
    return json.loads(p.read_text()) if p.is_file() else {}


def register_patients(layout: RunLayout, cases: Mapping[str, Sequence[str]]) -> None:
    merged = {**load_patients(layout), **{k: list(v) for k, v in cases.items()}}
    write_file_atomic(layout.patients_manifest, json.dumps(merged, indent=1, sort_keys=True).encode())


def case_aggregation(target: SlideTarget) -> str:
    """How a case's slides become one patient embedding for this target."""
    from ..slide_encoders import get_slide_encoder_spec

    return get_slide_encoder_spec(target.slide_encoder).case_aggregation


def needs_case_model(target: SlideTarget) -> bool:
    return case_aggregation(target) != "mean of slide embeddings"


def encode_patient(
    layout: RunLayout, case_id: str, slide_ids: Sequence[str], target: SlideTarget, encoder: Any = None
) -> tuple[Path, str]:
    """Patient embedding of a case → `patient_features/<name>/<case_id>.h5` (atomic); (path, aggregation).

    With an ``encoder`` that has a case model (``encoder.has_case_model``), that model encodes the
    case from every slide's patch features and coords; otherwise the slide embeddings are averaged.
    """
    if not slide_ids:
        raise SlideFeatureError(f"case {case_id} has no slides", slide=case_id, stage="patient_features")
    vectors, attrs = [], []
    for sid in slide_ids:
        store = layout.store(sid)
        if not store.has_slide_features(target.name):
            raise SlideFeatureError(
                f"case {case_id}: slide {sid} has no slide_features/{target.name}",
                slide=case_id,
                stage="patient_features",
            )
        v, a = store.slide_features(target.name)
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
            feats, _ = store.features(target.patch_encoder)
            slides.append((feats, store.coords(), int(store.attrs()["patch_size_level0"])))
        try:
            vector = encoder.encode_case(slides)
        except SlideError:
            raise
        except Exception as e:
            raise SlideFeatureError(f"case {case_id}: {type(e).__name__}: {e}", slide=case_id) from e
        aggregation = encoder.spec.case_aggregation
    out = layout.patient_path(target.name, case_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
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
                "dim": int(vector.shape[0]),
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
    return out, aggregation


def patient_embedding(
    case_id: str, slide_ids: Sequence[str] | None, target: SlideTarget, encoder: Any, env: StageEnv
) -> Outcome:
    """Run the stage for one case (`slide_ids` None: the case is not registered)."""
    asset = f"patient_features/{target.name}"
    if isinstance(encoder, BaseException):
        out = failed(asset, case_id, env.text(f"{case_id}: [{asset}] {' '.join(str(encoder).split())}"))
        env.record(out)
        return out

    def work() -> Outcome:
        if slide_ids is None:
            raise SlideFeatureError(
                "case is not registered (run atlaspatch encode-patient with its manifest)",
                slide=case_id,
                stage="patient_features",
            )
        path, aggregation = encode_patient(env.layout, case_id, slide_ids, target, encoder)
        return Outcome(
            asset,
            case_id,
            DONE,
            metadata={"slides": len(slide_ids), "aggregation": aggregation, "path": str(path)},
            written=[str(path)],
            rows=len(slide_ids),
        )

    return guard(asset, case_id, env, work)
