"""Converting a run folder's per-slide stores to another format (`atlaspatch convert`).

Per slide, under the source and target stores' locks (no stage changes them meanwhile): every
dataset and attribute is copied into a hidden temporary store of the target format beside its
final place, the copy is compared with the source array by array and attribute by attribute
(through the `SlideStore` API, so both sides say what any reader sees), then renamed into place.
Only a verified copy is moved in, and the source store is removed afterwards unless kept: a slide
either converts completely or is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import DatasetWrite, SlideStore
from .files import temp_name
from .layout import FORMATS, RunLayout

CONVERTED, FAILED = "converted", "failed"


class ConvertUsageError(ValueError):
    """The run folder cannot be converted as asked (nothing was changed)."""


@dataclass
class SlideConversion:
    slide_id: str
    status: str  # converted | failed
    arrays: int = 0
    source_bytes: int = 0
    target_bytes: int = 0
    target: str = ""
    reason: str = ""


def native_attr(v: Any) -> Any:
    """An attribute as readers see it (`attr_view`) back to its structured value when that is
    lossless: JSON strings of dicts/lists become dicts/lists again (readable in Zarr metadata)."""
    if isinstance(v, str) and v[:1] in ("{", "["):
        try:
            parsed = json.loads(v)
        except ValueError:
            return v
        if json.dumps(parsed, sort_keys=True, default=str) == v:
            return parsed
    return v


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def compare_stores(a: SlideStore, b: SlideStore) -> list[str]:
    """What differs between two stores (empty: equal): dataset names, file attributes, and every
    dataset's dtype, shape, values (NaN equal to NaN) and attributes."""
    out: list[str] = []
    na, nb = set(a.names()), set(b.names())
    if na != nb:
        out.append(f"datasets differ: only in source {sorted(na - nb)}, only in target {sorted(nb - na)}")
    aa, ab = a.attrs(), b.attrs()
    out += [
        f"file attr {k}: {aa.get(k)!r} != {ab.get(k)!r}"
        for k in sorted(set(aa) | set(ab))
        if not _same(aa.get(k), ab.get(k))
    ]
    for name in sorted(na & nb):
        (x, xa), (y, ya) = a.read(name), b.read(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{name}: {x.dtype}{x.shape} != {y.dtype}{y.shape}")
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
            out.append(f"{name}: values differ")
        out += [
            f"{name} attr {k}: {xa.get(k)!r} != {ya.get(k)!r}"
            for k in sorted(set(xa) | set(ya))
            if not _same(xa.get(k), ya.get(k))
        ]
    return out


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _remove(path: Path) -> None:
    """Rename away, then delete: never a half-deleted store under the visible name."""
    if not path.exists():
        return
    gone = temp_name(path)
    os.rename(path, gone)
    shutil.rmtree(gone) if gone.is_dir() else gone.unlink()


def _move_into_place(staged: Path, final: Path) -> None:
    if final.is_dir():  # a directory cannot be replaced by one rename: swap, the old one hidden
        old = temp_name(final)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


def convert_slide(source: RunLayout, target: RunLayout, slide_id: str, keep_source: bool = False) -> SlideConversion:
    src, dst = source.store(slide_id), target.store(slide_id)
    res = SlideConversion(slide_id, FAILED, target=str(dst.path))
    staged_path = temp_name(dst.path)
    staged: SlideStore = type(dst)(staged_path, slide_id)
    try:
        with src.lock(), dst.lock():  # neither store changes while it converts
            res.source_bytes = size_on_disk(src.path)
            datasets = {
                name: DatasetWrite(data, {k: native_attr(v) for k, v in attrs.items()})
                for name, data, attrs in src.read_all()
            }
            staged.write(datasets, {k: native_attr(v) for k, v in src.attrs().items()})
            diff = compare_stores(src, staged)
            if diff:
                res.reason = "verification failed: " + "; ".join(diff[:5]) + (" …" if len(diff) > 5 else "")
                return res
            _move_into_place(staged_path, dst.path)
            if not keep_source:
                _remove(src.path)
        res.status, res.arrays, res.target_bytes = CONVERTED, len(datasets), size_on_disk(dst.path)
    except Exception as e:  # one slide's problem: the others convert
        res.reason = f"{type(e).__name__}: {e}"
    finally:
        if staged_path.exists():
            shutil.rmtree(staged_path, ignore_errors=True) if staged_path.is_dir() else staged_path.unlink()
        staged.lock_path.unlink(missing_ok=True)  # nobody else knows the temporary's lock
    return res


def convert_run(
    run_dir: str | Path,
    to: str,
    keep_source: bool = False,
    on_slide: Callable[[SlideConversion], None] | None = None,
) -> list[SlideConversion]:
    """Convert every store of the run folder that is not in format `to` (ConvertUsageError when
    there is none, or `run_dir` is no run folder)."""
    if to not in FORMATS:
        raise ConvertUsageError(f"unknown store format {to!r} (one of: {', '.join(FORMATS)})")
    try:
        layout = RunLayout.from_run_dir(Path(run_dir).resolve())
    except ValueError as e:
        raise ConvertUsageError(str(e)) from e
    sources = [layout.with_format(f) for f in layout.formats_on_disk() if f != to]
    if not sources:
        have = f"already {to}" if layout.with_format(to).slide_ids() else "no slide stores"
        raise ConvertUsageError(f"nothing to convert in {layout.root}: {have}")
    target = layout.with_format(to)
    out: list[SlideConversion] = []
    for source in sources:
        for sid in source.slide_ids():
            r = convert_slide(source, target, sid, keep_source)
            out.append(r)
            if on_slide is not None:
                on_slide(r)
    return out


def summarize(results: Sequence[SlideConversion]) -> dict[str, int]:
    return {s: sum(r.status == s for r in results) for s in (CONVERTED, FAILED)}
