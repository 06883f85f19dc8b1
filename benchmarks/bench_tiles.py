#!/usr/bin/env python3
"""Benchmark: batches of 256 tiles drawn at random from 20 slides, through a torch DataLoader.

Compares, with 1 and 2 DataLoader workers, on the very same tiles (the draws of SlideTileDataset,
20x / 256 px from 40x slides: a 513 px box at level 0, area-resized to 256):
  ours         SlideTileDataset (fast reader: tiles of a batch grouped per slide, each decoded once)
  ours-dct     SlideTileDataset(scaled_decode=True): libjpeg-turbo DCT 1/2 decode, no resize
  openslide    OpenSlide read_region + RGBA→RGB + cv2.INTER_AREA, one call per tile
  tiffslide    tiffslide read_region + cv2.INTER_AREA, one call per tile
  fastslide    fastslide read_region + cv2.INTER_AREA, one call per tile
The baselines run in the same DataLoader set-up (a map-style Dataset, one open handle per slide and
worker). Then the RSS of SlideTileDataset (main process + workers) over 20,000 tiles: mean of the
first vs the last quarter of the epoch (goal: within 5 %).

usage (from the repository root):
  python benchmarks/bench_tiles.py [--slides 20] [--width 12000 --height 9000] [--batches 12] [--rss-tiles 20000]
The slides are built with ../shared/tools/make_test_slide.py (seeds 1..N) into bench_data/tiles/
(gitignored) and segmented with the pipeline (`segment-and-get-coords`) the first time.
Goals: ours >= 3x openslide and >= fastslide at the same worker count; flat RSS.
Timings are indicative (shared 2-core machine); every row of a table is measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from atlaspatch_assets.core.training.tiles import SlideTileDataset, tile_slides_from_run  # noqa: E402

TOOL = REPO_ROOT.parent / "shared" / "tools" / "make_test_slide.py"
DATA = REPO_ROOT / "bench_data" / "tiles"
PATCH, MAG, BATCH = 256, 20, 256


def build(n: int, width: int, height: int) -> Path:
    """n slides (seeds 1..n) and their coordinates (the pipeline's own), built once."""
    slides = DATA / f"slides_{width}x{height}"
    slides.mkdir(parents=True, exist_ok=True)
    todo = [slides / f"bench-{i:02d}.svs" for i in range(1, n + 1) if not (slides / f"bench-{i:02d}.svs").exists()]

    def make(p: Path) -> None:
        seed = str(int(p.stem.split("-")[1]))
        tmp = p.with_suffix(".part.svs")
        cmd = [sys.executable, str(TOOL), str(tmp), "--width", str(width), "--height", str(height), "--seed", seed]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tmp.rename(p)

    if todo:
        print(f"building {len(todo)} slides in {slides} ...", flush=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(make, todo))
    out = DATA / f"out_{width}x{height}"
    paths = sorted(slides.glob("bench-*.svs"))[:n]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "atlaspatch_assets.cli", "segment-and-get-coords", *map(str, paths), "-o", str(out)]
    subprocess.run(
        [*cmd, "--patch-size", str(PATCH), "--target-mag", str(MAG)], check=True, env=env, stdout=subprocess.DEVNULL
    )
    return out


class Baseline(Dataset):
    """The same draws read with one library call per tile (handles opened lazily in each worker)."""

    def __init__(self, lib: str, ds: SlideTileDataset, n: int):
        self.lib, self.n = lib, n
        self.paths = [p.slide.path for p in ds.plans]
        self.geo = [(p.geometry.read_level, p.geometry.read_size, p.geometry.read_downsample) for p in ds.plans]
        self.draws = np.array([ds.draw(i) for i in range(n)], np.int64)
        self.handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.n

    def _open(self, si: int) -> Any:
        h = self.handles.get(si)
        if h is None:
            path = self.paths[si]
            if self.lib == "openslide":
                import openslide

                h = openslide.OpenSlide(path)
            elif self.lib == "tiffslide":
                import tiffslide

                h = tiffslide.TiffSlide(path)
            else:
                import fastslide

                h = fastslide.FastSlide.from_file_path(path)
            self.handles[si] = h
        return h

    def __getitem__(self, i: int) -> np.ndarray:
        si, x, y = (int(v) for v in self.draws[i])
        level, size, ds = self.geo[si]
        h = self._open(si)
        if self.lib == "openslide":
            rgb = np.asarray(h.read_region((x, y), level, (size, size)).convert("RGB"))
        elif self.lib == "tiffslide":
            rgb = h.read_region((x, y), level, (size, size), as_array=True)[..., :3]
        else:
            rgb = h.read_region((round(x / ds), round(y / ds)), level, (size, size)).numpy()[..., :3]
        return cv2.resize(np.ascontiguousarray(rgb), (PATCH, PATCH), interpolation=cv2.INTER_AREA)


def worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # "workers" means workers; a fresh worker (not forked mid-use) may set this


def rate(dataset: Dataset, workers: int, batches: int) -> float:
    """Tiles/s over `batches` batches of 256 after one warm-up batch (slide opening excluded)."""
    dl = DataLoader(
        dataset,
        batch_size=BATCH,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
        collate_fn=lambda b: len(b),
    )
    it = iter(dl)
    n = next(it)
    for _ in range(workers - 1):
        n += next(it)
    t0, count = time.perf_counter(), 0
    for _ in range(batches):
        count += next(it)
    return count / (time.perf_counter() - t0)


def rss_mb(proc: psutil.Process) -> float:
    total = proc.memory_info().rss
    for c in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += c.memory_info().rss
    return total / 2**20


def rss_over_epoch(ds: SlideTileDataset, tiles: int, workers: int) -> tuple[float, float, float]:
    """(peak, mean of the first quarter, mean of the last quarter) RSS in MB over one epoch of `tiles`."""
    ds.num_samples = tiles
    me = psutil.Process()
    dl = DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=lambda b: len(b))
    samples = []
    for _ in dl:
        samples.append(rss_mb(me))
    q = max(1, len(samples) // 4)
    return max(samples), float(np.mean(samples[:q])), float(np.mean(samples[-q:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=20)
    ap.add_argument("--width", type=int, default=12000)
    ap.add_argument("--height", type=int, default=9000)
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 256 per row")
    ap.add_argument("--rss-tiles", type=int, default=20000)
    ap.add_argument("--workers", default="1,2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = build(a.slides, a.width, a.height)
    slides = tile_slides_from_run(out)
    n = BATCH * (a.batches + 3)

    def ours(**kw: Any) -> SlideTileDataset:
        return SlideTileDataset(slides, PATCH, target_mag=MAG, num_samples=n, seed=0, max_open_slides=a.slides, **kw)

    ds = ours()
    d = ds.describe()[0]
    print(
        f"{len(slides)} slides {a.width}x{a.height} at 40x; 20x/{PATCH}px tiles = {d['read_size']} px boxes at "
        f"level {d['read_level']}; {a.batches} timed batches of {BATCH} per row\n"
    )
    rows: list[tuple[str, dict[int, float]]] = []
    libs = ["openslide", "tiffslide"]
    try:
        import fastslide  # noqa: F401

        libs.append("fastslide")
    except ImportError:
        print("fastslide is not installed: its row is left out")
    workers = [int(w) for w in a.workers.split(",")]
    candidates: list[tuple[str, Any]] = [("ours", lambda: ours()), ("ours-dct", lambda: ours(scaled_decode=True))]
    candidates += [(lib, lambda lib=lib: Baseline(lib, ds, n)) for lib in libs]
    for name, make in candidates:
        rows.append((name, {w: rate(make(), w, a.batches) for w in workers}))
        print(f"  {name}: " + ", ".join(f"{w} workers {r:.0f}/s" for w, r in rows[-1][1].items()), flush=True)
    base = dict(rows)
    print(
        "\n| reader | "
        + " | ".join(f"{w} worker{'s' if w > 1 else ''} tiles/s" for w in workers)
        + " | × openslide | × fastslide |"
    )
    print("|---|" + "---:|" * (len(workers) + 2))
    for name, r in rows:
        x_os = " / ".join(f"{r[w] / base['openslide'][w]:.2f}×" for w in workers)
        x_fs = " / ".join(f"{r[w] / base['fastslide'][w]:.2f}×" for w in workers) if "fastslide" in base else "–"
        print(f"| {name} | " + " | ".join(f"{r[w]:.0f}" for w in workers) + f" | {x_os} | {x_fs} |")

    print(f"\nRSS over {a.rss_tiles} tiles (SlideTileDataset, main process + workers):\n")
    print("| workers | peak MB | first quarter MB | last quarter MB | last / first |")
    print("|---:|---:|---:|---:|---:|")
    for w in (0, 2):
        peak, first, last = rss_over_epoch(ours(), a.rss_tiles, w)
        print(f"| {w} | {peak:.0f} | {first:.0f} | {last:.0f} | {last / first:.3f} |", flush=True)


if __name__ == "__main__":
    main()
