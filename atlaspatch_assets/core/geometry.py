"""Physical patch geometry: target resolution → level-0 footprint, read level and read size."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import GeometryError, MissingMppError, UsageError
from .params import ref
from .slide import SlideInfo, best_level

# A target finer than native by more than this is refused (we never upsample).
UPSAMPLE_TOLERANCE = 0.05


@dataclass(frozen=True)
class PatchGeometry:
    patch_size: int  # output patch side, target pixels
    step_size: int  # stride, target pixels
    target_mpp: float
    target_magnification: float
    slide_mpp: float
    level0_magnification: float
    patch_size_level0: int
    step_size_level0: int
    read_level: int
    read_downsample: float  # downsample of read_level
    read_size: int  # patch footprint at read_level (then area-resized to patch_size)

    @property
    def overlap(self) -> int:
        return self.patch_size - self.step_size

    def as_dict(self) -> dict:
        return asdict(self)


def target_mpp_from(target_mag: float | None, target_mpp: float | None) -> tuple[float, float]:
    """(target_mpp, target_magnification) from either option; 20x means 0.5 µm/px."""
    if target_mpp is not None and target_mpp > 0:
        return float(target_mpp), round(10.0 / float(target_mpp), 4)
    if target_mag is not None and target_mag > 0:
        return 10.0 / float(target_mag), float(target_mag)
    raise UsageError(f"give {ref('store', 'target_mag')} (e.g. 20) or {ref('store', 'target_mpp')} (e.g. 0.5)")


def run_folder_name(target_magnification: float, patch_size: int, step_size: int) -> str:
    """Seed run folder: <mag>x_<patch>px_<overlap>px_overlap."""
    mag = f"{target_magnification:g}"
    return f"{mag}x_{patch_size}px_{patch_size - step_size}px_overlap"


def compute_geometry(
    info: SlideInfo,
    patch_size: int,
    step_size: int | None = None,
    target_mag: float | None = None,
    target_mpp: float | None = None,
) -> PatchGeometry:
    if patch_size <= 0:
        raise UsageError(f"{ref('store', 'patch_size')} must be positive")
    step = int(step_size or patch_size)
    if step <= 0:
        raise UsageError(f"{ref('store', 'step_size')} must be positive")
    t_mpp, t_mag = target_mpp_from(target_mag, target_mpp)
    if not info.mpp:
        raise MissingMppError(info.mpp_problem or f"no MPP; give it with {ref('slide_source', 'mpp_csv')}")
    if t_mpp < info.mpp * (1 - UPSAMPLE_TOLERANCE):
        native = 10.0 / info.mpp
        raise GeometryError(
            f"target {t_mag:g}x ({t_mpp:.4g} µm/px) is finer than the slide's native "
            f"{native:.3g}x ({info.mpp:.4g} µm/px); choose {ref('store', 'target_mag')} <= {native:.3g}"
        )
    ds = max(1.0, t_mpp / info.mpp)
    ps0 = max(1, round(patch_size * t_mpp / info.mpp))
    st0 = max(1, round(step * t_mpp / info.mpp))
    level = best_level(info.level_downsamples, ds)
    lds = info.level_downsamples[level]
    read_size = max(1, round(ps0 / lds))
    return PatchGeometry(
        patch_size=int(patch_size),
        step_size=step,
        target_mpp=round(t_mpp, 6),
        target_magnification=t_mag,
        slide_mpp=info.mpp,
        level0_magnification=round(10.0 / info.mpp, 3),
        patch_size_level0=ps0,
        step_size_level0=st0,
        read_level=level,
        read_downsample=float(lds),
        read_size=read_size,
    )
