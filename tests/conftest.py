"""Shared fixtures: the real slides in ../shared/slides and synthetic slides made on the fly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

# shared/ sits beside the repository clone (../shared relative to the repo root).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SLIDES = SHARED / "slides"
REAL = SLIDES / "real"
IMAGES = SLIDES / "images"
BROKEN = SLIDES / "broken"

CMU = REAL / "CMU-1-Small-Region.svs"
NDPI = REAL / "ndpi-dapi-fluorescence.ndpi"
SMALL16 = REAL / "small-16px.svs"
BOXES_TIFF = REAL / "boxes-synthetic-4level.tiff"
KIDNEY = REAL / "kidney-ihc-plain.tif"
DICOM = REAL / "dicom-boxes" / "boxes_0.dcm"
PNG = IMAGES / "he-1000px.png"
JPEG = IMAGES / "he-500x300.jpg"

# Aperio-style description so OpenSlide reads a synthetic TIFF as aperio with MPP 0.5 / 20x.
APERIO_DESC = "Aperio Image Library v1.0\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG Q=80|AppMag = 20|MPP = 0.5"


def truncated_copy(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_aperio_tiff(path: Path, rgb: np.ndarray, downsamples: tuple[int, ...] = (4, 16)) -> Path:
    """Pyramidal tiled (256) JPEG TIFF with an Aperio ImageDescription (MPP 0.5, AppMag 20)."""
    import tifffile

    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            rgb,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            description=APERIO_DESC.format(w=w, h=h),
            metadata=None,
        )
        for ds in downsamples:
            level = np.ascontiguousarray(rgb[::ds, ::ds])
            tw.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                description=f"Aperio Image Library v1.0\n{w}x{h} -> {level.shape[1]}x{level.shape[0]}",
                metadata=None,
            )
    return path


@pytest.fixture
def cmu_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "CMU-1-Small-Region.svs"
    shutil.copyfile(CMU, dst)
    return dst


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All-white 4096x4096 aperio-like slide (no tissue anywhere)."""
    path = tmp_path_factory.mktemp("blank") / "blank.svs"
    return write_aperio_tiff(path, np.full((4096, 4096, 3), 255, np.uint8))
