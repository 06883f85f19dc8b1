#!/usr/bin/env python3
"""Benchmark: patch reading throughput (20x / 256 px patches from a 40x slide).

Compares, at 1 and 2 threads, on the same tissue patches (level-0 grid, step 512):
  openslide  OpenSlide read_region (via Slide) + cv2.INTER_AREA 512 -> 256
  tiffslide  tiffslide read_region + cv2.INTER_AREA
  fastslide  fastslide read_region + cv2.INTER_AREA
  ours-area  FastPatchReader, exact (tile decode once + INTER_AREA)
  ours-dct   FastPatchReader(scaled_decode=True): libjpeg-turbo DCT 1/2 decode, no resize
The baselines run one patch per call (threads via a ThreadPoolExecutor). OpenCV's own
threading is set to 1 so that "threads" means threads. Also prints the pixel difference
of the DCT-scaled patches vs the area-resized ones, and of ours-area vs the OpenSlide reference.

usage (from the repository root):
  python benchmarks/bench_reader.py [--n 3000] [--repeats 3] [--slide bench_data/bench40x.svs]
The slide (30000x20000, 40x) is built with ../shared/tools/make_test_slide.py if missing.
Goals: ours-area >= fastslide; ours-dct >= 1.6x fastslide. Timings are indicative (shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from atlaspatch_assets.core.fast_reader import FastPatchReader, reference_patch  # noqa: E402
from atlaspatch_assets.core.geometry import compute_geometry  # noqa: E402
from atlaspatch_assets.core.slide import open_slide  # noqa: E402

TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_test_slide.py"
PATCH, MAG = 256, 20
TISSUE_FRACTION = 0.25  # of the patch footprint on the thumbnail


def build_slide(path: Path) -> None:
    """Make the 40x benchmark slide with the shared tool (minutes; not timed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(TOOL), str(path), "--width", "30000", "--height", "20000", "--mag", "40"]
    print("building", path, "...", flush=True)
    subprocess.run(cmd, check=True)


def tissue_coords(path: Path, n: int) -> tuple[np.ndarray, object, object]:
    """First `n` grid patches (row-major) with >= TISSUE_FRACTION tissue on the thumbnail."""
    slide = open_slide(path)
    g = compute_geometry(slide.info, PATCH, target_mag=MAG)
    thumb, dx, dy = slide.read_thumbnail(8.0)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1] > 25
    ps0, W, H = g.patch_size_level0, slide.info.width, slide.info.height
    keep = []
    for y in range(0, H - ps0 + 1, g.step_size_level0):
        for x in range(0, W - ps0 + 1, g.step_size_level0):
            box = sat[int(y / dy) : int((y + ps0) / dy) + 1, int(x / dx) : int((x + ps0) / dx) + 1]
            if box.size and box.mean() >= TISSUE_FRACTION:
                keep.append((x, y))
    coords = np.array(keep[:n], np.int64)
    return coords, slide, g


def rate(fn: Callable[[], int]) -> float:
    """Items per second of one call of `fn` (which returns the item count)."""
    t = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - t)


def per_patch_loop(read: Callable[[int, int], np.ndarray], coords: np.ndarray, threads: int) -> int:
    """Read every patch with one call each (threads via a pool); returns the count."""
    if threads == 1:
        for x, y in coords:
            read(int(x), int(y))
    else:
        with ThreadPoolExecutor(threads) as ex:
            for _ in ex.map(lambda c: read(int(c[0]), int(c[1])), coords):
                pass
    return len(coords)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default=str(REPO_ROOT / "bench_data" / "bench40x.svs"))
    ap.add_argument("--n", type=int, default=3000, help="at most this many tissue patches")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    a = ap.parse_args()
    path = Path(a.slide)
    if not path.exists():
        build_slide(path)
    cv2.setNumThreads(1)
    path.read_bytes()  # warm the page cache so every method reads from memory
    coords, slide, g = tissue_coords(path, a.n)
    print(
        f"slide {path.name}: {slide.info.width}x{slide.info.height}, mpp {slide.info.mpp}, "
        f"levels {slide.info.level_dimensions}"
    )
    print(
        f"geometry: {PATCH}px @ {MAG}x -> read level {g.read_level}, read_size {g.read_size}; "
        f"{len(coords)} tissue patches"
    )

    try:
        import fastslide  # benchmark-only dependency, not in pyproject
    except ImportError:
        sys.exit("fastslide is needed for the comparison: pip install fastslide")
    import tiffslide

    ts = tiffslide.TiffSlide(str(path))
    fs = fastslide.FastSlide.from_file_path(str(path))
    rs, lvl = g.read_size, g.read_level

    def area(region: np.ndarray) -> np.ndarray:
        return cv2.resize(region, (PATCH, PATCH), interpolation=cv2.INTER_AREA)

    def read_openslide(x: int, y: int) -> np.ndarray:
        return area(slide.read_region((x, y), lvl, (rs, rs)))

    def read_tiffslide(x: int, y: int) -> np.ndarray:
        return area(np.asarray(ts.read_region((x, y), lvl, (rs, rs), as_array=True)))

    def read_fastslide(x: int, y: int) -> np.ndarray:
        lx, ly = fs.convert_level0_to_level_native(x, y, lvl)
        return area(np.asarray(fs.read_region((int(lx), int(ly)), lvl, (rs, rs)).numpy())[..., :3])

    paths: dict[bool, str] = {}

    def ours(xy: np.ndarray, threads: int, scaled: bool) -> int:
        with FastPatchReader(path, g, threads=threads, scaled_decode=scaled, slide=slide) as r:
            n = 0
            for idx, _ in r.iter_batches(xy, a.batch):
                n += len(idx)
            paths[scaled] = f"{r.path} ({r.stats['tiles_decoded'] / max(1, n):.2f} tile decodes/patch)"
        return n

    Method = Callable[[np.ndarray, int], int]
    methods: list[tuple[str, Method]] = [
        ("openslide read_region + area", lambda xy, t: per_patch_loop(read_openslide, xy, t)),
        ("tiffslide read_region + area", lambda xy, t: per_patch_loop(read_tiffslide, xy, t)),
        ("fastslide read_region + area", lambda xy, t: per_patch_loop(read_fastslide, xy, t)),
        ("ours exact (area resize)", lambda xy, t: ours(xy, t, False)),
        ("ours scaled_decode (DCT 1/2)", lambda xy, t: ours(xy, t, True)),
    ]
    for _, run in methods:  # warm-up: imports, first decodes
        run(coords[-50:], 1)
    runs: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name, _ in methods}
    for rep in range(a.repeats):  # rounds interleave the methods, so load changes hit all alike
        for name, run in methods:
            for t in (1, 2):
                runs[name][t].append(rate(lambda run=run, t=t: run(coords, t)))
        print(f"  round {rep + 1}/{a.repeats} done", flush=True)
    results = {name: {t: statistics.median(v) for t, v in r.items()} for name, r in runs.items()}

    fsr = results["fastslide read_region + area"]
    print()
    print("| method | 1 thread (patches/s) | 2 threads (patches/s) | vs fastslide 1t | vs fastslide 2t |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r[1]:.0f} | {r[2]:.0f} | {r[1] / fsr[1]:.2f}x | {r[2] / fsr[2]:.2f}x |")
    print(f"\npaths: exact = {paths.get(False)}, scaled = {paths.get(True)}")

    # Pixel differences on a subset.
    sub = coords[:300]
    with FastPatchReader(path, g, threads=2, slide=slide) as r:
        exact = r.read_patches(sub)
    with FastPatchReader(path, g, threads=2, scaled_decode=True, slide=slide) as r:
        scaled = r.read_patches(sub)
    ref = np.stack([reference_patch(slide, g, int(x), int(y)) for x, y in sub])
    d_ref = np.abs(exact.astype(np.int16) - ref)
    d_dct = np.abs(scaled.astype(np.int16) - exact)
    print(f"ours exact vs OpenSlide reference ({len(sub)} patches): max {d_ref.max()}, mean {d_ref.mean():.4f}")
    print(
        f"scaled decode vs area resize ({len(sub)} patches): max {d_dct.max()}, mean {d_dct.mean():.4f}, "
        f"p99 {np.percentile(d_dct, 99):.0f}"
    )
    goal_a = results["ours exact (area resize)"][1] / fsr[1]
    goal_d = results["ours scaled_decode (DCT 1/2)"][1] / fsr[1]
    print(
        f"goals (1 thread): exact >= 1.0x fastslide: {goal_a:.2f}x {'OK' if goal_a >= 1 else 'MISSED'}; "
        f"scaled >= 1.6x fastslide: {goal_d:.2f}x {'OK' if goal_d >= 1.6 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
