#!/usr/bin/env python3
"""Benchmark: patch-feature extraction (`extract_features`) on CPU, 20x / 256 px patches of a 40x slide.

Sections (median of --repeats runs, methods interleaved within each round; torch.set_num_threads):
  (a) reader only: FastPatchReader patches/s, exact (area resize) and scaled decode (DCT 1/2), for context
  (b) resnet18 (random weights), float32 and bfloat16 (CPU autocast + channels_last, as Encoder does):
      model only (random uint8 batches of the same shapes through the same Encoder.__call__) vs
      end-to-end extract_features on the slide's tissue patches; goal end-to-end / model only >= 0.85
  (c) 1 vs 3 encoders (resnet18 + mobilenet_v2 + efficientnet_lite0, real weights for the last two):
      one 3-encoder pass vs the sum of three 1-encoder passes, and the reader statistics of the pass
      (each patch assembled once, tiles decoded once); goal: one read pass
  (d) scaled decode vs exact: pixel differences, and their effect on mobilenet_v2 (real weights)
      features (cosine, relative L2), next to the drift of bfloat16 vs float32 on exact patches
  (e) does prefetch keep up: the extract_features loop re-run with timers around the reader's
      `next()` (consumer waiting on the reader) and the encoder, for a few reader_threads/prefetch

Coordinates come from compute_tissue_mask + compute_patch_coords (20x, 256 px, --step, --min-tissue),
the first --n of them (row-major, like a real pass). The slide is bench_reader.py's
(bench_data/bench40x.svs, 30000x20000 at 40x), built with ../shared/tools/make_test_slide.py if missing.

usage (from the repository root):
  python benchmarks/bench_features.py [--n 600] [--repeats 3] [--multi-precisions bfloat16]
                                      [--reader-threads 2] [--prefetch 2] [--profile]
Timings are indicative: the machine is shared (the load average is printed per section).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from atlaspatch_assets.core.encoders import Encoder, get_encoder_spec  # noqa: E402
from atlaspatch_assets.core.fast_reader import FastPatchReader  # noqa: E402
from atlaspatch_assets.core.segmentation import SegmentationParams  # noqa: E402
from atlaspatch_assets.core.slide import Slide, open_slide  # noqa: E402
from atlaspatch_assets.core.stages.coords import CoordsParams, CoordsResult, compute_patch_coords  # noqa: E402
from atlaspatch_assets.core.stages.features import extract_features  # noqa: E402
from atlaspatch_assets.core.stages.mask import compute_tissue_mask  # noqa: E402
from atlaspatch_assets.core.store import RunLayout  # noqa: E402

TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_test_slide.py"
PATCH, MAG = 256, 20
PRECISIONS = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
RATIO_GOAL = 0.85
MIN_COSINE = 0.99


def build_slide(path: Path) -> None:
    """Make the 40x benchmark slide with the shared tool (as bench_reader.py does; not timed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(TOOL), str(path), "--width", "30000", "--height", "20000", "--mag", "40"]
    print("building", path, "...", flush=True)
    subprocess.run(cmd, check=True)


def load() -> str:
    return "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print(flush=True)


def median(v: Sequence[float]) -> float:
    return statistics.median(v) if v else float("nan")


def tissue_coords(slide: Slide, step: int, min_tissue: float, n: int) -> tuple[CoordsResult, int]:
    """The pipeline's coordinates (first `n`, row-major) and how many the slide has in total."""
    layout = RunLayout.create(REPO_ROOT / "bench_data" / "_unused", PATCH, step_size=step, target_mag=MAG)
    mask = compute_tissue_mask(slide, "bench", SegmentationParams())
    full = compute_patch_coords(slide, "bench", layout, mask, CoordsParams(min_tissue_fraction=min_tissue))
    sub = dataclasses.replace(full, coords=full.coords[:n], tissue_fraction=full.tissue_fraction[:n])
    return sub, full.num_patches


def random_batches(n: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 NHWC batches with exactly the shapes extract_features feeds (incl. the short last one)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (min(batch, n - b0), PATCH, PATCH, 3), np.uint8) for b0 in range(0, n, batch)]


def model_only(encoders: Sequence[Encoder], batches: Sequence[np.ndarray]) -> float:
    t = time.perf_counter()
    for b in batches:
        for enc in encoders:
            enc(b)
    return time.perf_counter() - t


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, process CPU s of all threads, result) of one call."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def tiles_covered(slide: Slide, coords: CoordsResult) -> int | None:
    """Distinct TIFF tiles under the patches' read boxes (exact path): what one read pass must decode."""
    import tifffile

    g, info = coords.geometry, slide.info
    lw, lh = info.level_dimensions[g.read_level]
    ds = info.level_downsamples[g.read_level]
    with tifffile.TiffFile(slide.path) as tf:
        page = next((p for p in tf.pages if p.is_tiled and (p.imagewidth, p.imagelength) == (lw, lh)), None)
        if page is None:
            return None
        tile_wh = (int(page.tilewidth), int(page.tilelength))
    spans = []
    for axis, (tile, lim) in enumerate(zip(tile_wh, (lw, lh), strict=True)):
        w = coords.coords[:, axis].astype(np.float64) / ds
        i = np.floor(w).astype(np.int64)
        end = i + g.read_size - 1 + (w - i > 1e-6)  # one more pixel when interpolating
        spans.append((np.clip(i, 0, lim - 1) // tile, np.clip(end, 0, lim - 1) // tile))
    (x0, x1), (y0, y1) = spans
    return len(
        {
            (ty, tx)
            for a, b, c, d in zip(y0, y1, x0, x1, strict=True)
            for ty in range(a, b + 1)
            for tx in range(c, d + 1)
        }
    )


def read_pass(slide: Slide, coords: CoordsResult, threads: int, prefetch: int, batch: int, scaled: bool) -> dict:
    with FastPatchReader(
        slide.path, coords.geometry, threads=threads, prefetch=prefetch, scaled_decode=scaled, slide=slide
    ) as r:
        for _ in r.iter_batches(coords.coords, batch):
            pass
        return r.describe()


def resnet18_encoders(seed: int = 0) -> dict[str, Encoder]:
    spec = get_encoder_spec("resnet18")
    torch.manual_seed(seed)
    model = spec.create()  # random weights: the speed is what matters here
    return {p: Encoder(spec, copy.deepcopy(model), precision=p) for p in PRECISIONS}


# -- (a) ---------------------------------------------------------------------------------------------------
def section_reader(a: argparse.Namespace, slide: Slide, coords: CoordsResult) -> None:
    n = coords.num_patches
    print(f"## (a) reader only: FastPatchReader, {n} patches, batch {a.batch}, prefetch {a.prefetch}  [{load()}]")
    thread_counts = sorted({1, a.reader_threads})
    methods = [(scaled, t) for scaled in (False, True) for t in thread_counts]
    for scaled, t in methods:  # warm-up
        read_pass(slide, dataclasses.replace(coords, coords=coords.coords[:64]), t, a.prefetch, a.batch, scaled)
    runs: dict[tuple[bool, int], list[float]] = {m: [] for m in methods}
    info: dict[bool, dict] = {}
    for _ in range(a.repeats):
        for scaled, t in methods:
            s, _, d = timed(lambda scaled=scaled, t=t: read_pass(slide, coords, t, a.prefetch, a.batch, scaled))
            runs[(scaled, t)].append(n / s)
            info[scaled] = d
    rows = []
    for scaled in (False, True):
        d = info[scaled]
        rates = [f"{median(runs[(scaled, t)]):.0f}" for t in thread_counts]
        name = "scaled decode" if scaled else "exact (area resize)"
        rows.append([name, d["path"], *rates, f"{d['tiles_decoded'] / max(1, d['patches']):.2f}"])
    table(["reader", "path", *[f"{t} thread(s) patches/s" for t in thread_counts], "tile decodes/patch"], rows)


# -- (b) ---------------------------------------------------------------------------------------------------
def section_e2e(a: argparse.Namespace, slide: Slide, coords: CoordsResult) -> None:
    n = coords.num_patches
    print(
        f"## (b) resnet18 (random weights): model only vs end-to-end extract_features, {n} patches, batch {a.batch}, "
        f"reader_threads {a.reader_threads}, prefetch {a.prefetch}  [{load()}]"
    )
    encs = resnet18_encoders()
    batches = random_batches(n, a.batch)
    for enc in encs.values():  # warm-up: oneDNN primitives for the full and the short last batch
        model_only([enc], [batches[0], batches[-1]])
    mo: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}  # (wall s, CPU s)
    ee: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
    split: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}  # (model s, waiting s) in e2e
    for _ in range(a.repeats):
        for p, enc in encs.items():
            s, c, _ = timed(lambda enc=enc: model_only([enc], batches))
            mo[p].append((s, c))
            s, c, res = timed(
                lambda enc=enc: extract_features(
                    slide,
                    "bench",
                    coords,
                    {"resnet18": enc},
                    batch_size=a.batch,
                    reader_threads=a.reader_threads,
                    prefetch=a.prefetch,
                )
            )
            ee[p].append((s, c))
            r = res["resnet18"]
            split[p].append((r.extra["model_seconds"], r.extra["wall_seconds"] - r.extra["model_seconds"]))
    rows = []
    for p in PRECISIONS:
        m, e = median([w for w, _ in mo[p]]), median([w for w, _ in ee[p]])
        best = min(w for w, _ in mo[p]) / min(w for w, _ in ee[p])
        mc, ec = median([c for _, c in mo[p]]), median([c for _, c in ee[p]])
        ms = median([x for x, _ in split[p]])
        ws = median([w for _, w in split[p]])
        ratio = m / e
        rows.append(
            [
                SHORT[p],
                f"{n / m:.1f}",
                f"{n / e:.1f}",
                f"{ratio:.2f} {'OK' if ratio >= RATIO_GOAL else 'MISSED'}",
                f"{best:.2f}",
                f"{1000 * mc / n:.1f} / {1000 * ec / n:.1f} ({mc / ec:.2f})",
                f"{ms:.2f} ({ms / m:.2f}x)",
                f"{ws:.2f} ({ws / e:.0%})",
            ]
        )
    table(
        [
            "precision",
            "model only patches/s",
            "end-to-end patches/s",
            f"e2e / model, median (goal >= {RATIO_GOAL})",
            "best-of / best-of",
            "CPU ms/patch model only / e2e (ratio)",
            "e2e: model s (vs model only)",
            "e2e: waiting on reader s (of wall)",
        ],
        rows,
    )


# -- (c) ---------------------------------------------------------------------------------------------------
MULTI = ("resnet18", "mobilenet_v2", "efficientnet_lite0")


def section_multi(a: argparse.Namespace, slide: Slide, coords: CoordsResult, precisions: Sequence[str]) -> None:
    n = coords.num_patches
    print(f"## (c) 1 vs 3 encoders in one pass ({', '.join(MULTI)}), {n} patches  [{load()}]")
    rn = resnet18_encoders()
    sets = {p: {"resnet18": rn[p], **{m: Encoder.load(m, precision=p) for m in MULTI[1:]}} for p in precisions}
    batches = random_batches(n, a.batch)
    for encs in sets.values():
        model_only(list(encs.values()), [batches[0], batches[-1]])

    def run(encs: dict[str, Encoder]) -> tuple[float, float, dict]:
        return timed(
            lambda: extract_features(
                slide, "bench", coords, encs, batch_size=a.batch, reader_threads=a.reader_threads, prefetch=a.prefetch
            )
        )

    one: dict[str, list[float]] = {p: [] for p in precisions}
    model3: dict[str, list[float]] = {p: [] for p in precisions}  # the 3 models per batch, no reading
    singles: dict[str, list[float]] = {p: [] for p in precisions}
    per_enc: dict[tuple[str, str], list[float]] = {}
    model_in_multi: dict[tuple[str, str], list[float]] = {}
    last: dict[str, dict] = {}
    single_reader: dict[str, dict] = {}
    for _ in range(a.repeats):
        for p in precisions:
            model3[p].append(model_only(list(sets[p].values()), batches))
            s, _, res = run(sets[p])
            one[p].append(s)
            last[p] = res
            for m in MULTI:
                model_in_multi.setdefault((p, m), []).append(res[m].extra["model_seconds"])
            total = 0.0
            for m, enc in sets[p].items():
                s1, _, r1 = run({m: enc})
                total += s1
                per_enc.setdefault((p, m), []).append(s1)
                single_reader[p] = r1[m].extra["reader"]
            singles[p].append(total)
    rows = []
    for p in precisions:
        o, s, m3 = median(one[p]), median(singles[p]), median(model3[p])
        rows.append(
            [
                SHORT[p],
                f"{m3:.1f}",
                f"{o:.1f} ({m3 / o:.2f})",
                f"{s:.1f}",
                f"{s - o:.1f} ({(s - o) / s:.0%})",
                f"{3 * n / o:.1f}",
            ]
        )
    table(
        [
            "precision",
            "model only, 3 encoders s",
            "one 3-encoder pass s (model only / this)",
            "sum of 3 single passes s",
            "saved by one pass s",
            "patch-features/s (3 enc)",
        ],
        rows,
    )
    rows = []
    for p in precisions:
        for m in MULTI:
            rows.append([f"{SHORT[p]} {m}", f"{median(per_enc[(p, m)]):.1f}", f"{median(model_in_multi[(p, m)]):.1f}"])
    table(["encoder", "single pass wall s", "model s inside the 3-encoder pass"], rows)
    covered = tiles_covered(slide, coords)
    rows = []
    for p in precisions:
        res = last[p]
        reader = res[MULTI[0]].extra["reader"]
        shared = all(res[m].extra["reader"] is reader for m in MULTI)
        once = reader["patches"] == n and shared and reader["tiles_decoded"] == single_reader[p]["tiles_decoded"]
        if covered is not None and reader["resize"] != "dct":
            once = once and reader["tiles_decoded"] == covered
        rows.append(
            [
                SHORT[p],
                reader["path"],
                f"{reader['patches']} / {n}",
                reader["tiles_decoded"],
                single_reader[p]["tiles_decoded"],
                covered if covered is not None else "?",
                reader["tile_hits"],
                reader["evictions"],
                "OK (one read pass)" if once else "MISSED",
            ]
        )
    table(
        [
            "precision",
            "reader path",
            "patches read (3-enc pass) / N",
            "tiles decoded (3-enc pass)",
            "tiles decoded (1-enc pass)",
            "distinct tiles under the patches",
            "tile hits",
            "evictions",
            "goal",
        ],
        rows,
    )


# -- (d) ---------------------------------------------------------------------------------------------------
def drift(f: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, float]:
    """Per-patch cosine (mean, min), relative L2 of the whole matrix, max per-patch relative L2."""
    cos = (f * ref).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    rel = float(np.linalg.norm(f - ref) / np.linalg.norm(ref))
    rel_row = np.linalg.norm(f - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-12)
    return float(cos.mean()), float(cos.min()), rel, float(rel_row.max())


def section_scaled(a: argparse.Namespace, slide: Slide, coords: CoordsResult) -> None:
    sub = coords.coords[: a.n_scaled]
    n = len(sub)
    print(f"## (d) scaled decode vs exact, {n} patches, mobilenet_v2 (real weights)  [{load()}]")
    paths = {}
    pix = {}
    for scaled in (False, True):
        kw = dict(threads=a.reader_threads, scaled_decode=scaled, slide=slide)
        with FastPatchReader(slide.path, coords.geometry, **kw) as r:
            pix[scaled] = r.read_patches(sub, a.batch)
            paths[scaled] = r.path
    d = np.abs(pix[True].astype(np.int16) - pix[False])
    table(
        ["pixels: scaled vs exact", "max abs", "mean abs", "p99 abs", "exact path", "scaled path"],
        [["uint8 RGB", int(d.max()), f"{d.mean():.3f}", f"{np.percentile(d, 99):.0f}", paths[False], paths[True]]],
    )

    def feats(enc: Encoder, x: np.ndarray) -> np.ndarray:
        return np.concatenate([enc(x[i : i + a.batch]) for i in range(0, len(x), a.batch)])

    fp32, bf16 = Encoder.load("mobilenet_v2"), Encoder.load("mobilenet_v2", precision="bfloat16")
    exact32, scaled32, exact16 = feats(fp32, pix[False]), feats(fp32, pix[True]), feats(bf16, pix[False])
    ds, db = drift(scaled32, exact32), drift(exact16, exact32)
    table(
        ["features vs exact fp32", "cosine mean", "cosine min", "relative L2", "max per-patch rel L2"],
        [
            ["scaled decode, fp32", f"{ds[0]:.5f}", f"{ds[1]:.5f}", f"{ds[2]:.4f}", f"{ds[3]:.4f}"],
            ["exact, bf16 autocast", f"{db[0]:.5f}", f"{db[1]:.5f}", f"{db[2]:.4f}", f"{db[3]:.4f}"],
        ],
    )
    if ds[2] > db[2] or ds[1] < MIN_COSINE:
        why = []
        if ds[2] > db[2]:
            why.append(f"its feature drift (rel L2 {ds[2]:.4f}) exceeds bf16's ({db[2]:.4f})")
        if ds[1] < MIN_COSINE:
            why.append(f"min cosine {ds[1]:.4f} < {MIN_COSINE}")
        print("recommendation: keep exact decode as the default; scaled decode stays opt-in (" + "; ".join(why) + ")")
    else:
        print(
            f"recommendation: scaled decode is acceptable (feature drift rel L2 {ds[2]:.4f} <= bf16's {db[2]:.4f}, "
            f"min cosine {ds[1]:.4f} >= {MIN_COSINE})"
        )
    print(flush=True)


# -- (e) ---------------------------------------------------------------------------------------------------
def instrumented_pass(
    slide: Slide, coords: CoordsResult, enc: Encoder, threads: int, prefetch: int, batch: int
) -> dict[str, float]:
    """extract_features' loop with timers: reader set-up, waits in next(), encoder time."""
    t0, c0 = time.perf_counter(), time.process_time()
    waits: list[float] = []
    model = 0.0
    with FastPatchReader(slide.path, coords.geometry, threads=threads, prefetch=prefetch, slide=slide) as r:
        setup = time.perf_counter() - t0
        it = r.iter_batches(coords.coords, batch)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            waits.append(time.perf_counter() - t)
            if item is None:
                break
            t = time.perf_counter()
            enc(item[1])
            model += time.perf_counter() - t
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "cpu": time.process_time() - c0,
        "setup": setup,
        "first": waits[0],
        "steady": sum(waits[1:]),
        "steady_batches": sum(w > 0.005 for w in waits[1:-1]),
        "batches": len(waits) - 1,
        "model": model,
    }


def section_prefetch(a: argparse.Namespace, slide: Slide, coords: CoordsResult) -> None:
    n = coords.num_patches
    print(f"## (e) does prefetch keep up? resnet18 bf16 (fastest model here), {n} patches  [{load()}]")
    enc = resnet18_encoders()["bfloat16"]
    batches = random_batches(n, a.batch)
    model_only([enc], [batches[0], batches[-1]])
    # Where the encoder's own time goes: preprocess (uint8 -> float, resize 256 -> 224, normalize) vs forward.
    pre, fwd = [], []
    for _ in range(a.repeats):
        with torch.inference_mode():
            t = time.perf_counter()
            x = enc.preprocess(batches[0])
            pre.append(time.perf_counter() - t)
            t = time.perf_counter()
            enc.forward_tensor(x)
            fwd.append(time.perf_counter() - t)
    p_ms, f_ms = 1000 * median(pre), 1000 * median(fwd)
    print(
        f"Encoder.__call__ on one batch of {a.batch}: preprocess {p_ms:.0f} ms + forward {f_ms:.0f} ms "
        f"(preprocess = {p_ms / (p_ms + f_ms):.0%} of the encoder's time)\n"
    )
    configs = [(1, 2), (2, 0), (2, 2), (2, 4), (4, 2)]
    runs: dict[tuple[int, int], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(a.repeats):
        for threads, prefetch in configs:
            runs[(threads, prefetch)].append(instrumented_pass(slide, coords, enc, threads, prefetch, a.batch))
    rows = []
    for (threads, prefetch), rs in runs.items():

        def med(k: str, rs: list[dict[str, float]] = rs) -> float:
            return median([r[k] for r in rs])

        wall = med("wall")
        rows.append(
            [
                f"threads {threads}, prefetch {prefetch}",
                f"{n / wall:.1f}",
                f"{med('setup'):.2f}",
                f"{med('first'):.2f}",
                f"{med('steady'):.2f} ({med('steady') / wall:.0%})",
                f"{med('steady_batches'):.0f} / {med('batches'):.0f}",
                f"{med('model'):.2f}",
                f"{1000 * med('cpu') / n:.1f}",
            ]
        )
    table(
        [
            "reader",
            "patches/s",
            "reader set-up s",
            "wait for batch 1 s",
            "wait later s (of wall)",
            "later batches waited > 5 ms",
            "model s",
            "CPU ms/patch",
        ],
        rows,
    )
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        extract_features(
            slide, "bench", coords, {"resnet18": enc}, batch_size=a.batch, reader_threads=a.reader_threads,
            prefetch=a.prefetch,
        )  # fmt: skip
        prof.disable()
        out = REPO_ROOT / "bench_data" / "bench_features.prof"
        prof.dump_stats(out)
        print(f"cProfile of one extract_features pass (main thread only; reader workers are not seen), {out}:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default=str(REPO_ROOT / "bench_data" / "bench40x.svs"))
    ap.add_argument("--n", type=int, default=600, help="at most this many tissue patches (first, row-major)")
    ap.add_argument("--step", type=int, default=256, help="patch step at 20x (256 = no overlap)")
    ap.add_argument("--min-tissue", type=float, default=0.25, help="min tissue fraction per patch")
    ap.add_argument("--n-scaled", type=int, default=300, help="patches for the scaled-decode comparison (d)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reader-threads", type=int, default=2, help="extract_features' default")
    ap.add_argument("--prefetch", type=int, default=2, help="extract_features' default")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--multi-precisions", default="bfloat16", help="comma list for (c): float32,bfloat16")
    ap.add_argument("--sections", default="abcde", help="which sections to run")
    ap.add_argument("--profile", action="store_true", help="(e): + cProfile of one extract_features pass")
    a = ap.parse_args()
    multi = [p.strip() for p in a.multi_precisions.split(",") if p.strip()]
    if bad := [p for p in multi if p not in PRECISIONS]:
        sys.exit(f"--multi-precisions: unknown {bad}; use {PRECISIONS}")

    path = Path(a.slide)
    if not path.exists():
        build_slide(path)
    torch.set_num_threads(a.torch_threads)
    path.read_bytes()  # page cache: every method reads from memory
    slide = open_slide(path)
    coords, total = tissue_coords(slide, a.step, a.min_tissue, a.n)
    g = coords.geometry
    print(
        f"slide {path.name}: {slide.info.width}x{slide.info.height}, mpp {slide.info.mpp}; {PATCH}px @ {MAG}x -> "
        f"read level {g.read_level}, read_size {g.read_size}; {coords.num_patches} of {total} tissue patches "
        f"(step {a.step}, min tissue {a.min_tissue})"
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"repeats {a.repeats} (median); {load()}\n",
        flush=True,
    )
    t0 = time.perf_counter()
    steps = {
        "a": lambda: section_reader(a, slide, coords),
        "b": lambda: section_e2e(a, slide, coords),
        "c": lambda: section_multi(a, slide, coords, multi),
        "d": lambda: section_scaled(a, slide, coords),
        "e": lambda: section_prefetch(a, slide, coords),
    }
    for key in a.sections:
        t = time.perf_counter()
        steps[key]()
        print(f"(section {key}: {time.perf_counter() - t:.0f} s; {load()})\n", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    slide.close()


if __name__ == "__main__":
    main()
