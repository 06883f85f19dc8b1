"""`Slide`: an opened slide (a backend plus its metadata, MPP and thumbnail) and `open_slide`.

Backends (`registry.BACKENDS`) are tried in order on a file they claim: OpenSlide (all vendor
formats), tiffslide (TIFF variants OpenSlide rejects), and a plain-image reader. Every read
returns RGB uint8 with transparent/absent areas composited onto white.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ReadError, SlideError, SlideOpenError, SlideTooLargeError
from ..mpp import MppResolution, resolve_mpp
from .base import HEAD_BYTES, KNOWN_SIGNATURES, TEXT_INDEX_EXTENSIONS, SlideBackend, file_extension, sniff_format
from .registry import SUPPORTED_EXTENSIONS, backends_for, unsupported_reason

# Relative tolerance when comparing pyramid downsamples (vendors store 4.016 for "4").
DOWNSAMPLE_TOLERANCE = 0.01
THUMBNAIL_TILE_CACHE = 4 << 20  # bytes of backend tile cache while a thumbnail is read


def best_level(level_downsamples: tuple[float, ...], downsample: float) -> int:
    """Coarsest level whose downsample is <= the wanted one (never upsample)."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= downsample * (1 + DOWNSAMPLE_TOLERANCE):
            best = i
    return best


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of an opened slide (level-0 pixels, µm per pixel)."""

    path: str
    backend: str
    vendor: str | None
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str | None
    objective_power: float | None
    mpp_problem: str | None = None
    properties: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def magnification(self) -> float | None:
        """Level-0 magnification implied by the MPP (10 µm/px / mpp)."""
        return round(10.0 / self.mpp, 3) if self.mpp else None

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("properties")
        d["magnification"] = self.magnification
        return d


class Slide:
    """An opened slide. Use as a context manager; reads are thread-safe per backend."""

    def __init__(self, path: str | Path, reader: SlideBackend, info: SlideInfo):
        self.path = str(path)
        self.reader = reader
        self.backend = reader.name  # short name, for display and metadata
        self.info = info

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry helpers --------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float) -> int:
        return best_level(self.info.level_downsamples, downsample)

    # -- reading -----------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` pixels at `level`, top-left at level-0 `location`."""
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        try:
            return self.reader.read_region(x, y, level, w, h)
        except ReadError:
            raise
        except Exception as e:  # codec/IO errors surface here
            raise ReadError(f"cannot decode region {w}x{h}@({x},{y}) level {level}: {e}") from e

    def read_thumbnail(self, target_mpp: float, strip_bytes: int = 2 << 20) -> tuple[np.ndarray, float, float]:
        """Whole-slide image at ~`target_mpp` µm/px, read from the best pyramid level in strips.

        Returns (rgb, downsample_x, downsample_y) with downsample = level-0 px per thumbnail px.
        Each strip is area-resized across; each of its rows is then split between the (at most
        two) thumbnail rows it overlaps with exact area weights, so the result does not depend on
        where strips break. Memory: one strip (`strip_bytes` of RGBA at the level) + the uint8
        thumbnail. The backend's tile cache is shrunk meanwhile: each tile is read once here, and
        OpenSlide's default 32 MiB would otherwise be most of the peak on big slides.
        """
        if not self.info.mpp:
            raise ReadError("thumbnail needs an MPP")
        with self.reader.tile_cache(THUMBNAIL_TILE_CACHE):
            return self._read_thumbnail(target_mpp, strip_bytes)

    def _read_thumbnail(self, target_mpp: float, strip_bytes: int) -> tuple[np.ndarray, float, float]:
        want_ds = max(1.0, target_mpp / self.info.mpp)
        W, H = self.info.width, self.info.height
        tw, th = max(1, round(W / want_ds)), max(1, round(H / want_ds))
        level = self.best_level_for_downsample(want_ds)
        lw, lh = self.info.level_dimensions[level]
        if lh < th or lw < tw:  # rounding corner case on tiny slides: one read, one resize
            region = self.read_region((0, 0), level, (lw, lh))
            return cv2.resize(region, (tw, th), interpolation=cv2.INTER_AREA), W / tw, H / th
        lds_y = H / lh
        s = lh / th  # level rows per thumbnail row (>= 1)
        out = np.empty((th, tw, 3), np.uint8)
        pending: np.ndarray | None = None  # partial sums of thumbnail rows [pending_at, ...)
        pending_at = 0
        rows_per_strip = max(1, min(lh, strip_bytes // max(1, lw * 4)))
        for r0 in range(0, lh, rows_per_strip):
            r1 = min(lh, r0 + rows_per_strip)
            strip = self.read_region((0, round(r0 * lds_y)), level, (lw, r1 - r0))
            across = cv2.resize(strip, (tw, r1 - r0), interpolation=cv2.INTER_AREA).astype(np.float32)
            del strip
            r = np.arange(r0, r1, dtype=np.float64)
            t = np.minimum((r // s).astype(np.int64), th - 1)  # first thumbnail row of each level row
            w_first = (np.minimum(r + 1, (t + 1) * s) - r) / s
            w_next = (1.0 / s) - w_first  # the part that spills into row t + 1
            lo, hi = int(t[0]), min(th, int(t[-1]) + 2)
            window = np.zeros((hi - lo, tw, 3), np.float32)
            if pending is not None:  # rows the previous strip started
                k = pending_at - lo
                window[k : k + len(pending)] += pending[: hi - lo - k]
            _accumulate(window, t - lo, across * w_first[:, None, None].astype(np.float32))
            spill = (w_next > 1e-9) & (t + 1 < th)
            if spill.any():
                spilled = across[spill] * w_next[spill, None, None].astype(np.float32)
                _accumulate(window, t[spill] + 1 - lo, spilled)
            done = hi if r1 == lh else min(hi, int(r1 // s))  # later strips only touch rows >= r1 // s
            np.add(window[: done - lo], 0.5, out=window[: done - lo])
            out[lo:done] = np.clip(window[: done - lo], 0, 255)
            pending, pending_at = window[done - lo :], done
        return out, W / tw, H / th


def _accumulate(acc: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """acc[rows] += values for non-decreasing `rows` (sums runs of equal rows first)."""
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    acc[rows[starts]] += np.add.reduceat(values, starts, axis=0)


def open_slide(path: str | Path, mpp_override: float | None = None, probe: bool = True) -> Slide:
    """Open `path` with the first backend that can read it; resolve its MPP.

    Raises SlideOpenError with a one-line reason when nothing can open it. A slide without a
    plausible MPP still opens (`info.mpp is None`, `info.mpp_problem` says why): the stages
    that need physical units fail with a message naming --mpp-csv.
    """
    path = str(path)
    head = _check_file(path)
    attempts = backends_for(path)
    if not attempts:
        ext = file_extension(path)
        why = unsupported_reason(path) or f"unsupported extension {ext!r}; supported: {' '.join(SUPPORTED_EXTENSIONS)}"
        raise SlideOpenError(why)
    if file_extension(path) not in TEXT_INDEX_EXTENSIONS and sniff_format(head) is None:
        raise SlideOpenError(
            f"cannot open slide: not a slide or image file (its first bytes match no {KNOWN_SIGNATURES} signature)"
        )

    errors: list[str] = []
    too_large = False
    for backend in attempts:
        reader: SlideBackend | None = None
        try:
            reader = backend.open(path)
            slide = _make_slide(path, reader, mpp_override)
            if probe:
                _probe(slide)
            return slide
        except SlideError as e:  # ReadError from the probe, SlideTooLargeError from a backend
            errors.append(f"{backend.name}: {_clean(e.reason)}")
            too_large = too_large or isinstance(e, SlideTooLargeError)
        except Exception as e:
            errors.append(f"{backend.name}: {type(e).__name__}: {_clean(str(e)) or 'cannot open'}")
        if reader is not None:
            reader.close()
    if not os.path.lexists(path):
        raise SlideOpenError(f"file disappeared while it was being opened: {path}")
    raise (SlideTooLargeError if too_large else SlideOpenError)("cannot open slide (" + "; ".join(errors) + ")")


def _check_file(path: str) -> bytes:
    """The first bytes of `path`, or SlideOpenError saying why it is no readable file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise SlideOpenError(f"dangling symlink (its target is missing): {path}") from None
        raise SlideOpenError(f"file not found (deleted or moved since it was listed?): {path}") from None
    except PermissionError:
        raise SlideOpenError(f"permission denied: cannot look up {path}") from None
    except OSError as e:  # symlink loop, name too long, I/O error
        raise SlideOpenError(f"cannot look up {path}: {e.strerror or type(e).__name__}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SlideOpenError(f"is a directory, not a slide file: {path}")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever
        raise SlideOpenError(f"not a regular file (FIFO, socket or device): {path}")
    if st.st_size == 0:
        raise SlideOpenError("empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            return fh.read(HEAD_BYTES)
    except FileNotFoundError:
        raise SlideOpenError(f"file disappeared while it was being opened: {path}") from None
    except PermissionError:
        raise SlideOpenError(f"permission denied: {path} is not readable by this user") from None
    except OSError as e:
        raise SlideOpenError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None


# Byte/str literals in library messages (tifffile: "header=b'IJrE'") quote file contents.
_QUOTED_BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def _clean(message: str, limit: int = 240) -> str:
    """A library's error message without quoted file bytes, on one line, at most `limit` chars."""
    text = " ".join(_QUOTED_BYTES.sub("<bytes>", message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _make_slide(path: str, reader: SlideBackend, mpp_override: float | None) -> Slide:
    dims = reader.level_dimensions
    if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
        raise SlideOpenError("slide has no pixels")
    props = reader.properties
    res: MppResolution = resolve_mpp(props, backend=reader.name, path=path, override=mpp_override)
    info = SlideInfo(
        path=path,
        backend=reader.name,
        vendor=reader.vendor,
        width=int(dims[0][0]),
        height=int(dims[0][1]),
        level_count=len(dims),
        level_dimensions=dims,
        level_downsamples=reader.level_downsamples,
        mpp=res.mpp,
        mpp_source=res.source,
        objective_power=res.objective_power,
        mpp_problem=res.problem,
        properties=props,
    )
    return Slide(path, reader, info)


def _probe(slide: Slide) -> None:
    """Decode one small region of the coarsest level so corrupt files fail at open time."""
    lvl = slide.info.level_count - 1
    lw, lh = slide.info.level_dimensions[lvl]
    w, h = min(lw, 64), min(lh, 64)
    ds = slide.info.level_downsamples[lvl]
    x0 = int((lw - w) // 2 * ds)
    y0 = int((lh - h) // 2 * ds)
    slide.read_region((x0, y0), lvl, (w, h))
