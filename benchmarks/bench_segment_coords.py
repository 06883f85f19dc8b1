#!/usr/bin/env python3
"""Benchmark: tissue segmentation + patch coordinates on large 40x pyramidal slides.

Measures the core library calls exactly as the pipeline runs them (open_slide →
compute_tissue_mask → compute_patch_coords → save_tissue_mask/save_patch_coords) on
synthetic Aperio-style SVS slides built with ../shared/tools/make_test_slide.py.

Every measurement runs in a fresh child process (`--one PATH`), so the peak RSS
(ru_maxrss) belongs to that slide alone; the child also records its RSS right after
the imports (the baseline), and the table reports the peak above that baseline.
Each slide is measured `--repeats` times (default 3, rounds interleaved across slides)
and the table shows medians.

Goals (largest slide): segmentation + coordinates <= 2.5 s, peak RSS <= 500 MB (issue 10; the
peak above baseline vs the slide size is shown for information).

usage (from the repository root):
  python benchmarks/bench_segment_coords.py                 # build slides if needed, run, print table
  python benchmarks/bench_segment_coords.py --profile       # + one cProfile'd child per slide
  python benchmarks/bench_segment_coords.py --baseline b86c6bc  # + the package of that commit, side by side
  python benchmarks/bench_segment_coords.py --one PATH      # child mode: one measurement, JSON line

The slides go to bench_data/ (gitignored); building the 80000x60000 slide takes minutes
and is timed separately (recorded in bench_data/<slide>.build.json), never counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_test_slide.py"
DEFAULT_SIZES = "20000x15000,80000x60000"
RESULT_PREFIX = "BENCH_RESULT "

GOAL_SECONDS = 2.5  # segmentation + coordinates, largest slide (issue 10)
GOAL_PEAK_MB = 500.0  # peak RSS, largest slide
# Informational since issue 10 (no longer a goal): how much the peak above baseline grows with the
# slide. The mask's working memory is proportional to the thumbnail (fixed µm/px), so it grows
# with the slide's area; the goal is the absolute peak above.
GOAL_RSS_RATIO = 1.5
GOAL_RSS_SLACK_MB = 64.0

MB = 1024.0 * 1024.0


# -- child: one measurement ------------------------------------------------------------------------


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def source_fingerprint(modules: list[Any]) -> str:
    """Short hash of the library sources this child imported (other engineers edit them concurrently)."""
    import hashlib

    h = hashlib.sha256()
    for mod in sorted(modules, key=lambda m: m.__name__):
        h.update(mod.__name__.encode())
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def run_one(path: str, profile_out: str | None = None, tissue_thresh: float | None = None) -> dict[str, Any]:
    """Measure one slide in this (fresh) process; returns a JSON-able dict."""
    t_imp = time.perf_counter()
    import gc
    import tempfile

    import openslide  # noqa: F401  -- the backend open_slide loads lazily; keep it out of "open"

    try:  # this checkout
        from atlaspatch_assets.core.stages.coords import CoordsParams, compute_patch_coords, save_patch_coords
        from atlaspatch_assets.core.stages.mask import compute_tissue_mask, save_tissue_mask
        from atlaspatch_assets.core.store import RunLayout
    except ImportError:  # --baseline: a package from before the stages moved
        from atlaspatch_assets.core.pipeline import (
            CoordsParams,
            RunLayout,
            compute_patch_coords,
            compute_tissue_mask,
            save_patch_coords,
            save_tissue_mask,
        )

    from atlaspatch_assets.core.segmentation import SegmentationParams
    from atlaspatch_assets.core.slide import open_slide

    import_s = time.perf_counter() - t_imp
    fingerprint = source_fingerprint(
        [m for name, m in sys.modules.items() if name.startswith("atlaspatch_assets") and getattr(m, "__file__", None)]
    )
    gc.collect()
    baseline = _current_rss_bytes()
    maxrss_at_baseline = _maxrss_bytes()

    prof = None
    if profile_out:
        import cProfile

        prof = cProfile.Profile()

    seg_params = SegmentationParams() if tissue_thresh is None else SegmentationParams(tissue_thresh=tissue_thresh)
    coords_params = CoordsParams()
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench_segcoords_") as tmpdir:
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        layout = RunLayout.create(tmpdir, 256, target_mag=20)
        s = open_slide(path)
        t_open = time.perf_counter()
        peaks["open"] = _maxrss_bytes()
        with s:
            m = compute_tissue_mask(s, "bench", seg_params)
            t_seg = time.perf_counter()
            peaks["segmentation"] = _maxrss_bytes()
            c = compute_patch_coords(s, "bench", layout, m, coords_params)
            t_coords = time.perf_counter()
            peaks["coordinates"] = _maxrss_bytes()
        t_close = time.perf_counter()
        save_tissue_mask(layout, m)
        save_patch_coords(layout, c)
        t_end = time.perf_counter()
        peaks["write"] = _maxrss_bytes()
        if prof:
            prof.disable()
            prof.dump_stats(profile_out)
        info = s.info
        want_ds = seg_params.mask_mpp / info.mpp
        thumb_level = s.best_level_for_downsample(want_ds)
        h5_bytes = layout.store("bench").path.stat().st_size

    peak = _maxrss_bytes()
    return {
        "path": path,
        "source_fingerprint": fingerprint,
        "tissue_thresh": seg_params.tissue_thresh,
        "width": info.width,
        "height": info.height,
        "mpp": info.mpp,
        "backend": info.backend,
        "level_dimensions": info.level_dimensions,
        "level_downsamples": info.level_downsamples,
        "thumb_level": thumb_level,
        "thumb_level_dims": info.level_dimensions[thumb_level],
        "import_s": import_s,
        "open_s": t_open - t0,
        "segmentation_s": t_seg - t_open,
        "coordinates_s": t_coords - t_seg,
        "close_s": t_close - t_coords,
        "write_s": t_end - t_close,
        "total_s": t_end - t0,
        "seg_coords_s": t_coords - t_open,
        "baseline_rss": baseline,
        "maxrss_at_baseline": maxrss_at_baseline,
        "peak_rss": peak,
        "peak_above_baseline": peak - baseline,
        "maxrss_after": peaks,
        "num_patches": c.num_patches,
        "grid_size": c.grid_size,
        "mask_shape": list(m.mask.shape),
        "mask_downsample": list(m.downsample),
        "tissue_fraction": m.tissue_fraction,
        "h5_bytes": h5_bytes,
    }


# -- parent: build, run children, report -----------------------------------------------------------


def baseline_tree(commit: str, into: Path) -> Path:
    """The package as it was at `commit` (git archive: read-only on the repository)."""
    archive = subprocess.run(
        ["git", "archive", commit, "atlaspatch_assets"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        w, h = part.lower().strip().split("x")
        out.append((int(w), int(h)))
    return out


def slide_path(data_dir: Path, w: int, h: int) -> Path:
    return data_dir / f"bench40x_{w}x{h}.svs"


def ensure_slide(tool: Path, data_dir: Path, w: int, h: int) -> dict[str, Any]:
    """Build the slide if missing (timed, not counted); returns build info (possibly recorded)."""
    path = slide_path(data_dir, w, h)
    sidecar = path.with_name(path.name + ".build.json")
    if path.exists():
        rec = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        secs = rec.get("seconds")
        return {"path": str(path), "built_now": False, "seconds": secs, "bytes": path.stat().st_size}
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.building-{os.getpid()}.svs")
    cmd = [sys.executable, str(tool), str(tmp), "--width", str(w), "--height", str(h), "--mag", "40"]
    print(f"building {path.name} ({w}x{h}, 40x): {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    secs = time.perf_counter() - t0
    rec = {"seconds": round(secs, 1), "width": w, "height": h, "mag": 40, "cmd": cmd[1:]}
    rec["cpus"] = os.cpu_count()
    sidecar.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"built {path.name} in {secs:.1f} s ({path.stat().st_size / MB:.0f} MB)", flush=True)
    return {"path": str(path), "built_now": True, "seconds": secs, "bytes": path.stat().st_size}


def run_child(
    path: Path, profile_out: Path | None = None, tissue_thresh: float | None = None, src: Path | None = None
) -> dict[str, Any]:
    """One measurement in a fresh process, importing the package from `src` (default: this checkout)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(path)]
    if tissue_thresh is not None:
        cmd += ["--tissue-thresh", repr(tissue_thresh)]
    if profile_out:
        cmd += ["--profile-out", str(profile_out)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src or REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        tail = f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        raise RuntimeError(f"child failed (rc={p.returncode}) on {path}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


NUMERIC = (
    "open_s",
    "segmentation_s",
    "coordinates_s",
    "write_s",
    "total_s",
    "seg_coords_s",
    "import_s",
    "baseline_rss",
    "peak_rss",
    "peak_above_baseline",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in runs) for k in NUMERIC}
    for phase in ("open", "segmentation", "coordinates", "write"):
        med[f"maxrss_after_{phase}"] = statistics.median(r["maxrss_after"][phase] for r in runs)
    first = runs[0]
    for k in (
        "width",
        "height",
        "num_patches",
        "grid_size",
        "mask_shape",
        "tissue_fraction",
        "thumb_level",
        "thumb_level_dims",
        "level_dimensions",
        "mpp",
        "backend",
        "h5_bytes",
        "mask_downsample",
    ):
        med[k] = first[k]
    med["runs"] = len(runs)
    med["fingerprints"] = sorted({r["source_fingerprint"] for r in runs})
    med["tissue_thresh"] = first["tissue_thresh"]
    med["seg_coords_all"] = [r["seg_coords_s"] for r in runs]
    med["peak_all"] = [r["peak_rss"] for r in runs]
    return med


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


HEADER = [
    "slide",
    "open s",
    "seg s",
    "coords s",
    "write s",
    "total s",
    "seg+coords s",
    "peak MB",
    "base MB",
    "peak-base MB",
    "patches",
    "mask shape",
    "tissue %",
]


def table_rows(summaries: list[dict[str, Any]], tag: str) -> list[list[str]]:
    """One row per slide (+ a big/small ratio row), the slide column labelled with the version."""
    label = f" {tag}" if tag else ""
    rows = []
    for s in summaries:
        rows.append(
            [
                f"{s['width']}x{s['height']}{label}",
                f"{s['open_s']:.3f}",
                f"{s['segmentation_s']:.3f}",
                f"{s['coordinates_s']:.3f}",
                f"{s['write_s']:.3f}",
                f"{s['total_s']:.3f}",
                f"{s['seg_coords_s']:.3f}",
                f"{s['peak_rss'] / MB:.0f}",
                f"{s['baseline_rss'] / MB:.0f}",
                f"{s['peak_above_baseline'] / MB:.0f}",
                f"{s['num_patches']}",
                "x".join(str(v) for v in s["mask_shape"]),
                f"{100 * s['tissue_fraction']:.1f}",
            ]
        )
    small, big = min(summaries, key=_px), max(summaries, key=_px)
    if len(summaries) > 1:

        def ratio(k: str) -> str:
            return f"{big[k] / small[k]:.2f}x" if small[k] else "n/a"

        rows.append(
            [
                f"ratio big/small{label} (px {_px(big) / _px(small):.0f}x)",
                ratio("open_s"),
                ratio("segmentation_s"),
                ratio("coordinates_s"),
                ratio("write_s"),
                ratio("total_s"),
                ratio("seg_coords_s"),
                ratio("peak_rss"),
                "",
                ratio("peak_above_baseline"),
                ratio("num_patches"),
                "",
                "",
            ]
        )
    return rows


def report(by_tag: dict[str, list[dict[str, Any]]], repeats: int) -> tuple[str, bool]:
    """The table (every version, side by side), details, and the goals of the last version."""
    rows = [row for tag, summaries in by_tag.items() for row in table_rows(summaries, tag)]
    tag, summaries = list(by_tag.items())[-1]
    small, big = min(summaries, key=_px), max(summaries, key=_px)
    out = [
        f"median of {repeats} fresh subprocesses per slide (MB = MiB; peak = ru_maxrss of the child; "
        "base = RSS after imports)",
        fmt_table(rows, HEADER),
        "",
    ]

    out.append("details (medians): thumbnail level used, RSS high-water mark after each phase")
    for t, s in ((t, s) for t, ss in by_tag.items() for s in ss):
        lv = s["thumb_level"]
        phases = ("open", "segmentation", "coordinates", "write")
        hw = " / ".join(f"{p} {s[f'maxrss_after_{p}'] / MB:.0f}" for p in phases)
        out.append(
            f"  {s['width']}x{s['height']}{' ' + t if t else ''}: mpp {s['mpp']:.4f}, levels {s['level_dimensions']}, "
            f"thumbnail from level {lv} {tuple(s['thumb_level_dims'])}; maxrss MB after {hw}; "
            f"imports {s['import_s']:.2f} s; seg+coords runs {[round(v, 3) for v in s['seg_coords_all']]} s; "
            f"peak runs {[round(v / MB) for v in s['peak_all']]} MB"
        )
    prints = sorted({f for ss in by_tag.values() for s in ss for f in s["fingerprints"]})
    out.append(f"  library sources (sha256 of imported atlaspatch_assets modules): {', '.join(prints)}")
    if len(prints) > len(by_tag):
        out.append("  WARNING: the library sources changed between runs (concurrent edits): medians mix versions")
    for s in summaries:
        if s["num_patches"] == 0:
            out.append(
                f"  WARNING: {s['width']}x{s['height']} gave 0 patches "
                f"(tissue {100 * s['tissue_fraction']:.1f} %): "
                f"every region may be below tissue_thresh={s['tissue_thresh']:g} x thumbnail area; "
                "try --tissue-thresh"
            )
    out.append("")

    ok_time = big["seg_coords_s"] <= GOAL_SECONDS
    ok_peak = big["peak_rss"] <= GOAL_PEAK_MB * MB
    d_small, d_big = small["peak_above_baseline"], big["peak_above_baseline"]
    ok_flat = len(summaries) < 2 or d_big <= max(GOAL_RSS_RATIO * d_small, d_small + GOAL_RSS_SLACK_MB * MB)

    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    out.append(f"goals ({tag or 'this checkout'}, largest slide {big['width']}x{big['height']}):")
    out.append(f"  [{mark(ok_time)}] segmentation + coordinates <= {GOAL_SECONDS:g} s: {big['seg_coords_s']:.3f} s")
    out.append(f"  [{mark(ok_peak)}] peak RSS <= {GOAL_PEAK_MB:g} MB: {big['peak_rss'] / MB:.0f} MB")
    if len(summaries) > 1:
        out.append(
            f"  [{'info' if ok_flat else 'grows'}] RSS above baseline vs slide size "
            f"(big <= max({GOAL_RSS_RATIO:g} x small, small + {GOAL_RSS_SLACK_MB:g} MB)): "
            f"{d_big / MB:.0f} MB vs {d_small / MB:.0f} MB "
            f"({d_big / d_small if d_small else float('nan'):.2f}x "
            f"for {_px(big) / _px(small):.0f}x the pixels)"
        )
    return "\n".join(out), ok_time and ok_peak


def _px(s: dict[str, Any]) -> int:
    return int(s["width"]) * int(s["height"])


def print_profile(path: Path, limit: int = 20) -> None:
    import pstats

    st = pstats.Stats(str(path))
    st.sort_stats("cumulative").print_stats(limit)
    st.sort_stats("tottime").print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", metavar="PATH", help="child mode: measure one slide, print one JSON line")
    ap.add_argument("--profile-out", metavar="FILE", help="child mode: also dump a cProfile of the work")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"WxH,WxH level-0 sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--data-dir", default=str(REPO_ROOT / "bench_data"), help="slides live/are built here")
    ap.add_argument("--tool", default=str(DEFAULT_TOOL), help="make_test_slide.py")
    ap.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per slide (median reported)")
    ap.add_argument("--profile", action="store_true", help="then one extra cProfile'd child per slide")
    ap.add_argument("--json", metavar="FILE", help="also write all raw runs and medians as JSON")
    ap.add_argument(
        "--tissue-thresh",
        type=float,
        default=None,
        help="override SegmentationParams.tissue_thresh (default: the pipeline's own default)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also measure the package as it was at COMMIT (git archive into a temporary folder), rounds interleaved",
    )
    a = ap.parse_args(argv)

    if a.one:
        res = run_one(a.one, a.profile_out, a.tissue_thresh)
        print(RESULT_PREFIX + json.dumps(res), flush=True)
        return 0

    sizes = parse_sizes(a.sizes)
    data_dir = Path(a.data_dir)
    print(
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other jobs may share the "
        f"machine: timings are indicative), python {sys.version.split()[0]}",
        flush=True,
    )

    builds = [ensure_slide(Path(a.tool), data_dir, w, h) for w, h in sizes]
    for (w, h), b in zip(sizes, builds, strict=True):
        when = "built now" if b["built_now"] else "already present"
        secs = f"{b['seconds']:.1f} s" if b["seconds"] is not None else "build time not recorded"
        print(f"slide {w}x{h}: {b['path']} ({b['bytes'] / MB:.0f} MB), {when}, build {secs}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_segcoords_base_") as tmp:
        versions: dict[str, Path | None] = {}
        if a.baseline:
            versions[f"before ({a.baseline})"] = baseline_tree(a.baseline, Path(tmp))
        versions["after" if a.baseline else ""] = None
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {b["path"]: [] for b in builds} for t in versions}
        for r in range(a.repeats):  # interleave rounds so drifting background load hits every slide alike
            for b in builds:
                for tag, src in versions.items():
                    res = run_child(Path(b["path"]), tissue_thresh=a.tissue_thresh, src=src)
                    runs[tag][b["path"]].append(res)
                    name = Path(b["path"]).name
                    print(
                        f"  round {r + 1}/{a.repeats} {name} {tag}: seg+coords {res['seg_coords_s']:.3f} s, "
                        f"total {res['total_s']:.3f} s, peak {res['peak_rss'] / MB:.0f} MB",
                        flush=True,
                    )

    by_tag = {tag: [summarize(runs[tag][b["path"]]) for b in builds] for tag in versions}
    text, ok = report(by_tag, a.repeats)
    print()
    print(f"load average after runs: {os.getloadavg()[0]:.2f}")
    print(text, flush=True)

    if a.profile:
        for b in builds:
            prof = data_dir / (Path(b["path"]).stem + ".segcoords.prof")
            res = run_child(Path(b["path"]), prof, a.tissue_thresh)
            name = Path(b["path"]).name
            print(
                f"\n=== cProfile {name} (profiled run: seg+coords {res['seg_coords_s']:.3f} s, "
                f"total {res['total_s']:.3f} s) -> {prof}",
                flush=True,
            )
            print_profile(prof)

    if a.json:
        blob = json.dumps({"runs": runs, "medians": by_tag}, indent=1, default=str)
        Path(a.json).write_text(blob + "\n")
    return 1 if (a.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
