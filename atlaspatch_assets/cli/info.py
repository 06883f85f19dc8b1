"""`atlaspatch info`: formats, segmentation methods, encoders (built-ins + installed plugins), layout."""

from __future__ import annotations

import click

from .. import __version__
from .options import CONTEXT


@click.command("info", context_settings=CONTEXT)
def info() -> None:
    """Supported formats, segmentation methods, encoders and the output layout."""
    from rich.console import Console
    from rich.table import Table

    from ..core.segmentation import SEGMENTERS
    from ..core.slides.registry import BACKENDS, UNSUPPORTED_FORMATS

    c = Console()
    c.print(f"[bold]atlaspatch-assets {__version__}[/bold]")
    t = Table(title="Supported inputs (readers tried in this order)", show_header=True)
    t.add_column("reader")
    t.add_column("extensions")
    for backend in BACKENDS:
        t.add_row(backend.name, " ".join(backend.extensions))
    t.add_row("DICOM series", "a folder of .dcm, one slide per SeriesInstanceUID")
    for ext, why in UNSUPPORTED_FORMATS.items():
        t.add_row("[dim]not read[/dim]", f"{ext}: {why}")
    c.print(t)
    c.print("Segmentation methods: " + ", ".join(sorted(SEGMENTERS)) + " (otsu needs no weights)")
    try:
        from ..core.encoders import encoder_registry

        registry = encoder_registry()
    except ImportError:
        c.print(
            "Patch and slide encoders: not available — PyTorch is not installed. "
            "Install the features extra: pip install 'atlaspatch-assets[features]' (or `make install-dev`)"
        )
        registry = None
    if registry is not None:
        from ..core.stages import ModelParams
        from ..core.stages.preflight import weight_problems

        e = Table(title="Patch encoders (--feature-extractors)", show_header=True)
        for col in ("name", "dim", "input", "library", "here", "model / weights"):
            e.add_column(col, justify="right" if col in ("dim", "input") else "left")
        ready = 0
        for name, spec in sorted(registry.items()):
            problems = weight_problems([name], [], ModelParams())
            here = (
                "[green]ready[/green]"
                if not problems
                else ("[red]no code[/red]" if spec.unavailable else "[yellow]no weights[/yellow]")
            )
            ready += not problems
            note = spec.model_id or ""
            if spec.unavailable:
                note = f"needs plugin: {spec.unavailable}"[:60]
            e.add_row(name, str(spec.dim), str(spec.input_size), spec.library, here, note)
        c.print(e)
        c.print(
            f"{ready} of {len(registry)} encoders can run here; give weights with --weights-dir DIR "
            "($ATLASPATCH_WEIGHTS_DIR) or --encoder-weights NAME=PATH (never downloaded)"
        )
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
