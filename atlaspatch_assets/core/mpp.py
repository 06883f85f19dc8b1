"""Microns-per-pixel resolution, in the documented order, and the --mpp-csv override file.

Order: user override → openslide.mpp-x/y → vendor keys → TIFF resolution tags (only with a
real unit) → 10 / objective power. Each candidate must be plausible (0.05–20 µm/px).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .params import ref

MPP_MIN, MPP_MAX = 0.05, 20.0
_CSV = ref("slide_source", "mpp_csv")
_UNIT_TO_UM = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


@dataclass(frozen=True)
class MppResolution:
    mpp: float | None
    source: str | None
    objective_power: float | None
    problem: str | None = None


def _f(v: object) -> float | None:
    try:
        x = float(str(v).strip())
    except (TypeError, ValueError):
        return None
    return x if x > 0 and x == x else None


def _mean(a: float | None, b: float | None) -> float | None:
    if a and b:
        return (a + b) / 2
    return a or b


def _tiff_tag_mpp(props: dict[str, str]) -> float | None:
    unit = (props.get("tiff.ResolutionUnit") or "").strip().lower()
    if unit not in _UNIT_TO_UM:
        return None  # "none"/missing units carry no physical meaning
    xr, yr = _f(props.get("tiff.XResolution")), _f(props.get("tiff.YResolution"))
    um = _UNIT_TO_UM[unit]
    return _mean(um / xr if xr else None, um / yr if yr else None)


def resolve_mpp(
    props: dict[str, str], backend: str = "openslide", path: str = "", override: float | None = None
) -> MppResolution:
    """First plausible MPP in the documented order; `problem` explains a missing one."""
    objective = (
        _f(props.get("openslide.objective-power"))
        or _f(props.get("aperio.AppMag"))
        or _f(props.get("hamamatsu.SourceLens"))
    )
    candidates: list[tuple[str, float | None]] = [("user", _f(override) if override is not None else None)]
    # openslide derives mpp-x from TIFF tags for generic TIFFs: label it as such.
    os_source = "tiff-resolution" if props.get("openslide.vendor") == "generic-tiff" else "openslide"
    candidates.append((os_source, _mean(_f(props.get("openslide.mpp-x")), _f(props.get("openslide.mpp-y")))))
    candidates.append(("tiffslide", _mean(_f(props.get("tiffslide.mpp-x")), _f(props.get("tiffslide.mpp-y")))))
    candidates.append(("aperio.MPP", _f(props.get("aperio.MPP"))))
    candidates.append(
        (
            "mirax",
            _mean(
                _f(props.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X")),
                _f(props.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y")),
            ),
        )
    )
    candidates.append(("tiff-resolution", _tiff_tag_mpp(props)))
    candidates.append(("objective-power", 10.0 / objective if objective else None))

    rejected: list[str] = []
    for source, value in candidates:
        if value is None:
            continue
        if MPP_MIN <= value <= MPP_MAX:
            return MppResolution(round(value, 6), source, objective)
        note = f"{value:.4g} µm/px from {source}"
        if note not in rejected:
            rejected.append(note)
    if rejected:
        problem = f"no plausible MPP ({', '.join(rejected)} outside {MPP_MIN}-{MPP_MAX})"
    else:
        problem = "no MPP in the slide metadata"
    return MppResolution(
        None, None, objective, problem + f"; give it with {ref('slide_source', 'mpp_csv')} (columns wsi,mpp)"
    )


def load_mpp_csv(path: str | Path) -> dict[str, float]:
    """{file stem: mpp} from a CSV with columns `wsi` and `mpp` (seed format)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{_CSV}: file not found: {path}")
    out: dict[str, float] = {}
    first_line: dict[str, int] = {}
    conflicts: list[str] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "wsi" not in cols or "mpp" not in cols:
            raise UsageError(f"{_CSV} {path}: needs columns 'wsi' and 'mpp', found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            name = (row.get(cols["wsi"]) or "").strip()
            value = _f(row.get(cols["mpp"]))
            if not name:
                continue
            if value is None or not (MPP_MIN <= value <= MPP_MAX):
                raise UsageError(f"{_CSV} {path}:{i}: mpp {row.get(cols['mpp'])!r} not in {MPP_MIN}-{MPP_MAX}")
            stem = stem_of(name)
            if stem in out and out[stem] != value:  # which one is right? the user must say
                conflicts.append(f"{stem!r}: {out[stem]:g} (line {first_line[stem]}) vs {value:g} (line {i})")
                continue
            out[stem] = value
            first_line.setdefault(stem, i)
    if conflicts:
        raise UsageError(f"{_CSV} {path}: conflicting rows for one slide: {'; '.join(conflicts)}")
    return out


def stem_of(name: str) -> str:
    """File stem of a path or file name (directory series: the folder name)."""
    p = Path(name.replace("\\", "/"))
    return p.stem if p.suffix else p.name
