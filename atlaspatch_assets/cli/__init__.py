"""`atlaspatch` command line: AtlasPatch-compatible options → typed stage parameters → in-process
Dagster runs of the same assets the UI runs (exports and status read the stores directly).

Exit codes: 0 all slides done/skipped, 1 any slide failed, 2 usage error.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from .options import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="atlaspatch")
def main() -> None:
    """Whole-slide images → tissue masks → patch coordinates → features, as Dagster assets."""


@main.command("demo", context_settings=CONTEXT)
@click.option(
    "--output",
    "-o",
    type=click.Path(),
    default="./demo",
    show_default=True,
    help="Folder for the demo slide, its outputs and its Dagster home",
)
def demo(output: str) -> None:
    """Build a small demo slide from scikit-image's histology image and run the main job on it."""
    from .demo import run_demo

    sys.exit(run_demo(output))


def _register() -> None:
    from .convert import convert_command
    from .export import export_command
    from .info import info
    from .patches import export_patches_command
    from .slides import detect_tissue, encode_patient, encode_slide, process, segment_and_get_coords
    from .status import compact_command, status_command

    for cmd in (segment_and_get_coords, detect_tissue, process, encode_slide, encode_patient, info):
        main.add_command(cmd)
    main.add_command(status_command)
    main.add_command(compact_command)
    main.add_command(export_command)
    main.add_command(convert_command)
    main.add_command(export_patches_command)


_register()

if __name__ == "__main__":
    main()
