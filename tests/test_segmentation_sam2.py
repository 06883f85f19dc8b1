"""SAM2 segmentation with a randomly initialised hiera-tiny checkpoint (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from atlaspatch_assets.core.errors import SegmentationError  # noqa: E402
from atlaspatch_assets.core.segmentation import SegmentationParams, segment_tissue  # noqa: E402

SLIDE = Path(__file__).resolve().parents[1] / "../shared/slides/real/CMU-1-Small-Region.svs"
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam2.build_sam import build_sam2

    from atlaspatch_assets.core.segmentation.sam2 import _sam2_hydra

    torch.manual_seed(0)
    with _sam2_hydra():
        model = build_sam2(CONFIG, None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def thumb() -> np.ndarray:
    if not SLIDE.exists():
        pytest.skip(f"test slide missing: {SLIDE}")
    from atlaspatch_assets.core.slide import open_slide

    rgb, _, _ = open_slide(str(SLIDE)).read_thumbnail(8.0)
    return rgb


def test_sam2_mask_shape_and_dtype(random_ckpt: Path, thumb: np.ndarray) -> None:
    params = SegmentationParams(method="sam2", sam2_checkpoint=str(random_ckpt), mask_mpp=8.0)
    tm = segment_tissue(thumb, 8.0, params)
    assert tm.mask.shape == thumb.shape[:2]
    assert tm.mask.dtype == np.uint8
    assert set(np.unique(tm.mask)) <= {0, 1}


def test_sam2_missing_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATLASPATCH_SAM2_CHECKPOINT", raising=False)
    missing = tmp_path / "nope.pt"
    params = SegmentationParams(method="sam2", sam2_checkpoint=str(missing))
    with pytest.raises(SegmentationError) as ei:
        segment_tissue(np.zeros((32, 32, 3), np.uint8), 8.0, params)
    msg = str(ei.value)
    assert str(missing) in msg and "--sam2-checkpoint" in msg and "sam2.1_hiera_tiny.pt" in msg
    assert "\n" not in msg


def test_sam2_checkpoint_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "from-env.pt"
    monkeypatch.setenv("ATLASPATCH_SAM2_CHECKPOINT", str(missing))
    with pytest.raises(SegmentationError, match="from-env.pt"):
        segment_tissue(np.zeros((32, 32, 3), np.uint8), 8.0, SegmentationParams(method="sam2"))


def test_sam2_checkpoint_wrong_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    params = SegmentationParams(method="sam2", sam2_checkpoint=str(bad))
    with pytest.raises(SegmentationError, match="does not match config") as ei:
        segment_tissue(np.zeros((32, 32, 3), np.uint8), 8.0, params)
    assert "\n" not in str(ei.value)
