"""A real run folder for the training tests: CMU (Aperio JPEG, level 0) and the NDPI slide (read at
level 1, area-resized), 224 px at 20x, built by the CLI like a user would."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner
from conftest import CMU, NDPI

from atlaspatch_assets.cli import main
from atlaspatch_assets.core.store import RunLayout

GEO = ["--patch-size", "224", "--target-mag", "20"]
ENC = "mobilenet_v2"


@dataclass
class Run:
    output: Path
    layout: RunLayout
    slides: dict[str, Path]  # slide id → file


def build_run(root: Path, features: bool = False, copies: bool = False) -> Run:
    """segment-and-get-coords (or `process --feature-extractors mobilenet_v2`) on CMU and NDPI.

    `copies`: run on copies of the slides under `root` (tests that damage or remove them)."""
    slides = [CMU, NDPI]
    if copies:
        (root / "slides").mkdir(parents=True, exist_ok=True)
        slides = [Path(shutil.copyfile(s, root / "slides" / s.name)) for s in slides]
    out = root / "out"
    cmd = ["process", "--feature-extractors", ENC] if features else ["segment-and-get-coords"]
    r = CliRunner().invoke(main, [*cmd, *map(str, slides), "-o", str(out), *GEO])
    assert r.exit_code == 0, r.output
    layout = RunLayout.create(out, 224, target_mag=20)
    return Run(out, layout, {p.stem: p for p in slides})
