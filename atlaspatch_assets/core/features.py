"""Patch features: one read pass over a slide's patches feeds every requested encoder.

The fast reader decodes and resizes on worker threads ahead of the model (prefetch), each
encoder applies its own resize + normalization, and all feature matrices are written to the
slide's store in one atomic update (other encoders' datasets stay untouched).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders import Encoder
from .errors import SlideError
from .fast_reader import FastPatchReader
from .pipeline import CoordsResult, RunLayout
from .slide import Slide
from .storage import DatasetWrite, recipe_hash

FEATURES = "features"


class FeatureError(SlideError):
    stage = "features"


def feature_path(encoder: str) -> str:
    return f"{FEATURES}/{encoder}"


@dataclass
class FeatureResult:
    slide_id: str
    encoder: str
    features: np.ndarray  # (N, D) float32 or float16
    attrs: dict[str, Any]
    recipe_hash: str
    seconds: float = 0.0
    read_seconds: float = 0.0
    reused: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1]) if self.features.ndim == 2 else 0


def feature_recipe(encoder: Encoder, coords_hash: str, scaled_decode: bool, store_dtype: str) -> dict[str, Any]:
    """What changes the numbers: model + weights + precision + patches (+ how they were decoded)."""
    return {
        "stage": "features",
        "version": 1,
        "encoder": encoder.name,
        "weights_sha256": encoder.weights_sha256 or "",
        "precision": encoder.precision,
        "coords_recipe": coords_hash,
        "scaled_decode": bool(scaled_decode),
        "dtype": store_dtype,
    }


def stored_feature_recipe(layout: RunLayout, slide_id: str, encoder: str) -> str | None:
    return layout.store(slide_id).dataset_attrs(feature_path(encoder)).get("recipe_hash") or None


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures (torch raises OutOfMemoryError or RuntimeError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_in_chunks(enc: Encoder, pixels: Any, limit: int) -> tuple[np.ndarray, int]:
    """Features of `pixels`, at most `limit` patches per forward; on out-of-memory the limit halves
    and the chunk is retried. Returns (features, the limit that worked)."""
    parts = []
    i = 0
    while i < len(pixels):
        chunk = pixels[i : i + limit]
        try:
            parts.append(enc(chunk))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            _free_accelerator_memory()
            if limit == 1:
                raise FeatureError(
                    f"encoder {enc.name} ran out of memory on {enc.device} with 1 patch per batch; "
                    "use a device with more memory or a lower --feature-precision"
                ) from e
            limit = max(1, limit // 2)
            continue
        i += len(chunk)
    return (np.concatenate(parts) if len(parts) > 1 else parts[0]), limit


def extract_features(
    slide: Slide,
    slide_id: str,
    coords: CoordsResult,
    encoders: Mapping[str, Encoder],
    *,
    batch_size: int = 32,
    reader_threads: int = 2,
    prefetch: int = 2,
    scaled_decode: bool = False,
    store_dtype: str = "float32",
    errors: dict[str, str] | None = None,
) -> dict[str, FeatureResult]:
    """Read each patch once and run every encoder on it; returns one result per encoder.

    A batch that runs out of memory is split in halves (down to one patch) and later batches
    keep the size that worked. With `errors` given, an encoder that fails is dropped with its
    one-line reason in `errors[name]` while the others go on; without it the first encoder
    error is raised. Reader errors (undecodable tiles) always raise: they concern every encoder.
    """
    if not encoders:
        return {}
    n = coords.num_patches
    dtype = np.float16 if store_dtype == "float16" else np.float32
    active = dict(encoders)
    outs = {name: np.empty((n, enc.dim), dtype) for name, enc in encoders.items()}
    limits = dict.fromkeys(encoders, max(1, batch_size))
    model_s = dict.fromkeys(encoders, 0.0)
    t0 = time.perf_counter()
    reader_info: dict[str, Any] = {}
    if n:
        with FastPatchReader(
            slide.path,
            coords.geometry,
            threads=reader_threads,
            prefetch=prefetch,
            scaled_decode=scaled_decode,
            slide=slide,
        ) as reader:
            for idx, pixels in reader.iter_batches(coords.coords, batch_size):
                for name, enc in list(active.items()):
                    t = time.perf_counter()
                    try:
                        feats, limits[name] = encode_in_chunks(enc, pixels, limits[name])
                        if feats.shape != (len(idx), enc.dim) or not np.isfinite(feats).all():
                            bad = "non-finite values" if feats.shape == (len(idx), enc.dim) else f"shape {feats.shape}"
                            raise FeatureError(f"encoder {name} returned {bad} (expected ({len(idx)}, {enc.dim}))")
                    except Exception as e:
                        if errors is None:
                            raise
                        reason = e.reason if isinstance(e, SlideError) else f"{type(e).__name__}: {e}"
                        errors[name] = " ".join(f"[features/{name}] {reason}".split())
                        del active[name], outs[name]
                        continue
                    outs[name][idx] = feats
                    model_s[name] += time.perf_counter() - t
                if not active:
                    break
            reader_info = reader.describe()
    total = time.perf_counter() - t0
    read_s = max(0.0, total - sum(model_s.values()))
    results: dict[str, FeatureResult] = {}
    for name, enc in active.items():
        recipe = feature_recipe(enc, coords.recipe_hash, scaled_decode, store_dtype)
        attrs = {
            **enc.attrs(),
            "recipe": recipe,
            "recipe_hash": recipe_hash(recipe),
            "coords_recipe_hash": coords.recipe_hash,
            "patch_size": coords.geometry.patch_size,
            "target_mpp": coords.geometry.target_mpp,
            "reader_path": reader_info.get("path", ""),
            "dtype": store_dtype,
        }
        results[name] = FeatureResult(
            slide_id=slide_id,
            encoder=name,
            features=outs[name],
            attrs=attrs,
            recipe_hash=attrs["recipe_hash"],
            seconds=model_s[name] + read_s / len(encoders),
            read_seconds=read_s,
            extra={
                "model_seconds": model_s[name],
                "reader": reader_info,
                "wall_seconds": total,
                "batch_size": limits[name],  # lower than asked when batches ran out of memory
            },
        )
    return results


def save_features(layout: RunLayout, results: Sequence[FeatureResult]) -> None:
    """Write all given feature matrices of one slide in one atomic store update."""
    todo = [r for r in results if not r.reused]
    if not todo:
        return
    slide_id = todo[0].slide_id
    datasets = {
        feature_path(r.encoder): DatasetWrite(r.features, r.attrs, chunk_rows=min(4096, max(1, r.rows))) for r in todo
    }
    store = layout.store(slide_id)
    sets = _feature_sets(store.attrs().get("feature_sets"), todo)
    store.write(datasets, {"feature_sets": sets})


def _feature_sets(existing: Any, results: Sequence[FeatureResult]) -> list[dict[str, Any]]:
    """The seed's `feature_sets` file attribute: name, embedding_dim, dataset path per encoder."""
    import json

    current = json.loads(existing) if isinstance(existing, str) and existing else []
    by_name = {d["name"]: d for d in current if isinstance(d, dict) and "name" in d}
    for r in results:
        by_name[r.encoder] = {"name": r.encoder, "embedding_dim": r.dim, "dataset": feature_path(r.encoder)}
    return [by_name[k] for k in sorted(by_name)]


def load_features(layout: RunLayout, slide_id: str, encoder: str) -> FeatureResult:
    store = layout.store(slide_id)
    name = feature_path(encoder)
    if not store.has(name):
        raise FeatureError(f"no {name} stored at {store.path}", slide=slide_id)
    data, attrs = store.read(name)
    return FeatureResult(slide_id, encoder, data, attrs, str(attrs.get("recipe_hash", "")), reused=True)
