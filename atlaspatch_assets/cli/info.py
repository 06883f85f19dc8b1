"""`atlaspatch info`: formats, segmentation methods, encoders (built-ins + installed plugins), layout."""

from __future__ import annotations

import click

from .. import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.command("info", context_settings=CONTEXT)
def info() -> None:
    """Supported formats, segmentation methods, encoders and the output layout."""
    from rich.console import Console
    from rich.table import Table

    from ..core.segmentation import SEGMENTERS
    from ..core.slide import IMAGE_EXTENSIONS, OPENSLIDE_EXTENSIONS

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
        from ..core.encoders import encoder_registry

        registry = encoder_registry()
    except ImportError:
        c.print("Patch encoders: not available in this installation (install the `features` extra)")
        registry = None
    if registry is not None:
        e = Table(title="Patch encoders (--feature-extractors)", show_header=True)
        for col in ("name", "dim", "input", "library", "model / weights"):
            e.add_column(col, justify="right" if col in ("dim", "input") else "left")
        for name, spec in sorted(registry.items()):
            note = spec.model_id or ""
            if spec.unavailable:
                note = f"needs plugin: {spec.unavailable}"[:60]
            e.add_row(name, str(spec.dim), str(spec.input_size), spec.library, note)
        c.print(e)
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
