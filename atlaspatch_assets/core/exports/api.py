"""`export()`: check the request, then export each selected slide through its layout (all or nothing per slide)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..store import RunLayout, features_name, slide_features_name
from .base import ExportContext, Layout
from .catalog import Rows, catalog_failures, catalog_state, coords_warning
from .clam import CLAM
from .commit import commit_or_skip
from .meta import SAFE_NAME, fingerprint
from .report import ExportReport, ExportUsageError, SlideExport, SlideExportError
from .run import has_features, has_slide_features, resolve_layout, store_attrs
from .slide2vec import SLIDE2VEC
from .source import SlideRequest, load_slide, process_hint
from .trident import TRIDENT

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (SLIDE2VEC, TRIDENT, CLAM)}


def export(
    run_dir_or_output: str | Path,
    layout: str,
    dest: str | Path | None,
    encoder: str,
    slide_encoder: str | None = None,
    slides: Sequence[str] | None = None,
    force: bool = False,
) -> ExportReport:
    """Export the stores of one run folder to `layout` under `dest` (default `<run>/exports/<layout>[/<enc>]`).

    Raises ExportUsageError for an invalid request (nothing written); per-slide problems are in the report.
    """
    lay = _check_request(layout, encoder, slide_encoder)
    run = resolve_layout(run_dir_or_output, encoder)
    assets = {"tissue_mask", "patch_coords", features_name(encoder)}
    if slide_encoder:
        assets.add(slide_features_name(slide_encoder))
    catalog = catalog_state(run, assets)
    stored = set(run.slide_ids())
    wanted = _select(run, stored | set(catalog), slides)
    _check_inputs(run, [s for s in wanted if s in stored], encoder, slide_encoder)

    dest_path = Path(dest).expanduser().resolve() if dest else lay.default_dest(run, encoder)
    ctx = ExportContext(
        layout=lay,
        dest=dest_path,
        run=run,
        encoder=encoder,
        slide_encoder=slide_encoder,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        level_downsamples=_level_downsampler(),
        wanted=wanted,
        slides_arg=slides,
        force=force,
    )
    report = ExportReport(lay.name, Path(run_dir_or_output), run.root, dest_path, encoder, slide_encoder)
    dest_path.mkdir(parents=True, exist_ok=True)
    for sid in sorted(wanted):
        report.slides.append(_export_slide(ctx, sid, catalog.get(sid, []), sid in stored))
    lay.finish(ctx, report)
    return report


def _check_request(layout: str, encoder: str, slide_encoder: str | None) -> Layout:
    name = (layout or "").strip().lower()
    if name not in LAYOUTS:
        raise ExportUsageError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    if not encoder:
        raise ExportUsageError("give --encoder (the features/<encoder> to export)")
    _check_name("--encoder", encoder)
    _check_name("--slide-encoder", slide_encoder)
    lay = LAYOUTS[name]
    if slide_encoder and not lay.slide_embeddings:
        raise ExportUsageError(f"--slide-encoder has no place in the {lay.title} layout ({lay.summary} hold patches)")
    return lay


def _check_name(kind: str, name: str | None) -> None:
    if name is not None and not SAFE_NAME.match(name):
        raise ExportUsageError(f"{kind} {name!r}: use letters, digits and . _ + - only")


def _select(run: RunLayout, known: set[str], slides: Sequence[str] | None) -> list[str]:
    """The slide ids to export: those asked for (each known to the stores or the catalog), else all known."""
    if slides:
        wanted = list(dict.fromkeys(s.strip() for s in slides if s and s.strip()))
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise ExportUsageError(f"unknown slide id {', '.join(unknown)} (not in {run.patches_dir} nor the catalog)")
    else:
        wanted = sorted(known)
    if not wanted:
        raise ExportUsageError(f"no slide stores in {run.patches_dir}")
    return wanted


def _check_inputs(run: RunLayout, stored: Sequence[str], encoder: str, slide_encoder: str | None) -> None:
    """A usage error when no selected slide has what the export needs (a per-slide error would hide the typo)."""
    if not any(has_features(run, s, encoder) for s in stored):
        hint = next((process_hint(store_attrs(run, s), run.output, encoder) for s in stored), "")
        raise ExportUsageError(
            f"no selected slide in {run.root.name} has {features_name(encoder)}"
            + (f"; compute them with `{hint}`" if hint else "")
        )
    if slide_encoder and not any(has_slide_features(run, s, slide_encoder) for s in stored):
        raise ExportUsageError(
            f"no selected slide in {run.root.name} has {slide_features_name(slide_encoder)}; "
            "compute the slide embeddings first"
        )


def _export_slide(ctx: ExportContext, sid: str, rows: Rows, stored: bool) -> SlideExport:
    note = catalog_failures(rows)
    if not stored:
        return SlideExport(
            sid, "failed", SlideExportError(note or f"no store in {ctx.run.patches_dir}", slide=sid).one_line()
        )
    req = SlideRequest(ctx.run, sid, ctx.encoder, ctx.slide_encoder, note, coords_warning(rows))
    try:
        slide = load_slide(req)
    except SlideExportError as e:
        return SlideExport(sid, "failed", e.one_line())
    if not ctx.run_params:
        ctx.run_params.update(geometry=slide.geometry, recipe=slide.recipe, mask=slide.mask_attrs)
    fp = fingerprint(ctx.layout.name, slide, ctx.encoder, ctx.slide_encoder)
    plans, marker = ctx.layout.plan(slide, ctx, fp)
    status, why = commit_or_skip(plans, fp, lambda: ctx.layout.exported_fingerprint(marker), ctx.force)
    if status == "failed":
        error = SlideExportError(f"cannot write {ctx.layout.name} files: {why}", slide=sid).one_line()
        return SlideExport(sid, status, error, num_patches=slide.n, dim=slide.dim)
    files = [str(p.path) for p in plans]
    if slide.empty_reason:  # its empty files are there, but nothing of this slide was exported
        status, error = "skipped", SlideExportError(slide.empty_reason, slide=sid).one_line()
        return SlideExport(sid, status, error, files=files, num_patches=0, dim=slide.dim)
    return SlideExport(sid, status, files=files, num_patches=slide.n, dim=slide.dim)


def _level_downsampler() -> Callable[[str], list[float] | None]:
    """The slide's pyramid downsamples by path (opened once each; None when it cannot be opened here)."""
    cache: dict[str, list[float] | None] = {}

    def get(path: str) -> list[float] | None:
        if path not in cache:
            cache[path] = None
            if path and os.path.isfile(path):
                try:
                    from ..slide import open_slide

                    with open_slide(path, probe=False) as s:
                        cache[path] = [float(d) for d in s.info.level_downsamples]
                except Exception:
                    cache[path] = None
        return cache[path]

    return get
