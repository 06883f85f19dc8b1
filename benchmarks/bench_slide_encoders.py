"""Peak memory and time of the slide encoders buildable offline, at 20k and 50k patches.

Each (encoder, N) runs in a fresh subprocess: build the authors' architecture with random weights
(``SlideEncoder.load(name, random_weights=True)``), make N random features of the encoder's real
input dim on a tissue-like grid (a random 75 % of a square lattice of level-0 512 px steps), encode
once, and report the child's peak RSS (``ru_maxrss``), the RSS after building, and the seconds.
"dense ref" is the memory the reference implementations would need for their N×N ALiBi bias
(TITAN: int64 diffs + float64 distances + dense bias copies; MOOZY: per-layer dense bias and
pairwise differences) — the path these encoders avoid by running attention in row chunks.

    python benchmarks/bench_slide_encoders.py                      # titan, moozy, prism, mean at 20k, 50k
    python benchmarks/bench_slide_encoders.py --encoders titan --sizes 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

INPUT_DIMS = {"titan": 768, "moozy": 384, "prism": 2560, "mean": 768, "max": 768}
PATCH_SIZE_LEVEL0 = {"titan": 1024, "moozy": 448, "prism": 448, "mean": 512, "max": 512}  # 40x slides


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _truncate(enc, layers: int) -> int:
    """Keep the first ``layers`` transformer blocks (peak memory is per block; time scales per block)."""
    model = enc.model
    if name_of(enc) == "titan":
        blocks = model.vision_encoder.blocks.modules_list
        full = len(blocks)
        model.vision_encoder.blocks.modules_list = blocks[:layers]
    elif name_of(enc) == "moozy":
        full = len(model.slide_encoder.blocks)
        model.slide_encoder.blocks = model.slide_encoder.blocks[:layers]
    else:
        return 0
    return full


def name_of(enc) -> str:
    return enc.spec.name


def child(name: str, n: int, seed: int = 0, layers: int = 0) -> dict:
    import numpy as np
    import torch

    from atlaspatch_assets.core.slide_encoders import SlideEncoder

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    enc = SlideEncoder.load(name, random_weights=True)
    build_s = time.perf_counter() - t0
    full_layers = _truncate(enc, layers) if layers else 0
    side = int(np.ceil(np.sqrt(n / 0.75)))
    cells = rng.choice(side * side, size=n, replace=False)
    step = PATCH_SIZE_LEVEL0[name]
    coords = np.stack([cells % side, cells // side], axis=1).astype(np.int64) * step
    feats = rng.standard_normal((n, INPUT_DIMS[name]), dtype=np.float32)
    rss_ready = _rss_mib()
    t1 = time.perf_counter()
    out = enc.encode(feats, coords, step)
    encode_s = time.perf_counter() - t1
    return {
        "encoder": name,
        "n": n,
        "dim_in": INPUT_DIMS[name],
        "dim_out": int(out.shape[0]),
        "build_s": build_s,
        "encode_s": encode_s,
        "rss_ready_mib": rss_ready,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finite": bool(np.isfinite(out).all()),
        "threads": torch.get_num_threads(),
        "layers_run": f"{layers}/{full_layers}" if full_layers else "all",
        # one block at a time is live, so peak memory is that of the full model; time scales per block
        "encode_s_full_est": encode_s * full_layers / layers if full_layers else encode_s,
    }


def dense_reference_gib(name: str, n: int) -> float | None:
    """Memory of the reference implementation's dense N×N ALiBi path (one layer live at a time)."""
    if name == "titan":
        from atlaspatch_assets.core.slide_encoders.titan import reference_bias_bytes

        return reference_bias_bytes(n, 12) / 2**30
    if name == "moozy":
        t = n + 5  # CLS + 4 registers
        return t * t * (12 * 4 * 2 + 2 * 4 + 4) / 2**30  # bias + bias cast, pairwise diffs, distances
    return None


def run(name: str, n: int, timeout: float, layers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(n), str(layers)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"encoder": name, "n": n, "error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"encoder": name, "n": n, "error": proc.stderr.strip().splitlines()[-1][:120]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", default="titan,moozy,prism,mean")
    ap.add_argument("--sizes", default="20000,50000")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per (encoder, N) run")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--layers", type=int, default=0, help="run only the first L transformer blocks (titan/moozy); 0 = all"
    )
    ap.add_argument("--child", nargs=3, metavar=("ENCODER", "N", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), layers=int(args.child[2]))))
        return 0

    results = []
    header = (
        f"{'encoder':<8} {'N':>7} {'in':>5} {'out':>5} {'build s':>8} {'encode s':>9} "
        f"{'RSS ready MiB':>14} {'peak RSS MiB':>13} {'dense ref GiB':>14} {'layers':>7} {'full-model s':>13}"
    )
    print(header)
    print("-" * len(header))
    for name in [e.strip() for e in args.encoders.split(",") if e.strip()]:
        for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
            r = run(name, n, args.timeout, args.layers)
            results.append(r)
            ref = dense_reference_gib(name, n)
            ref_s = f"{ref:14.1f}" if ref is not None else f"{'-':>14}"
            if "error" in r:
                print(f"{name:<8} {n:>7} ERROR {r['error']}")
            else:
                print(
                    f"{name:<8} {n:>7} {r['dim_in']:>5} {r['dim_out']:>5} {r['build_s']:>8.1f} {r['encode_s']:>9.1f} "
                    f"{r['rss_ready_mib']:>14.0f} {r['peak_rss_mib']:>13.0f} {ref_s} {r['layers_run']:>7} "
                    f"{r['encode_s_full_est']:>13.0f}"
                )
            sys.stdout.flush()
    threads = results[0].get("threads", "?") if results else "?"
    print(f"\n{os.cpu_count()} CPUs, torch threads {threads}; random weights")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
