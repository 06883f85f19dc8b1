"""`export_patches`: the stored coordinates of a run → a training patch store (PNG, HDF5 or LMDB).

Pixels are read at the run's geometry through the fast reader (the pipeline's reference pixels),
one slide at a time; each slide is written completely or not at all, a slide whose fingerprint
(coordinates recipe, sample, label, store options, slide file) is unchanged is skipped, and every
slide's result is an `Outcome` (done / skipped / failed with a one-line reason) recorded in the
catalog as asset `patch_store/<kind>` — the same outcome the Dagster asset of that kind reports.

Sampling (`sample`, `seed`): `balanced` takes `sample` patches from every slide (all of a smaller
slide), drawn with a per-slide seed, so adding slides later leaves the others' samples unchanged;
`random` draws `sample` patches in total, uniformly over the patches of every slide with coordinates
in the run folder (so a slide's share depends on the others).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from filelock import FileLock

from ..catalog import Catalog
from ..errors import SlideError, UsageError
from ..fast_reader import FastPatchReader
from ..params import check_params, param
from ..stages.base import DONE, SKIPPED, Outcome, StageEnv, guard
from ..stages.coords import load_patch_coords
from ..store import RunLayout
from .labels import Labels, read_labels
from .patch_stores import STORE_KINDS, PatchStore, SlidePatches, open_patch_store
from .slides import SlideFiles

EXPORT_VERSION = 1  # bump when the stored patches change for the same inputs
SAMPLINGS = ("balanced", "random")


class PatchExportError(SlideError):
    stage = "patch_store"


def asset_name(kind: str) -> str:
    return f"patch_store/{kind}"


@dataclass(frozen=True)
class PatchStoreParams:
    """Parameters of a training patch store (`atlaspatch export-patches`, the patch_store/<kind> assets)."""

    SECTION: ClassVar[str] = "patch_store"

    format: str = param("hdf5", "Patch store kind", choices=STORE_KINDS)
    dest: str | None = param(None, "Destination folder [<run>/patch_stores/<format>]")
    sample: int | None = param(None, "Export a sample of this many patches (see --sampling) [all]", gt=0)
    sampling: str = param(
        "balanced",
        "balanced: --sample patches from every slide; random: --sample in total, uniform over all patches",
        choices=SAMPLINGS,
    )
    seed: int = param(0, "Seed of the sample", ge=0)
    labels: str | None = param(None, "CSV slide_id,label: each patch gets its slide's label")
    image_encoding: str = param("png", "LMDB values: png (lossless) or jpeg (smaller)", choices=("png", "jpeg"))
    jpeg_quality: int = param(95, "JPEG quality of LMDB values", ge=1, le=100)
    hdf5_compression: str = param("none", "HDF5 patch chunks compression", choices=("none", "gzip", "lzf"))
    map_size_mb: int = param(1024, "Initial LMDB map size in MiB (doubled whenever it is full)", gt=0, recipe=False)
    reader_threads: int = param(2, "Threads decoding slide tiles", ge=1, recipe=False)
    batch_size: int = param(64, "Patches per read batch", ge=1, recipe=False)
    force: bool = param(False, "Rewrite slides already exported and unchanged", recipe=False)

    def store_options(self) -> dict[str, Any]:
        return {
            "encoding": self.image_encoding,
            "quality": self.jpeg_quality,
            "compression": self.hdf5_compression,
            "map_size_mb": self.map_size_mb,
        }


def _slide_seed(seed: int, slide_id: str) -> list[int]:
    """A per-slide seed that does not depend on the other slides (stable under appending)."""
    return [int(seed), int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")]


def sample_sizes(counts: dict[str, int], params: PatchStoreParams) -> dict[str, int]:
    """Patches to take from each slide (all its patches when there is no sample)."""
    n = params.sample
    if n is None:
        return dict(counts)
    if params.sampling == "balanced":
        return {s: min(n, c) for s, c in counts.items()}
    ids = sorted(counts)
    total = sum(counts[s] for s in ids)
    if not ids or n >= total:
        return dict(counts)
    draw = np.random.default_rng([int(params.seed)]).multivariate_hypergeometric([counts[s] for s in ids], n)
    return {s: int(k) for s, k in zip(ids, draw, strict=True)}


def sample_rows(n: int, k: int, seed: int, slide_id: str) -> np.ndarray:
    """k of the n coordinate rows (sorted), drawn with the slide's seed; all rows when k >= n."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(_slide_seed(seed, slide_id))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


@dataclass
class PatchExportReport:
    kind: str
    run_dir: Path
    dest: Path
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        c = {DONE: 0, SKIPPED: 0, "failed": 0}
        for o in self.outcomes:
            c[o.status] = c.get(o.status, 0) + 1
        return c


class PatchExport:
    """One export request: the run, the store, the labels and every slide's sample size, checked up front."""

    def __init__(
        self,
        layout: RunLayout,
        params: PatchStoreParams,
        env: StageEnv | None = None,
        store: PatchStore | None = None,
    ):
        check_params(params)
        self.layout = layout
        self.params = params
        self.kind = params.format
        self.asset = asset_name(self.kind)
        self.env = env or StageEnv(layout=layout, catalog=Catalog(layout.catalog_dir))
        dest = Path(params.dest).expanduser().resolve() if params.dest else layout.patch_store_dir(self.kind)
        self.store = store or open_patch_store(dest, self.kind, **params.store_options())
        self.universe = self._counts()
        self.labels: Labels | None = None
        if params.labels:
            self.labels = read_labels(params.labels)
            self.labels.check_known(self.universe, "slide")
        self.sizes = sample_sizes({s: n for s, n in self.universe.items() if n is not None}, params)
        self.files = SlideFiles(layout, self.env.catalog)
        self.exported_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.store.prepare()  # PatchStoreError: unwritable destination, before any slide

    @property
    def dest(self) -> Path:
        return self.store.root

    def _counts(self) -> dict[str, int | None]:
        """Patch count of every slide store of the run (None: no coordinates / unreadable)."""
        out: dict[str, int | None] = {}
        for sid in self.layout.slide_ids():
            try:
                out[sid] = self.layout.store(sid).num_patches()
            except OSError:
                out[sid] = None
        return out

    def select(self, slides: Sequence[str] | None) -> list[str]:
        """The slides to export (UsageError for ids the run does not have)."""
        if not slides:
            if not self.universe:
                raise UsageError(f"no slide stores in {self.layout.patches_dir}")
            return sorted(self.universe)
        wanted = list(dict.fromkeys(s.strip() for s in slides if s.strip()))
        unknown = [s for s in wanted if s not in self.universe]
        if unknown:
            raise UsageError(f"unknown slide id {', '.join(unknown)} (no store in {self.layout.patches_dir})")
        return wanted

    def run(self, slides: Sequence[str] | None = None) -> PatchExportReport:
        report = PatchExportReport(self.kind, self.layout.root, self.dest)
        for sid in self.select(slides):
            report.outcomes.append(self.slide(sid))
        return report

    # -- one slide -----------------------------------------------------------------------------
    def slide(self, sid: str) -> Outcome:
        """Export one slide (guarded: any error is this slide's one-line failure, recorded after the write)."""
        return guard(self.asset, sid, self.env, lambda: self._slide(sid))

    def _slide(self, sid: str) -> Outcome:
        t0 = time.perf_counter()
        store = self.layout.store(sid)
        if not store.has_coords():
            raise PatchExportError(
                f"no patch coordinates in {store.path}; run `atlaspatch segment-and-get-coords` first", slide=sid
            )
        coords = load_patch_coords(self.layout, sid)
        n = len(coords.coords)
        label = label_raw = None
        if self.labels is not None:
            if sid not in self.labels:
                self.store.remove_slide(sid)  # a labelled store holds no unlabelled patches
                return self._skipped(sid, f"no label in {self.labels.path}: not exported", coords.recipe_hash)
            label, label_raw = self.labels.get(sid), self.labels.raw[sid]
        if n == 0:
            self.store.remove_slide(sid)
            return self._skipped(sid, "0 patches (no tissue passed the filters): nothing to export", coords.recipe_hash)
        rows = sample_rows(n, self.sizes.get(sid, n), self.params.seed, sid)
        wsi = self.files.path(sid, str(store.attrs().get("wsi_path") or ""))
        fp = self._fingerprint(coords.recipe_hash, coords.geometry.as_dict(), rows, label_raw, wsi)
        sp = SlidePatches(
            slide_id=sid,
            wsi_path=wsi,
            geometry=coords.geometry,
            coords=coords.coords[rows],
            index=rows,
            tissue_fraction=coords.tissue_fraction[rows],
            fingerprint=fp,
            batches=lambda: self._read(wsi, coords.geometry, coords.coords[rows]),
            label=label,
            label_raw=label_raw,
            extra={"coords_recipe_hash": coords.recipe_hash, "exported_at": self.exported_at, "source_patches": n},
        )
        with FileLock(str(self.dest / f".{sid}.lock"), timeout=600):  # two exporters of one slide: one at a time
            status, written = self._write(sp)
        return Outcome(
            self.asset,
            sid,
            status,
            metadata={
                "num_patches": sp.n,
                "source_patches": n,
                "dest": str(self.dest),
                "fingerprint": fp,
                "read_level": coords.geometry.read_level,
                "patch_size": coords.geometry.patch_size,
                "target_mpp": coords.geometry.target_mpp,
                "label": label_raw,
            },
            written=written,
            seconds=time.perf_counter() - t0,
            recipe_hash=fp,
            parent_hashes={"patch_coords": coords.recipe_hash},
            rows=sp.n,
            parameters={"kind": self.kind, "dest": str(self.dest), **self._recipe()},
        )

    def _write(self, sp: SlidePatches) -> tuple[str, list[str]]:
        """Skip (fingerprint unchanged) or write the slide; (status, paths written)."""
        sid, fp = sp.slide_id, sp.fingerprint
        status = DONE
        if not self.params.force and self.store.exported_fingerprint(sid) == fp:
            status, written = SKIPPED, [str(self.dest)]
            if hasattr(self.store, "note"):
                self.store.note(sp)  # the index lists it even if a crash came between rename and index update
            self.env.logger.info(f"{sid}: {self.kind} patch store up to date (fingerprint {fp}), skipped")
        else:
            try:
                written = self.store.write_slide(sp)
            except OSError as e:  # full or read-only disk, quota…: one line (the errno stays in the chain)
                why = os.strerror(e.errno) if e.errno else str(e)
                where = f"the {self.kind} patch store at {self.dest}"
                raise PatchExportError(f"cannot write {where}: {why}", slide=sid) from e
        return status, written

    def _skipped(self, sid: str, why: str, coords_hash: str) -> Outcome:
        self.env.logger.warning(f"{sid}: {why}")
        return Outcome(
            self.asset,
            sid,
            SKIPPED,
            warnings=[why],
            metadata={"num_patches": 0, "dest": str(self.dest), "reason": why},
            parent_hashes={"patch_coords": coords_hash},
            rows=0,
        )

    def _recipe(self) -> dict[str, Any]:
        p = self.params
        return {"sample": p.sample, "sampling": p.sampling, "seed": p.seed, "labels": p.labels}

    def _fingerprint(
        self, coords_hash: str, geometry: dict[str, Any], rows: np.ndarray, label: str | None, wsi: str
    ) -> str:
        st = os.stat(wsi)
        ident = {
            "version": EXPORT_VERSION,
            "kind": self.kind,
            "store": self.store.fingerprint_options(),
            "coords_recipe_hash": coords_hash,
            "geometry": geometry,
            "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
            "label": label,
            "slide": [st.st_size, st.st_mtime_ns],
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _read(self, wsi: str, geometry: Any, coords: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with FastPatchReader(wsi, geometry, threads=self.params.reader_threads) as reader:
            yield from reader.iter_batches(coords, self.params.batch_size)


def export_patches(
    run_dir_or_output: str | Path,
    params: PatchStoreParams,
    slides: Sequence[str] | None = None,
    env: StageEnv | None = None,
) -> PatchExportReport:
    """Write the patches of a run folder's stored coordinates into a patch store (see the module doc).

    Raises UsageError (nothing written) for a bad request: no run folder, unknown slide ids, a label
    CSV naming slides the run does not have, an unwritable destination. Per-slide problems are outcomes.
    """
    from ..exports.run import resolve_layout

    layout = resolve_layout(run_dir_or_output)
    return PatchExport(layout, params, env).run(slides)
