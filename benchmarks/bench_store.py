"""Per-slide store formats side by side: HDF5 vs Zarr through the `SlideStore` API.

    python benchmarks/bench_store.py                 # 50,000 patches, 1,536-d float32 features, 3 runs
    python benchmarks/bench_store.py --patches 5000  # quicker

One slide's store gets coords (N, 2) int32 + one (N, 1536) float32 feature matrix in one write,
with the chunk hints the stages pass (coords 8192 rows, features 4096 rows). Then: a full read
(coords + features), a read of 1 % of the feature rows at random (`SlideStore.read_rows`), and the
bytes on disk. The features are synthetic with the statistics of real ones where it matters for
compression (non-negative, ~10 % exact zeros, random mantissas: zstd saves ~13 % on real
mobilenet_v2 features of CMU-1-Small-Region too). Reads hit the page cache (no cache dropping on
a shared machine); writes fsync, in both formats. Median of --runs, on a fresh folder each run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlaspatch_assets.core.store import COORDS, DatasetWrite, RunLayout, features_name  # noqa: E402
from atlaspatch_assets.core.store.convert import size_on_disk  # noqa: E402

ENC = "bench_1536"


def data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.gamma(0.7, 0.5, size=(n, dim)).astype(np.float32)
    feats[rng.random((n, dim)) < 0.1] = 0.0
    side = int(np.ceil(np.sqrt(n)))
    coords = (np.stack(np.unravel_index(np.arange(n), (side, side)), 1)[:, ::-1] * 224).astype(np.int32)
    return coords, feats


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(fmt: str, coords: np.ndarray, feats: np.ndarray, rows: np.ndarray, root: Path) -> dict[str, float]:
    layout = RunLayout.create(root, 224, target_mag=20, format=fmt)
    store = layout.store("slide")
    datasets = {
        COORDS: DatasetWrite(coords, {"patch_size": 224}, chunk_rows=8192),
        features_name(ENC): DatasetWrite(feats, {"encoder": ENC}, chunk_rows=4096),
    }
    write = timed(lambda: store.write(datasets, {"num_patches": len(coords)}))
    got: dict[str, np.ndarray] = {}
    full = timed(lambda: got.update(coords=store.coords(), feats=store.features(ENC)[0]))
    assert np.array_equal(got["coords"], coords) and np.array_equal(got["feats"], feats)
    subset: list[np.ndarray] = []
    rand = timed(lambda: subset.append(store.read_rows(features_name(ENC), rows)))
    assert np.array_equal(subset[0], feats[rows])
    return {"write": write, "full": full, "rand": rand, "bytes": size_on_disk(store.path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="Folder for the stores (default: the system temp folder)")
    args = ap.parse_args()
    coords, feats = data(args.patches, args.dim)
    rows = np.random.default_rng(1).choice(args.patches, max(1, args.patches // 100), replace=False)
    results: dict[str, list[dict[str, float]]] = {"h5": [], "zarr": []}
    for _ in range(args.runs):
        for fmt in results:  # interleaved, so both see the same machine load
            root = Path(tempfile.mkdtemp(prefix=f"bench-store-{fmt}-", dir=args.tmp))
            try:
                results[fmt].append(measure(fmt, coords, feats, rows, root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    med = {f: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for f, rs in results.items()}
    raw = coords.nbytes + feats.nbytes
    print(
        f"{args.patches:,} patches: coords ({args.patches}, 2) int32 + features ({args.patches}, {args.dim}) float32 "
        f"= {raw / 1e6:.1f} MB raw; 1 % random rows = {len(rows)} rows; median of {args.runs}\n"
    )
    print("| store | write s | full read s | 1 % random rows s | MB on disk | disk / raw |")
    print("|---|---:|---:|---:|---:|---:|")
    for f, m in med.items():
        print(
            f"| {f} | {m['write']:.3f} | {m['full']:.3f} | {m['rand']:.4f} | {m['bytes'] / 1e6:.1f} | "
            f"{m['bytes'] / raw:.2f} |"
        )
    h, z = med["h5"], med["zarr"]
    print(
        f"| zarr / h5 | {z['write'] / h['write']:.2f}× | {z['full'] / h['full']:.2f}× | "
        f"{z['rand'] / h['rand']:.2f}× | {z['bytes'] / h['bytes']:.2f}× | |"
    )


if __name__ == "__main__":
    main()
