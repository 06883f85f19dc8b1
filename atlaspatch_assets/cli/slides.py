"""The slide commands (`segment-and-get-coords`, `detect-tissue`, `process`, `encode-slide`,
`encode-patient`): AtlasPatch-compatible options → typed stage parameters → the runner."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ..core.errors import UsageError
from ..core.params import check_params, render_refs, split_names
from ..core.source import SlideSourceParams
from ..core.stages import (
    ComputeParams,
    CoordsParams,
    FeatureParams,
    MaskParams,
    ModelParams,
    SlideEmbeddingParams,
    StagePlan,
)
from ..core.store import GeometryParams
from .options import CONTEXT, cli_ref, options_for, output_option, params_from

REQUIRED = "[required]"


def _common(fn: Callable[..., Any], coords: bool) -> Callable[..., Any]:
    """WSI_PATH, the geometry, where outputs go, the mask (and the coordinates) options."""
    opts = [
        click.argument("wsi_path", nargs=-1, required=True, type=click.Path()),
        options_for(
            GeometryParams,
            overrides={
                "patch_size": {
                    "default": None,
                    "show_default": False,
                    "help": "Patch side at the target magnification (px)  " + REQUIRED,
                },
                "target_mag": {
                    "default": None,
                    "show_default": False,
                    "help": "Target magnification, e.g. 20 (= 0.5 µm/px); this or --target-mpp is required",
                },
            },
        ),
        output_option("Output root (run folder <mag>x_<patch>px_<overlap>px_overlap inside)"),
        options_for(ComputeParams, only=["device"]),
        options_for(MaskParams),
        options_for(CoordsParams) if coords else None,
        click.option(
            "--max-open-slides",
            type=click.IntRange(min=1),
            default=200,
            show_default=True,
            help="Cap on simultaneously open slides (seed option; this runner opens one at a time)",
        )
        if coords
        else None,
        click.option("--recursive", is_flag=True, help="Search directories recursively"),
        options_for(SlideSourceParams),
        click.option(
            "--skip-existing/--force",
            default=True,
            show_default=True,
            help="Skip work whose stored recipe matches; --force recomputes",
        ),
        click.option("--verbose", "-v", is_flag=True, help="Log details (replaces the progress bar)"),
    ]
    for opt in reversed([o for o in opts if o is not None]):
        fn = opt(fn)
    return fn


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return _common(fn, coords=True)


def mask_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return _common(fn, coords=False)


def feature_options(required: bool = True) -> Callable[..., Any]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        opts = [
            click.option(
                "--feature-extractors",
                required=required,
                default="",
                help="Space/comma separated patch encoders (see `atlaspatch info`), e.g. resnet50,uni_v1",
            ),
            options_for(ComputeParams, exclude=["device"]),
            options_for(FeatureParams),
            options_for(ModelParams, only=["weights_dir", "encoder_weights", "plugins"]),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def slide_encoder_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = options_for(ModelParams, only=["slide_encoder_weights"])(fn)
    return click.option(
        "--slide-encoders",
        required=True,
        help="Comma list: titan, prism, moozy, gigapath_slide, feather, madeleine, chief, mean, max",
    )(fn)


def setup_logging(verbose: bool) -> None:
    from ..defs import quiet_dagster_notices

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    quiet_dagster_notices()
    if not verbose:  # what the summary says is enough; Dagster's own notices are for `-v`
        logging.getLogger("dagster").setLevel(logging.ERROR)


def _usage(e: Exception) -> click.UsageError:
    text = e.raw if isinstance(e, UsageError) else str(e)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return click.UsageError(render_refs("\n".join(lines), cli_ref))


def build_settings(kw: dict[str, Any], stages: tuple[str, ...]) -> Any:
    """Typed parameters of every stage from the options (UsageError before any work)."""
    from ..core.mpp import load_mpp_csv
    from ..core.stages import plan_slide_encoders
    from .runner import RunSettings

    skip = kw["skip_existing"]
    encoders = split_names(kw.get("feature_extractors"))
    targets: tuple = ()
    if "slide_encoders" in kw:
        plan = plan_slide_encoders(
            split_names(kw["slide_encoders"]), encoders, kw["patch_size"], kw["target_mag"], kw["target_mpp"]
        )
        targets, encoders = plan.targets, list(plan.patch_encoders)
        kw["patch_size"], kw["target_mag"] = plan.patch_size, plan.target_mag
    if kw["patch_size"] is None:
        raise UsageError("Missing option '--patch-size'")
    if kw["target_mag"] is None and kw["target_mpp"] is None:
        raise UsageError("give --target-mag (e.g. 20) or --target-mpp (e.g. 0.5)")
    geometry = params_from(GeometryParams, kw)
    source = params_from(SlideSourceParams, kw)
    if source.mpp_csv:
        source = dataclasses.replace(source, mpp_csv=os.path.abspath(source.mpp_csv))
        load_mpp_csv(source.mpp_csv)  # validate before any work
    mask = params_from(MaskParams, kw, skip_existing=skip)
    if mask.sam2_checkpoint:
        mask = dataclasses.replace(mask, sam2_checkpoint=os.path.abspath(mask.sam2_checkpoint))
    coords = params_from(CoordsParams, kw, skip_existing=skip) if "patch_coords" in stages else None
    compute = params_from(ComputeParams, kw)
    models = params_from(ModelParams, kw)
    models = dataclasses.replace(
        models,
        weights_dir=os.path.abspath(models.weights_dir) if models.weights_dir else "",
        plugins=[os.path.abspath(p) for p in models.plugins],
        encoder_weights={k: os.path.abspath(v) for k, v in models.encoder_weights.items()},
        slide_encoder_weights={k: os.path.abspath(v) for k, v in models.slide_encoder_weights.items()},
    )
    if "feature_extractors" in kw:
        encoders = _check_encoders(encoders, models)
    for p in (geometry, mask, coords, compute):
        if p is not None:
            check_params(p)
    plan = StagePlan(
        mask=mask,
        coords=coords,
        encoders=tuple(encoders),
        features=params_from(FeatureParams, kw, skip_existing=skip),
        targets=tuple(targets),
        embedding=SlideEmbeddingParams(skip_existing=skip),
        compute=compute,
    )
    from ..core.stages.preflight import plan_problems

    problems = plan_problems(plan, models)
    if problems:
        raise UsageError("cannot start:\n  - " + "\n  - ".join(problems))
    return RunSettings(kw["output"], geometry, plan, source, models, kw["verbose"])


def _check_encoders(names: list[str], models: ModelParams) -> list[str]:
    """Encoder names resolved in the full registry (built-ins, installed plugins, plugin files)."""
    from ..core.encoders import PluginError, UnknownEncoderError, encoder_registry

    if not names:
        raise UsageError("--feature-extractors: give at least one encoder")
    try:
        registry = encoder_registry(tuple(models.plugins))
        return list(dict.fromkeys(registry.spec(n).name for n in names))
    except (UnknownEncoderError, PluginError) as e:
        raise UsageError(str(e)) from e


def lattice_problems(slides: list[Any], settings: Any) -> list[str]:
    """Slides whose patch lattice would not fit the memory cap (checked from their headers)."""
    from ..core.slide import open_slide
    from ..core.source import SlideSource
    from ..core.stages.coords import check_lattice

    source = SlideSource(None, settings.source)  # type: ignore[arg-type]  (no catalog needed)
    problems = []
    for sf in slides:
        try:
            with open_slide(sf.path, mpp_override=source.mpp_for(sf.stem_key, sf.path), probe=False) as s:
                check_lattice(s.info, settings.layout, settings.plan.coords.max_lattice)
        except UsageError:
            raise
        except Exception as e:  # unopenable or no MPP: that slide fails alone later, with its reason
            if "lattice" in str(e):
                problems.append(f"{sf.path}: {e.reason if hasattr(e, 'reason') else e}")
    return problems


def run_command(kw: dict[str, Any], stages: tuple[str, ...]) -> None:
    setup_logging(kw["verbose"])
    from rich.console import Console
    from rich.markup import escape

    from ..core.discovery import discover
    from .runner import run_slides
    from .summary import ProgressReporter, print_summary

    console = Console(stderr=True)
    try:
        settings = build_settings(kw, stages)
    except UsageError as e:
        raise _usage(e) from e
    found = discover(kw["wsi_path"], recursive=kw["recursive"])
    slides, problems = found
    for p in problems:
        console.print(f"[red]error[/red] {escape(str(p))}", soft_wrap=True, highlight=False)
    if kw["verbose"]:
        for ig in found.ignored:
            console.print(f"[dim]ignored[/dim] {escape(str(ig.path))}: {escape(ig.reason)}", soft_wrap=True)
    if not slides:
        raise click.UsageError("no supported slide files found in " + ", ".join(kw["wsi_path"]))
    if settings.plan.coords is not None:
        too_big = lattice_problems(slides, settings)
        if too_big:
            raise _usage(UsageError("cannot start:\n  - " + "\n  - ".join(too_big)))
    from ..core import signals

    signals.reset()
    with ProgressReporter(console, total=len(slides), enabled=not kw["verbose"]) as progress:
        outcomes = run_slides(slides, settings, on_progress=progress.advance, on_patches=progress.patches)
    print_summary(console, outcomes, settings.layout.root)
    if any(o.status == "interrupted" for o in outcomes):
        sys.exit(signals.exit_code(signals.last_signal() or 2))  # 143 SIGTERM, 130 SIGINT
    failed = [o for o in outcomes if o.status == "failed"]
    sys.exit(1 if failed or problems else 0)


@click.command("segment-and-get-coords", context_settings=CONTEXT)
@common_options
def segment_and_get_coords(**kw: Any) -> None:
    """Segment tissue and compute patch coordinates for WSI_PATH (files or folders)."""
    run_command(kw, ("tissue_mask", "patch_coords"))


@click.command("detect-tissue", context_settings=CONTEXT)
@mask_options
def detect_tissue(**kw: Any) -> None:
    """Only the tissue mask (+ GeoJSON contours, overlays) for WSI_PATH."""
    run_command(kw, ("tissue_mask",))


@click.command("process", context_settings=CONTEXT)
@common_options
@feature_options(required=True)
def process(**kw: Any) -> None:
    """segment-and-get-coords + patch features (features/<encoder> in each slide's store)."""
    run_command(kw, ("tissue_mask", "patch_coords"))


@click.command("encode-slide", context_settings=CONTEXT)
@common_options
@feature_options(required=False)
@slide_encoder_options
def encode_slide(**kw: Any) -> None:
    """Slide embeddings (slide_features/<encoder>): computes mask, coords and patch features as needed.

    The patch geometry defaults to what the slide encoder needs (e.g. titan: 512 px at 20x);
    slide encoders share a run only when they need the same geometry.
    """
    run_command(kw, ("tissue_mask", "patch_coords"))


@click.command("encode-patient", context_settings=CONTEXT)
@common_options
@feature_options(required=False)
@slide_encoder_options
def encode_patient(**kw: Any) -> None:
    """Patient embeddings from MANIFEST.csv (columns case_id, slide_path, optional mpp).

    Pass the manifest as WSI_PATH. Each case's slides are encoded (encode-slide), then the case
    gets patient_features/<encoder>/<case_id>.h5 (the model's own case aggregator, or the mean of
    its slide embeddings). A case with a missing slide or duplicate rows fails alone.
    """
    from ..core.stages import read_manifest

    setup_logging(kw["verbose"])
    if len(kw["wsi_path"]) != 1 or not str(kw["wsi_path"][0]).lower().endswith(".csv"):
        raise click.UsageError("encode-patient takes one MANIFEST.csv (columns case_id, slide_path, optional mpp)")
    try:
        manifest = read_manifest(kw["wsi_path"][0])
    except UsageError as e:
        raise _usage(e) from e
    if manifest.mpp and not kw["mpp_csv"]:
        kw["mpp_csv"] = _mpp_csv(manifest.mpp)
    try:
        settings = build_settings(kw, ("tissue_mask", "patch_coords"))
    except UsageError as e:
        raise _usage(e) from e
    _run_patients(kw, settings, manifest)


def _mpp_csv(mpps: dict[str, float]) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="atlaspatch-mpp-", suffix=".csv")
    with os.fdopen(fd, "w") as fh:
        fh.write("wsi,mpp\n" + "".join(f"{p},{m}\n" for p, m in mpps.items()))
    return path


def _run_patients(kw: dict[str, Any], settings: Any, manifest: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..core.discovery import SlideFile
    from .runner import run_patients, run_slides
    from .summary import ProgressReporter, print_summary

    console = Console(stderr=True)
    bad = dict(manifest.bad)
    outcomes = []
    slides = [SlideFile(p, os.path.splitext(os.path.basename(p))[0]) for p in manifest.slide_paths]
    if slides:
        from ..core.discovery import discover

        found, _ = discover(manifest.slide_paths)
        slides = found or slides
        with ProgressReporter(console, total=len(slides), enabled=not kw["verbose"]) as progress:
            outcomes = run_slides(slides, settings, on_progress=progress.advance, on_patches=progress.patches)
        print_summary(console, outcomes, settings.layout.root)
    by_path = {os.path.abspath(o.path): o for o in outcomes}
    ready: dict[str, list[str]] = {}
    for case_id, paths in manifest.cases.items():
        rows = [by_path.get(p) for p in paths]
        failed = [r for r in rows if r is None or r.status == "failed"]
        if failed:
            first = failed[0]
            bad[case_id] = f"slide {first.slide_id} failed: {first.reason}" if first else "slide not processed"
        else:
            ready[case_id] = [r.slide_id for r in rows if r is not None]
    results = run_patients(ready, settings) if ready else []
    t = Table(title="patients")
    for col in ("case_id", "status", "slides", "output / reason"):
        t.add_column(col, overflow="fold")
    for r in results:
        t.add_row(escape(r.case_id), r.status, str(len(r.slides)), escape(r.path if r.status == "done" else r.reason))
    for case_id, reason in bad.items():
        t.add_row(escape(case_id), "failed", "", escape(reason))
    console.print(t)
    for case_id, reason in bad.items():
        console.print(f"FAILED case {escape(case_id)}: {escape(reason)}", soft_wrap=True, highlight=False)
    failed = bad or [r for r in results if r.status != "done"]
    sys.exit(1 if failed else 0)
