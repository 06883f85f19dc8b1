"""`SlideTileDataset`: tiles drawn at random from many slides at once, read straight from the WSIs by
the fast reader (each tile decoded once per batch, libjpeg-turbo, every Aperio JPEG scheme, NDPI).

- Sampling: item i of epoch e is a pure function of (seed, e, i): draws are made in blocks of
  `BLOCK` items from `numpy.random.default_rng([seed, e, block])`, so a DataLoader gives the same
  tiles for a seed whatever its number of workers, and nothing grows with the epoch. `random`
  draws uniformly over all candidate tiles (slides weighted by their patch count or tissue area),
  `balanced` picks the slide uniformly first. Candidates are the stored coordinates (`source="coords"`,
  tile centres kept when the tile size differs) or points drawn uniformly inside the tissue mask
  (`source="mask"`).
- Geometry: per slide, the pyramid level is chosen for the requested MPP / magnification
  (`core.geometry.compute_geometry`: coarsest level not finer than needed, then area resize).
- Workers: no slide handle is pickled; each process opens slides lazily and keeps at most
  `max_open_slides` open (LRU). Works with DataLoader workers under fork and spawn.
- Bad input: a tile that cannot be read (corrupt tile, vanished or unreadable slide) is never
  returned: the item is redrawn deterministically (attempt k uses `default_rng([seed, e, i, k])`),
  the rejection is logged and counted (`stats` in this process; each item's `skipped` field counts
  the draws rejected for it, so the totals survive worker processes).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import SlideError, UsageError
from ..fast_reader import FastPatchReader
from ..geometry import PatchGeometry, compute_geometry
from ..slide import open_slide
from ..store import RunLayout
from .labels import Labels, as_labels
from .slides import SlideFileMissing, SlideFiles

log = logging.getLogger("atlaspatch.training")

BLOCK = 1024  # items drawn together (one RNG stream per block)
SOURCES = ("coords", "mask")
SAMPLINGS = ("random", "balanced")
MAX_LOGGED_PER_SLIDE = 3  # read errors logged per slide and process (all are counted)


class TileReadError(RuntimeError):
    """No readable tile after `max_redraws` draws (every slide unreadable?)."""


@dataclass
class TileSlide:
    """One slide of a tile dataset: its file and where tiles may come from."""

    slide_id: str
    path: str
    coords: np.ndarray | None = None  # (N, 2) level-0 top-left of stored patches
    coords_size0: int | None = None  # their level-0 side (tiles keep the patches' centres)
    mask: np.ndarray | None = None  # tissue mask (thumbnail); tile centres fall on its pixels
    mask_downsample: tuple[float, float] = (1.0, 1.0)  # level-0 pixels per mask pixel (x, y)
    mpp: float | None = None  # MPP override
    label: Any = None


@dataclass
class _Plan:
    """What a slide contributes once opened: its geometry and candidates (picklable, no handles)."""

    slide: TileSlide
    geometry: PatchGeometry
    width: int
    height: int
    tops: np.ndarray | None  # int32 (N, 2) tile top-lefts (coords source)
    tissue: np.ndarray | None  # int64 flat indices of the mask's tissue pixels (mask source)
    weight: float  # share of this slide under `random`


@dataclass
class TileStats:
    """Counters of this process (DataLoader workers have their own; items carry `skipped`)."""

    tiles: int = 0
    skipped: int = 0  # draws rejected (unreadable tile or slide), each redrawn
    read_errors: dict[str, int] = field(default_factory=dict)  # per slide: tiles that failed to read
    unreadable_slides: dict[str, str] = field(default_factory=dict)  # slide → why it cannot be opened


def tile_slides_from_run(
    run: str | Path | RunLayout,
    slide_ids: Sequence[str] | None = None,
    source: str = "coords",
    labels: str | Path | Labels | None = None,
) -> list[TileSlide]:
    """The slides of a run folder as `TileSlide`s (coordinates or tissue mask from each `SlideStore`)."""
    from ..exports.run import resolve_layout

    layout = run if isinstance(run, RunLayout) else resolve_layout(run)
    ids = list(slide_ids) if slide_ids is not None else layout.slide_ids()
    lab = as_labels(labels)
    if lab is not None:
        lab.check_known(layout.slide_ids(), "slide")
    files = SlideFiles(layout)
    out = []
    for sid in ids:
        if lab is not None and sid not in lab:
            log.warning(f"{sid}: no label in {lab.path}: left out")
            continue
        store = layout.store(sid)
        attrs = store.attrs()
        stored = str(attrs.get("wsi_path") or "")
        try:
            path = files.path(sid, stored)
        except SlideFileMissing:
            path = stored  # the dataset leaves it out, saying why
        ts = TileSlide(sid, path, label=None if lab is None else lab.get(sid))
        if source == "mask":
            mask, mattrs = store.mask()
            ds = mattrs.get("downsample") or [1.0, 1.0]
            ts.mask, ts.mask_downsample = mask, (float(ds[0]), float(ds[1]))
        else:
            ts.coords = store.coords()
            ts.coords_size0 = int(attrs.get("patch_size_level0") or 0) or None
        out.append(ts)
    return out


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn` seeding numpy and `random` from torch's per-worker seed (for random transforms)."""
    import random

    import torch

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class SlideTileDataset(Dataset):
    """Tiles from many slides (see the module doc); item = dict(image, slide_id, slide_index, x, y, level,
    mpp, skipped[, label]); `image` is RGB uint8 (patch_size, patch_size, 3), or `transform(image)`.

    Args:
        slides: the slides (`tile_slides_from_run` makes them from a run folder).
        patch_size: tile side at the target resolution (px).
        target_mag / target_mpp: target resolution (20 → 0.5 µm/px); the read level is chosen per slide.
        num_samples: items per epoch [coords: number of stored coordinates; mask: required].
        sampling: `random` (uniform over candidates) or `balanced` (slide first, uniformly).
        source: `coords` (stored coordinates) or `mask` (uniform inside the tissue mask).
        seed: sampling seed; `set_epoch(e)` draws another epoch.
        max_open_slides: slides kept open per process (LRU).
        reader_threads: decode threads per open slide.
        scaled_decode: libjpeg-turbo DCT-scaled decode instead of the area resize when the read
            downsample is 2/4/8 (faster, close to but not identical with the reference pixels).
        max_redraws: draws per item before `TileReadError`.
    """

    def __init__(
        self,
        slides: Sequence[TileSlide],
        patch_size: int = 256,
        target_mag: float | None = 20.0,
        target_mpp: float | None = None,
        num_samples: int | None = None,
        sampling: str = "random",
        source: str = "coords",
        seed: int = 0,
        max_open_slides: int = 16,
        transform: Callable[[np.ndarray], Any] | None = None,
        reader_threads: int = 1,
        scaled_decode: bool = False,
        cache_mb: float = 64.0,
        max_redraws: int = 16,
    ):
        if sampling not in SAMPLINGS:
            raise UsageError(f"sampling must be one of {', '.join(SAMPLINGS)} (got {sampling!r})")
        if source not in SOURCES:
            raise UsageError(f"source must be one of {', '.join(SOURCES)} (got {source!r})")
        labelled = [s.label is not None for s in slides]
        if any(labelled) and not all(labelled):
            raise UsageError("give a label for every slide or for none (the collate needs one per item)")
        self.patch_size, self.sampling, self.source, self.seed = int(patch_size), sampling, source, int(seed)
        self.target_mag, self.target_mpp = target_mag, target_mpp
        self.max_open_slides = max(1, int(max_open_slides))
        self.transform = transform
        self.reader_threads, self.scaled_decode, self.cache_mb = int(reader_threads), bool(scaled_decode), cache_mb
        self.max_redraws = max(1, int(max_redraws))
        self.unusable: dict[str, str] = {}
        self.plans: list[_Plan] = []
        for s in slides:
            try:
                self.plans.append(self._plan(s))
            except (SlideError, OSError, ValueError) as e:
                self.unusable[s.slide_id] = f"{type(e).__name__}: {e}"
                log.warning(f"{s.slide_id}: left out of the tile dataset: {self.unusable[s.slide_id]}")
        if not self.plans:
            raise UsageError(f"no usable slide for tiles ({len(self.unusable)} unusable: {self.unusable})")
        w = np.array([p.weight for p in self.plans], np.float64)
        self._p = w / w.sum() if sampling == "random" else np.full(len(w), 1.0 / len(w))
        if num_samples is None:
            if source == "mask":
                raise UsageError("give num_samples (tiles per epoch) when sampling inside the tissue mask")
            num_samples = sum(len(p.tops) for p in self.plans if p.tops is not None)
        self.num_samples = int(num_samples)
        self.epoch = 0
        self._reset_process_state()

    # -- set-up (main process) ------------------------------------------------------------------
    def _plan(self, s: TileSlide) -> _Plan:
        with open_slide(s.path, mpp_override=s.mpp, probe=False) as sl:
            info = sl.info
            g = compute_geometry(info, self.patch_size, target_mag=self.target_mag, target_mpp=self.target_mpp)
        ps0 = g.patch_size_level0
        if info.width < ps0 or info.height < ps0:
            raise ValueError(f"slide {info.width}x{info.height} is smaller than one tile ({ps0} px at level 0)")
        tops = tissue = None
        if self.source == "coords":
            if s.coords is None or not len(s.coords):
                raise ValueError("no stored coordinates")
            shift = ((s.coords_size0 or ps0) - ps0) / 2  # keep the stored patches' centres
            tops = np.rint(np.asarray(s.coords, np.float64) + shift)
            tops[:, 0] = np.clip(tops[:, 0], 0, info.width - ps0)
            tops[:, 1] = np.clip(tops[:, 1], 0, info.height - ps0)
            tops = tops.astype(np.int32)
            weight = float(len(tops))
        else:
            if s.mask is None:
                raise ValueError("no tissue mask")
            tissue = np.flatnonzero(np.asarray(s.mask) > 0)
            if not len(tissue):
                raise ValueError("the tissue mask is empty")
            dx, dy = s.mask_downsample
            weight = float(len(tissue)) * dx * dy * (info.mpp or 1.0) ** 2  # tissue area in µm²
        return _Plan(s, g, info.width, info.height, tops, tissue, weight)

    def describe(self) -> list[dict[str, Any]]:
        """Per slide: the level chosen for the target and the read size (the automatic level choice)."""
        return [
            {
                "slide_id": p.slide.slide_id,
                "slide_mpp": p.geometry.slide_mpp,
                "read_level": p.geometry.read_level,
                "read_downsample": p.geometry.read_downsample,
                "read_size": p.geometry.read_size,
                "patch_size_level0": p.geometry.patch_size_level0,
                "share": float(self._p[i]),
            }
            for i, p in enumerate(self.plans)
        ]

    # -- per-process state (never pickled) --------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._readers: OrderedDict[int, FastPatchReader] = OrderedDict()
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bad: dict[int, str] = {}
        self.stats = TileStats()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_blocks", "_bad", "stats")}
        state["_pid"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked copy: the parent's handles are not ours to use or close
            self._reset_process_state()

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch` (call before iterating; persistent workers keep the epoch they started with).
        Open slides are closed, so a slide removed or replaced since is noticed."""
        self.epoch = int(epoch)
        self.close()
        self._blocks.clear()
        self._bad.clear()

    @property
    def open_slide_ids(self) -> list[str]:
        """Slides open in this process, least recently used first (at most `max_open_slides`)."""
        return [self.plans[i].slide.slide_id for i in self._readers]

    def close(self) -> None:
        if self._pid == os.getpid():
            for r in self._readers.values():
                r.close()
        self._readers = OrderedDict()

    # -- sampling ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def _draw(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(slide indices, int64 (size, 2) level-0 tile top-lefts)."""
        which = rng.choice(len(self.plans), size=size, p=self._p)
        u = rng.random((size, 3))
        xy = np.empty((size, 2), np.int64)
        for si in np.unique(which):
            m = which == si
            p = self.plans[si]
            if p.tops is not None:
                xy[m] = p.tops[np.minimum((u[m, 0] * len(p.tops)).astype(np.int64), len(p.tops) - 1)]
                continue
            assert p.tissue is not None and p.slide.mask is not None
            pix = p.tissue[np.minimum((u[m, 0] * len(p.tissue)).astype(np.int64), len(p.tissue) - 1)]
            my, mx = np.divmod(pix, p.slide.mask.shape[1])
            dx, dy = p.slide.mask_downsample
            half = p.geometry.patch_size_level0 / 2
            ps0 = p.geometry.patch_size_level0
            xy[m, 0] = np.clip(np.rint((mx + u[m, 1]) * dx - half), 0, p.width - ps0)
            xy[m, 1] = np.clip(np.rint((my + u[m, 2]) * dy - half), 0, p.height - ps0)
        return which, xy

    def draw(self, i: int, attempt: int = 0) -> tuple[int, int, int]:
        """(slide index, x, y) of item i of this epoch (`attempt` > 0: its redraws)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"item {i} out of range (0..{self.num_samples - 1})")
        if attempt:
            which, xy = self._draw(np.random.default_rng([self.seed, self.epoch, i, attempt]), 1)
            return int(which[0]), int(xy[0, 0]), int(xy[0, 1])
        b = i // BLOCK
        block = self._blocks.get(b)
        if block is None:
            size = min(BLOCK, self.num_samples - b * BLOCK)
            block = self._blocks[b] = self._draw(np.random.default_rng([self.seed, self.epoch, b]), size)
            while len(self._blocks) > 4:  # the blocks in use; nothing grows with the epoch
                self._blocks.popitem(last=False)
        which, xy = block
        j = i - b * BLOCK
        return int(which[j]), int(xy[j, 0]), int(xy[j, 1])

    # -- reading -----------------------------------------------------------------------------------
    def _reader(self, si: int) -> FastPatchReader:
        r = self._readers.get(si)
        if r is None:
            p = self.plans[si]
            while len(self._readers) >= self.max_open_slides:
                self._readers.popitem(last=False)[1].close()
            r = FastPatchReader(
                p.slide.path,
                p.geometry,
                threads=self.reader_threads,
                prefetch=0,
                scaled_decode=self.scaled_decode,
                cache_mb=self.cache_mb,
            )
            self._readers[si] = r
        self._readers.move_to_end(si)
        return r

    def _reject(self, si: int, what: str, e: BaseException) -> None:
        sid = self.plans[si].slide.slide_id
        n = self.stats.read_errors.get(sid, 0) + 1
        self.stats.read_errors[sid] = n
        if n <= MAX_LOGGED_PER_SLIDE:
            log.warning(f"{sid}: skipped {what} (redrawn): {type(e).__name__}: {e}")

    def _read_slide(self, si: int, xy: np.ndarray) -> list[np.ndarray | None]:
        """The tiles of one slide (None for each that cannot be read)."""
        if si in self._bad:
            return [None] * len(xy)
        try:
            reader = self._reader(si)
        except (SlideError, OSError, ValueError) as e:
            self._bad[si] = f"{type(e).__name__}: {e}"
            sid = self.plans[si].slide.slide_id
            self.stats.unreadable_slides[sid] = self._bad[si]
            log.warning(f"{sid}: cannot open the slide, its tiles are redrawn: {self._bad[si]}")
            return [None] * len(xy)
        try:
            return list(reader.read_patches(xy))
        except (SlideError, OSError) as e:
            if len(xy) == 1:
                self._reject(si, f"tile at ({xy[0, 0]}, {xy[0, 1]})", e)
                return [None]
        return [self._read_slide(si, xy[k : k + 1])[0] for k in range(len(xy))]  # find the bad ones

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch: tiles grouped by slide, each slide's read in one pass of the fast reader."""
        self._check_process()
        idx = [int(i) for i in indices]
        draws = [self.draw(i) for i in idx]
        attempts = [0] * len(idx)
        images: list[np.ndarray | None] = [None] * len(idx)
        todo = list(range(len(idx)))
        while todo:
            by_slide: dict[int, list[int]] = {}
            for j in todo:
                by_slide.setdefault(draws[j][0], []).append(j)
            todo = []
            for si, js in by_slide.items():
                xy = np.array([draws[j][1:] for j in js], np.int64)
                for j, img in zip(js, self._read_slide(si, xy), strict=True):
                    if img is not None:
                        images[j] = img
                        continue
                    attempts[j] += 1
                    self.stats.skipped += 1
                    if attempts[j] >= self.max_redraws:
                        raise TileReadError(
                            f"item {idx[j]}: no readable tile in {self.max_redraws} draws "
                            f"(unreadable slides: {self.stats.unreadable_slides or 'none'})"
                        )
                    draws[j] = self.draw(idx[j], attempts[j])
                    todo.append(j)
        self.stats.tiles += len(idx)
        return [self._item(draws[j], images[j], attempts[j]) for j in range(len(idx))]  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += self.num_samples
        return self.__getitems__([i])[0]

    def _item(self, draw: tuple[int, int, int], img: np.ndarray, skipped: int) -> dict[str, Any]:
        si, x, y = draw
        p = self.plans[si]
        item = {
            "image": self.transform(img) if self.transform else img,
            "slide_id": p.slide.slide_id,
            "slide_index": si,
            "x": x,
            "y": y,
            "level": p.geometry.read_level,
            "mpp": p.geometry.target_mpp,
            "skipped": skipped,
        }
        if p.slide.label is not None:
            item["label"] = p.slide.label
        return item
