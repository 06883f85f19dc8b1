"""Stage `features/<encoder>`: one read pass over a slide's patches feeds every requested encoder.

The fast reader decodes and resizes on worker threads ahead of the model (prefetch), each
encoder applies its own resize + normalization, and all feature matrices are written to the
slide's store in one atomic update (other encoders' datasets stay untouched). An encoder that
cannot load or fails mid-pass fails alone; a reader error fails every encoder of the slide.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import SlideError
from ..fast_reader import FastPatchReader
from ..params import param, recipe_hash
from ..source import SlideHandle
from ..store import DatasetWrite, RunLayout, features_name
from .base import DONE, SKIPPED, Outcome, StageEnv, failed, guard_all, upstream_missing
from .compute import ComputeParams
from .coords import CoordsResult, load_patch_coords

if TYPE_CHECKING:  # torch is imported only when an encoder is loaded (the runtime install has none)
    from ..encoders import Encoder

RECIPE_VERSION = 1


class FeatureError(SlideError):
    stage = "features"


def asset_name(encoder: str) -> str:
    return f"features/{encoder}"


@dataclass(frozen=True)
class FeatureParams:
    """Parameters of the features stage (model settings: ComputeParams; weights: ModelParams)."""

    SECTION: ClassVar[str] = "features"

    scaled_decode: bool = param(
        False,
        "libjpeg-turbo DCT-scaled decode when the read downsample is 2/4/8 (faster, approximate)",
        cli="scaled-decode/exact-decode",
    )
    store_dtype: str = param(
        "float32", "Storage dtype of features/<encoder>", choices=("float32", "float16"), cli="features-dtype"
    )
    skip_existing: bool = param(True, "Reuse stored features whose recipe matches", recipe=False, cli="")


@dataclass
class FeatureResult:
    slide_id: str
    encoder: str
    features: np.ndarray  # (N, D) float32 or float16
    attrs: dict[str, Any]
    recipe_hash: str
    seconds: float = 0.0
    read_seconds: float = 0.0
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
        "version": RECIPE_VERSION,
        "encoder": encoder.name,
        "weights_sha256": encoder.weights_sha256 or "",
        "precision": encoder.precision,
        "coords_recipe": coords_hash,
        "scaled_decode": bool(scaled_decode),
        "dtype": store_dtype,
    }


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
                    "use a device with more memory or a lower {{compute.precision}}"
                ) from e
            limit = max(1, limit // 2)
            continue
        i += len(chunk)
    return (np.concatenate(parts) if len(parts) > 1 else parts[0]), limit


def extract_features(
    slide: Any,
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
    on_batch: Any = None,
) -> dict[str, FeatureResult]:
    """Read each patch once and run every encoder on it; returns one result per encoder.

    A batch that runs out of memory is split in halves (down to one patch) and later batches
    keep the size that worked. With `errors` given, an encoder that fails is dropped with its
    one-line reason in `errors[name]` while the others go on; without it the first encoder
    error is raised. Reader errors (undecodable tiles) always raise: they concern every encoder.
    `on_batch(done, total)` is called after each batch (progress).
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
                if on_batch is not None:
                    on_batch(int(idx[-1]) + 1, n)
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


def _feature_sets(existing: Any, results: Sequence[FeatureResult]) -> list[dict[str, Any]]:
    """The seed's `feature_sets` file attribute: name, embedding_dim, dataset path per encoder."""
    current = existing if isinstance(existing, list) else []
    by_name = {d["name"]: d for d in current if isinstance(d, dict) and "name" in d}
    for r in results:
        by_name[r.encoder] = {"name": r.encoder, "embedding_dim": r.dim, "dataset": features_name(r.encoder)}
    return [by_name[k] for k in sorted(by_name)]


def save_features(layout: RunLayout, results: Sequence[FeatureResult]) -> list[str]:
    """Write all given feature matrices of one slide in one atomic store update."""
    if not results:
        return []
    store = layout.store(results[0].slide_id)
    datasets = {
        features_name(r.encoder): DatasetWrite(r.features, r.attrs, chunk_rows=min(4096, max(1, r.rows)))
        for r in results
    }

    def feature_sets(current: dict[str, Any]) -> dict[str, Any]:  # under the store's lock
        from ..store import json_attr

        return {"feature_sets": _feature_sets(json_attr(current.get("feature_sets")), results)}

    store.write(datasets, update_attrs=feature_sets)
    return [str(store.path)]


def load_features(layout: RunLayout, slide_id: str, encoder: str) -> FeatureResult:
    data, attrs = layout.store(slide_id).features(encoder)
    return FeatureResult(slide_id, encoder, data, attrs, str(attrs.get("recipe_hash", "")))


def _metadata(r: FeatureResult, store_path: str) -> dict[str, Any]:
    wall = r.extra["wall_seconds"]
    return {
        "rows": r.rows,
        "dim": r.dim,
        "seconds": round(r.seconds, 3),
        "reused": False,
        "patches_per_s": round(r.rows / wall, 1) if wall > 0 else 0.0,
        "precision": r.attrs["precision"],
        "weights_sha256": r.attrs["weights_sha256"] or "none",
        "reader": r.attrs["reader_path"],
        "batch_size": r.extra["batch_size"],
        "recipe_hash": r.recipe_hash,
        "store": store_path,
    }


def _reused(name: str, sid: str, store: Any, want: str, coords: CoordsResult) -> Outcome:
    return Outcome(
        asset_name(name),
        sid,
        SKIPPED,
        metadata={"reused": True, "recipe_hash": want, "store": str(store.path)},
        written=[str(store.path)],
        recipe_hash=want,
        parent_hashes={"patch_coords": coords.recipe_hash},
        rows=coords.num_patches,
        weights_hash=store.feature_attrs(name).get("weights_sha256") or None,
    )


def _done(
    r: FeatureResult,
    store: Any,
    written: list[str],
    coords: CoordsResult,
    params: FeatureParams,
    compute: ComputeParams,
) -> Outcome:
    return Outcome(
        asset_name(r.encoder),
        r.slide_id,
        DONE,
        metadata=_metadata(r, str(store.path)),
        written=written,
        seconds=r.seconds,
        recipe_hash=r.recipe_hash,
        parent_hashes={"patch_coords": coords.recipe_hash},
        rows=r.rows,
        dim=r.dim,
        parameters={
            "batch_size": compute.batch_size,
            "precision": r.attrs["precision"],
            "scaled_decode": params.scaled_decode,
        },
        versions=dict(r.attrs["library_versions"]),
        weights_hash=r.attrs["weights_sha256"] or None,
        value=r,
    )


def _load_failures(sid: str, encoders: Mapping[str, Any], env: StageEnv) -> dict[str, Outcome]:
    """Encoders that could not be loaded fail on this slide with their load error."""
    out = {}
    for n, enc in encoders.items():
        if isinstance(enc, BaseException):
            out[n] = failed(asset_name(n), sid, env.text(f"{sid}: [features/{n}] {' '.join(str(enc).split())}"))
            env.logger.error(f"FAILED {out[n].reason}")
            env.record(out[n])
    return out


def patch_features(
    slide: SlideHandle,
    encoders: Mapping[str, Encoder | BaseException],
    params: FeatureParams,
    compute: ComputeParams,
    env: StageEnv,
    coords: CoordsResult | None = None,
) -> list[Outcome]:
    """Run the stage for one slide and these encoders (a failed load is passed as its exception)."""
    sid = slide.slide_id
    outcomes = _load_failures(sid, encoders, env)
    loaded: dict[str, Encoder] = {n: e for n, e in encoders.items() if n not in outcomes}

    def work() -> list[Outcome]:
        store = env.layout.store(sid)
        c = coords
        if c is None:
            if not store.has_coords():
                raise upstream_missing(env, sid, "features", "patch_coords", "no patch coordinates stored")
            c = load_patch_coords(env.layout, sid)
        out: list[Outcome] = []
        todo: dict[str, Encoder] = {}
        for n, enc in loaded.items():
            want = recipe_hash(feature_recipe(enc, c.recipe_hash, params.scaled_decode, params.store_dtype))
            if params.skip_existing and store.recipe_hash_of(asset_name(n)) == want:
                env.logger.info(f"{sid}: features/{n} up to date, reused")
                out.append(_reused(n, sid, store, want, c))
            else:
                todo[n] = enc
        if not todo:
            return out
        errors: dict[str, str] = {}
        results = extract_features(
            slide.open(),
            sid,
            c,
            todo,
            batch_size=compute.batch_size,
            reader_threads=compute.num_workers,
            scaled_decode=params.scaled_decode,
            store_dtype=params.store_dtype,
            errors=errors,
            on_batch=lambda done, total: env.progress(sid, "features", done, total),
        )
        written = save_features(env.layout, list(results.values()))
        out += [failed(asset_name(n), sid, env.text(f"{sid}: {reason}")) for n, reason in errors.items()]
        return out + [_done(r, store, written, c, params, compute) for r in results.values()]

    if loaded:
        for o in guard_all([asset_name(n) for n in loaded], sid, env, work):
            outcomes[o.asset.removeprefix("features/")] = o
    return [outcomes[n] for n in encoders]
