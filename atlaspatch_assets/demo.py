"""The demo: a small pyramidal 20x TIFF built from scikit-image's bundled IHC image (`core.demo`), then the job.

Everything comes from installed packages: no download, no data in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from .core.demo import DEMO_MPP, build_demo_slide, demo_truth_mask

__all__ = ["DEMO_INSTANCE_YAML", "DEMO_MPP", "build_demo_slide", "demo_truth_mask", "run_demo"]

# Embedded default instance: SQLite storage under DAGSTER_HOME, telemetry off.
DEMO_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def run_demo(output: str | Path) -> int:
    """Build the demo slide (once) and run segment-and-get-coords on it; returns the exit code."""
    from .cli import main

    output = Path(output).resolve()
    slide = output / "slides" / "atlaspatch-demo.svs"
    if not slide.exists():
        build_demo_slide(slide)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(output / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(DEMO_INSTANCE_YAML)
    args = [
        "segment-and-get-coords",
        str(slide),
        "--patch-size",
        "256",
        "--target-mag",
        "20",
        "--output",
        str(output / "output"),
        "--visualize-grids",
        "--visualize-mask",
        "--visualize-contours",
    ]
    try:
        main.main(args=args, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
