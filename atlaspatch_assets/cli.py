"""`atlaspatch` command line: AtlasPatch-compatible options, runs the Dagster assets in process.

Exit codes: 0 all slides done/skipped, 1 any slide failed, 2 usage error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .core.errors import UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by segment-and-get-coords and detect-tissue (seed names and defaults)."""
    opts = [
        click.argument("wsi_path", nargs=-1, required=True, type=click.Path()),
        click.option("--patch-size", type=int, default=None, help="Patch side at the target magnification (px)"),
        click.option("--target-mag", type=float, default=None, help="Target magnification, e.g. 20 (= 0.5 µm/px)"),
        click.option("--target-mpp", type=float, default=None, help="Target µm/px (instead of --target-mag)"),
        click.option("--step-size", type=int, default=None, help="Stride at the target magnification [patch-size]"),
        click.option(
            "--output",
            "-o",
            type=click.Path(),
            default="./output",
            show_default=True,
            help="Output root (run folder <mag>x_<patch>px_<overlap>px_overlap inside)",
        ),
        click.option("--device", default="cpu", show_default=True, help="Segmentation device (cpu, cuda, cuda:<i>)"),
        click.option(
            "--seg-method",
            type=click.Choice(["otsu", "sam2"]),
            default="otsu",
            show_default=True,
            help="Tissue segmentation: classical (no weights) or SAM2 (local checkpoint)",
        ),
        click.option(
            "--modality",
            type=click.Choice(["auto", "brightfield", "fluorescence"]),
            default="auto",
            show_default=True,
            help="Stain modality for --seg-method otsu: fluorescence = dark background (auto-detected)",
        ),
        click.option(
            "--sam2-checkpoint",
            type=click.Path(),
            default=None,
            envvar="ATLASPATCH_SAM2_CHECKPOINT",
            help="Local SAM2.1 hiera-tiny checkpoint (.pt) for --seg-method sam2; never downloaded",
        ),
        click.option(
            "--tissue-thresh",
            type=float,
            default=0.01,
            show_default=True,
            help="Minimum tissue region area, fraction of the thumbnail (0-1)",
        ),
        click.option(
            "--white-thresh",
            type=int,
            default=15,
            show_default=True,
            help="Saturation threshold for white patches (--no-fast-mode)",
        ),
        click.option(
            "--black-thresh",
            type=int,
            default=50,
            show_default=True,
            help="Gray threshold for black patches (--no-fast-mode)",
        ),
        click.option(
            "--min-tissue-fraction",
            type=float,
            default=None,
            help="Keep patches with at least this tissue fraction [0.5]",
        ),
        click.option(
            "--seg-batch-size",
            type=int,
            default=1,
            show_default=True,
            help="Thumbnails per SAM2 forward (accepted; slides are segmented one per run)",
        ),
        click.option(
            "--patch-workers",
            type=int,
            default=os.cpu_count() or 1,
            show_default=True,
            help="Threads reading patches (--no-fast-mode, --save-images)",
        ),
        click.option(
            "--max-open-slides",
            type=int,
            default=200,
            show_default=True,
            help="Cap on simultaneously open slides (this runner opens one at a time)",
        ),
        click.option("--write-batch", type=int, default=8192, show_default=True, help="Rows per HDF5 chunk"),
        click.option("--save-images", is_flag=True, help="Write a PNG per patch under images/<slide_id>/"),
        click.option(
            "--fast-mode/--no-fast-mode",
            default=True,
            show_default=True,
            help="--no-fast-mode drops mostly white/black patches",
        ),
        click.option("--visualize-grids", is_flag=True, help="Patch grid overlay in visualization/"),
        click.option("--visualize-mask", is_flag=True, help="Mask overlay in visualization/"),
        click.option("--visualize-contours", is_flag=True, help="Contour overlay in visualization/"),
        click.option("--recursive", is_flag=True, help="Search directories recursively"),
        click.option("--mpp-csv", type=click.Path(), default=None, help="CSV with columns wsi,mpp (by file stem)"),
        click.option(
            "--skip-existing/--force",
            default=True,
            show_default=True,
            help="Skip slides whose stored recipe matches; --force recomputes",
        ),
        click.option("--verbose", "-v", is_flag=True, help="Log details (replaces the progress bar)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="atlaspatch")
def main() -> None:
    """Whole-slide images → tissue masks → patch coordinates, as Dagster assets."""


def _feature_options(fn: Callable[..., Any], required: bool = True) -> Callable[..., Any]:
    """Options of `process` on top of the common ones (seed names and defaults)."""
    opts = [
        click.option(
            "--feature-extractors",
            required=required,
            default="",
            help="Space/comma separated encoders (see `atlaspatch info`), e.g. resnet50,uni_v1",
        ),
        click.option("--feature-batch-size", type=int, default=32, show_default=True),
        click.option("--feature-device", default=None, help="Device for features [inherits --device]"),
        click.option(
            "--feature-num-workers",
            type=int,
            default=4,
            show_default=True,
            help="Reader threads decoding tiles ahead of the model",
        ),
        click.option(
            "--feature-precision",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default=None,
            help="Compute precision [float32; float16 on GPU] (CPU half precision: autocast)",
        ),
        click.option(
            "--feature-plugin",
            multiple=True,
            type=click.Path(),
            help="Python file defining register_feature_extractors(registry, device, dtype, num_workers)",
        ),
        click.option(
            "--weights-dir",
            type=click.Path(),
            default=None,
            envvar="ATLASPATCH_WEIGHTS_DIR",
            help="Folder with <encoder>/<file> or <encoder>.<ext> weights (never downloaded)",
        ),
        click.option(
            "--encoder-weights", multiple=True, metavar="NAME=PATH", help="Weights file for one encoder (repeatable)"
        ),
        click.option(
            "--scaled-decode/--exact-decode",
            default=False,
            show_default=True,
            help="libjpeg-turbo DCT-scaled decode when the read downsample is 2/4/8 (faster, approximate)",
        ),
        click.option(
            "--features-dtype",
            type=click.Choice(["float32", "float16"]),
            default="float32",
            show_default=True,
            help="Storage dtype of features/<encoder>",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _encoder_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Validate encoder names (suggesting close ones) and weights options before any work."""
    from .core.encoders import ENCODERS, PluginError, UnknownEncoderError, get_encoder_spec
    from .features_assets import build_registry, parse_list

    names = parse_list(kw["feature_extractors"]) + list(kw.get("_required_patch_encoders", []))
    if not names:
        raise UsageError("--feature-extractors: give at least one encoder")
    plugins = [os.path.abspath(p) for p in kw["feature_plugin"]]
    try:
        registry = build_registry(plugins) if plugins else ENCODERS
        names = [get_encoder_spec(n, registry).name for n in names]
    except (UnknownEncoderError, PluginError) as e:
        raise UsageError(str(e)) from e
    weights: dict[str, str] = {}
    for item in kw["encoder_weights"]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--encoder-weights {item!r}: expected NAME=PATH")
        weights[name.strip()] = os.path.abspath(path.strip())
    return {
        "encoders": tuple(dict.fromkeys(names)),
        "plugins": tuple(plugins),
        "encoder_weights": weights,
        "weights_dir": os.path.abspath(kw["weights_dir"]) if kw["weights_dir"] else None,
        "features": {
            "batch_size": max(1, kw["feature_batch_size"]),
            "num_workers": max(1, kw["feature_num_workers"]),
            "precision": kw["feature_precision"]
            or ("float16" if str(kw["feature_device"] or kw["device"]).startswith("cuda") else "float32"),
            "device": kw["feature_device"] or kw["device"],
            "scaled_decode": kw["scaled_decode"],
            "store_dtype": kw["features_dtype"],
            "skip_existing": kw["skip_existing"],
        },
    }


def _slide_encoder_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Resolve --slide-encoders into stored names, check they share one geometry, fill defaults."""
    from .core.features import feature_path  # noqa: F401  (torch needed: fail early if missing)
    from .core.slide_encoders import (
        SlideEncoderError,
        UnknownSlideEncoderError,
        check_slide_encoder_run,
        get_slide_encoder_spec,
    )
    from .core.slide_features import POOLING
    from .features_assets import parse_list

    names = parse_list(kw["slide_encoders"])
    if not names:
        raise UsageError("--slide-encoders: give at least one slide encoder (e.g. titan, prism, mean)")
    patch_given = parse_list(kw["feature_extractors"])
    try:
        specs = [get_slide_encoder_spec(n) for n in names]
        check_slide_encoder_run([sp.name for sp in specs], kw["patch_size"], kw["target_mag"])
    except (UnknownSlideEncoderError, SlideEncoderError) as e:
        raise UsageError(" ".join(str(e).split())) from e
    targets: list[str] = []
    required: list[str] = []
    for sp in specs:
        if sp.name in POOLING:
            if not patch_given:
                raise UsageError(f"--slide-encoders {sp.name} pools patch features: give --feature-extractors")
            targets += [f"{sp.name}_{p}" for p in patch_given]
        else:
            targets.append(sp.name)
            required.append(sp.patch_encoder or "")
        if sp.geometry is not None:  # the encoder fixes the geometry when the user did not
            kw["patch_size"] = kw["patch_size"] or sp.patch_size
            if kw["target_mag"] is None and kw["target_mpp"] is None:
                kw["target_mag"] = sp.target_magnification
    kw["_required_patch_encoders"] = [r for r in required if r]
    weights: dict[str, str] = {}
    for item in kw["slide_encoder_weights"]:
        name, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--slide-encoder-weights {item!r}: expected NAME=PATH")
        weights[name.strip()] = os.path.abspath(path.strip())
    return {"slide_encoders": tuple(dict.fromkeys(targets)), "slide_encoder_weights": weights}


def _run(kw: dict[str, Any], assets: tuple[str, ...]) -> None:
    _setup_logging(kw["verbose"])
    from rich.console import Console

    from .core.discovery import discover
    from .core.mpp import load_mpp_csv
    from .runner import RunOptions, run_slides
    from .summary import ProgressReporter, print_summary

    console = Console(stderr=True)
    try:
        slide_opts = _slide_encoder_options(kw) if "slide_encoders" in kw else {}
        if kw["patch_size"] is None:
            raise UsageError("Missing option '--patch-size'")
        if kw["target_mag"] is None and kw["target_mpp"] is None:
            raise UsageError("give --target-mag (e.g. 20) or --target-mpp (e.g. 0.5)")
        for name in ("target_mag", "target_mpp"):
            if kw[name] is not None and kw[name] <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if kw["patch_size"] <= 0 or (kw["step_size"] is not None and kw["step_size"] <= 0):
            raise UsageError("--patch-size and --step-size must be positive")
        if not 0 <= kw["tissue_thresh"] <= 1:
            raise UsageError("--tissue-thresh must be within 0-1")
        if kw["mpp_csv"]:
            load_mpp_csv(kw["mpp_csv"])  # validate before any work
        if kw["seg_method"] == "sam2" and not kw["sam2_checkpoint"]:
            raise UsageError(
                "--seg-method sam2 needs a local checkpoint: --sam2-checkpoint PATH "
                "(or ATLASPATCH_SAM2_CHECKPOINT); weights are never downloaded"
            )
        feature_opts = _encoder_options(kw) if "feature_extractors" in kw else {}
    except UsageError as e:
        raise click.UsageError(str(e)) from e

    slides, problems = discover(kw["wsi_path"], recursive=kw["recursive"])
    for p in problems:
        console.print(f"[red]error[/red] {p}")
    if not slides and "manifest" not in kw:
        raise click.UsageError("no supported slide files found in " + ", ".join(kw["wsi_path"]))

    tissue_cfg = {
        "method": kw["seg_method"],
        "modality": kw["modality"],
        "tissue_thresh": kw["tissue_thresh"],
        "sam2_checkpoint": os.path.abspath(kw["sam2_checkpoint"]) if kw["sam2_checkpoint"] else "",
        "seg_batch_size": kw["seg_batch_size"],
        "visualize_mask": kw["visualize_mask"],
        "visualize_contours": kw["visualize_contours"],
        "skip_existing": kw["skip_existing"],
    }
    coords_cfg = {
        "fast_mode": kw["fast_mode"],
        "white_thresh": kw["white_thresh"],
        "black_thresh": kw["black_thresh"],
        "save_images": kw["save_images"],
        "visualize_grids": kw["visualize_grids"],
        "patch_workers": max(1, kw["patch_workers"]),
        "write_batch": max(1, kw["write_batch"]),
        "skip_existing": kw["skip_existing"],
    }
    if kw["min_tissue_fraction"] is not None:
        coords_cfg["min_tissue_fraction"] = kw["min_tissue_fraction"]
    opts = RunOptions(
        output=kw["output"],
        patch_size=kw["patch_size"],
        step_size=kw["step_size"],
        target_mag=kw["target_mag"],
        target_mpp=kw["target_mpp"],
        mpp_csv=os.path.abspath(kw["mpp_csv"]) if kw["mpp_csv"] else None,
        device=kw["device"],
        tissue_mask=tissue_cfg,
        patch_coords=coords_cfg,
        assets=assets,
        verbose=kw["verbose"],
        **feature_opts,
        **slide_opts,
    )
    if "manifest" in kw:
        _run_patients(console, kw, opts, slides)
        return
    with ProgressReporter(console, total=len(slides), enabled=not kw["verbose"]) as progress:
        outcomes = run_slides(slides, opts, on_progress=progress.advance)
    print_summary(console, outcomes, opts)
    failed = [o for o in outcomes if o.status == "failed"]
    sys.exit(1 if failed or problems else 0)


def _setup_logging(verbose: bool) -> None:
    import warnings

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        # Dagster's beta/preview notices are noise for CLI users.
        warnings.filterwarnings("ignore", module=r"dagster(\..*)?$")
        # beta/preview notices are attributed to our modules (stacklevel): match the text too
        warnings.filterwarnings("ignore", message=r".*currently in (beta|preview)")


@main.command("segment-and-get-coords", context_settings=CONTEXT)
@_common_options
def segment_and_get_coords(**kw: Any) -> None:
    """Segment tissue and compute patch coordinates for WSI_PATH (files or folders)."""
    _run(kw, ("tissue_mask", "patch_coords"))


@main.command("process", context_settings=CONTEXT)
@_common_options
@_feature_options
def process(**kw: Any) -> None:
    """segment-and-get-coords + patch features (features/<encoder> in each slide's store)."""
    _run(kw, ("tissue_mask", "patch_coords"))


def _slide_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--slide-encoder-weights", multiple=True, metavar="NAME=PATH", help="Weights of one slide encoder"
    )(fn)
    return click.option(
        "--slide-encoders",
        required=True,
        help="Comma list: titan, prism, moozy, gigapath_slide, feather, madeleine, chief, mean, max",
    )(fn)


def _optional_features(fn: Callable[..., Any]) -> Callable[..., Any]:
    return _feature_options(fn, required=False)


@main.command("encode-slide", context_settings=CONTEXT)
@_common_options
@_optional_features
@_slide_options
def encode_slide(**kw: Any) -> None:
    """Slide embeddings (slide_features/<encoder>): computes mask, coords and patch features as needed.

    The patch geometry defaults to what the slide encoder needs (e.g. titan: 512 px at 20x);
    slide encoders share a run only when they need the same geometry.
    """
    _run(kw, ("tissue_mask", "patch_coords"))


@main.command("encode-patient", context_settings=CONTEXT)
@_common_options
@_optional_features
@_slide_options
def encode_patient(**kw: Any) -> None:
    """Patient embeddings from MANIFEST.csv (columns case_id, slide_path, optional mpp).

    Pass the manifest as WSI_PATH. Each case's slides are encoded (encode-slide), then the case
    gets patient_features/<encoder>/<case_id>.h5 = mean of its slide embeddings. A case with a
    missing slide or duplicate rows fails alone.
    """
    if len(kw["wsi_path"]) != 1 or not str(kw["wsi_path"][0]).lower().endswith(".csv"):
        raise click.UsageError("encode-patient takes one MANIFEST.csv (columns case_id, slide_path, optional mpp)")
    cases, bad, mpps = _read_manifest(kw["wsi_path"][0])
    if mpps and not kw["mpp_csv"]:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="atlaspatch-mpp-", suffix=".csv")
        with os.fdopen(fd, "w") as fh:
            fh.write("wsi,mpp\n" + "".join(f"{p},{m}\n" for p, m in mpps.items()))
        kw["mpp_csv"] = path
    kw["manifest"] = (cases, bad, None)
    kw["wsi_path"] = tuple(dict.fromkeys(p for paths in cases.values() for p in paths)) or (kw["wsi_path"][0],)
    _run(kw, ("tissue_mask", "patch_coords"))


def _read_manifest(path: str) -> tuple[dict[str, list[str]], dict[str, str], dict[str, float]]:
    """(case → slide paths, case → reason for cases that cannot run, slide path → mpp)."""
    import csv

    if not os.path.isfile(path):
        raise click.UsageError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    cases: dict[str, list[str]] = {}
    bad: dict[str, str] = {}
    mpps: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "case_id" not in cols or "slide_path" not in cols:
            raise click.UsageError(f"{path}: needs columns case_id and slide_path (found {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            case = (row.get(cols["case_id"]) or "").strip()
            slide = (row.get(cols["slide_path"]) or "").strip()
            if not case or not slide:
                raise click.UsageError(f"{path}:{i}: empty case_id or slide_path")
            slide = os.path.abspath(os.path.join(base, slide))
            if slide in cases.get(case, []):
                bad[case] = f"duplicate row for slide {slide} (line {i})"
            elif not os.path.exists(slide):
                bad[case] = f"slide not found: {slide}"
            cases.setdefault(case, []).append(slide)
            mpp = (row.get(cols["mpp"]) or "").strip() if "mpp" in cols else ""
            if mpp:
                mpps[slide] = float(mpp)
    return {c: p for c, p in cases.items() if c not in bad}, bad, mpps


def _run_patients(console: Any, kw: dict[str, Any], opts: Any, slides: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .runner import run_patients, run_slides
    from .summary import ProgressReporter, print_summary

    cases, bad_cases, _ = kw["manifest"]
    outcomes = []
    if cases:
        with ProgressReporter(console, total=len(slides), enabled=not kw["verbose"]) as progress:
            outcomes = run_slides(slides, opts, on_progress=progress.advance)
        print_summary(console, outcomes, opts)
    by_path = {os.path.abspath(o.path): o for o in outcomes}
    ready: dict[str, list[str]] = {}
    for case_id, paths in cases.items():
        failed = [by_path[p] for p in paths if by_path[p].status == "failed"]
        if failed:
            bad_cases[case_id] = f"slide {failed[0].slide_id} failed: {failed[0].reason}"
        else:
            ready[case_id] = [by_path[p].slide_id for p in paths]
    results = run_patients(ready, opts) if ready else []
    t = Table(title="patients")
    for col in ("case_id", "status", "slides", "output / reason"):
        t.add_column(col, overflow="fold")
    for r in results:
        t.add_row(escape(r.case_id), r.status, str(len(r.slides)), escape(r.path if r.status == "done" else r.reason))
    for case_id, reason in bad_cases.items():
        t.add_row(escape(case_id), "failed", "", escape(reason))
    console.print(t)
    for case_id, reason in bad_cases.items():
        console.print(f"FAILED case {escape(case_id)}: {escape(reason)}", soft_wrap=True, highlight=False)
    failed = bad_cases or [r for r in results if r.status != "done"]
    sys.exit(1 if failed else 0)


@main.command("detect-tissue", context_settings=CONTEXT)
@_common_options
def detect_tissue(**kw: Any) -> None:
    """Only the tissue mask (+ GeoJSON contours, overlays) for WSI_PATH."""
    _run(kw, ("tissue_mask",))


@main.command("info", context_settings=CONTEXT)
def info() -> None:
    """Supported formats, segmentation methods and the output layout."""
    from rich.console import Console
    from rich.table import Table

    from .core.segmentation import SEGMENTERS
    from .core.slide import IMAGE_EXTENSIONS, OPENSLIDE_EXTENSIONS

    c = Console()
    c.print(f"[bold]atlaspatch-assets {__version__}[/bold]")
    t = Table(title="Supported inputs", show_header=True)
    t.add_column("kind")
    t.add_column("extensions")
    t.add_column("reader")
    t.add_row("whole-slide images", " ".join(OPENSLIDE_EXTENSIONS), "OpenSlide, then tiffslide for TIFF variants")
    t.add_row("plain images", " ".join(IMAGE_EXTENSIONS) + " + plain TIFF", "Pillow/tifffile (MPP via --mpp-csv)")
    t.add_row("DICOM series", "folder of .dcm", "OpenSlide (one slide per folder)")
    c.print(t)
    c.print("Segmentation methods: " + ", ".join(sorted(SEGMENTERS)) + " (otsu needs no weights)")
    try:
        from .core.encoders.registry import ENCODERS

        e = Table(title="Patch encoders (--feature-extractors)", show_header=True)
        for col in ("name", "dim", "input", "library", "model / weights"):
            e.add_column(col, justify="right" if col in ("dim", "input") else "left")
        for name, spec in sorted(ENCODERS.items()):
            note = spec.model_id or ""
            if spec.unavailable:
                note = f"needs plugin: {spec.unavailable}"[:60]
            e.add_row(name, str(spec.dim), str(spec.input_size), spec.library, note)
        c.print(e)
    except Exception:
        c.print("Patch encoders: not available in this installation")
    c.print(
        "\n[bold]Output layout[/bold] <output>/<mag>x_<patch>px_<overlap>px_overlap/\n"
        "  patches/<slide_id>.h5      coords (N,2) int32 level-0 x,y; coords_ext (N,5); tissue_fraction;\n"
        "                             tissue/mask (attrs downsample, method, parameters); features/<enc>\n"
        "  masks/<slide_id>.geojson   tissue contours (level-0 polygons with holes, QuPath-compatible)\n"
        "  visualization/             <slide_id>.png (grid), _mask.png, _contours.png\n"
        "  images/<slide_id>/         <slide_id>_x<x>_y<y>.png with --save-images\n"
        "<output>/catalog/            Parquet provenance (slides, events); `atlaspatch status`\n"
        "exports                      `atlaspatch export RUN --layout slide2vec|trident|clam --encoder NAME`"
    )


@main.command("demo", context_settings=CONTEXT)
@click.option("--output", "-o", type=click.Path(), default="./demo", show_default=True)
def demo(output: str) -> None:
    """Build a small demo slide from scikit-image's histology image and run the main job on it."""
    from .demo import run_demo

    sys.exit(run_demo(output))


def _register_subcommands() -> None:
    from .cli_export import export_command
    from .cli_status import compact_command, status_command

    main.add_command(status_command)
    main.add_command(compact_command)
    main.add_command(export_command)


_register_subcommands()

if __name__ == "__main__":
    main()
