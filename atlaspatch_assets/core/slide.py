"""Opening whole-slide images and plain images behind one small interface.

Backends, tried in order for a file: OpenSlide (all vendor formats), tiffslide (TIFF
variants OpenSlide rejects), and a plain-image reader (PNG/JPEG/... and plain TIFFs).
Every read returns RGB uint8 with transparent/absent areas composited onto white.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import ReadError, SlideOpenError
from .mpp import MppResolution, resolve_mpp

OPENSLIDE_DEFAULT_CACHE = 32 << 20  # bytes; OpenSlide's own default per handle

OPENSLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".dcm")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
SUPPORTED_EXTENSIONS = OPENSLIDE_EXTENSIONS + IMAGE_EXTENSIONS
TIFF_EXTENSIONS = (".tif", ".tiff", ".svs")

# Relative tolerance when comparing pyramid downsamples (vendors store 4.016 for "4").
DOWNSAMPLE_TOLERANCE = 0.01


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

    def __init__(self, path: str | Path, backend: str, handle: Any, info: SlideInfo):
        self.path = str(path)
        self.backend = backend
        self._h = handle
        self.info = info

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        close = getattr(self._h, "close", None)
        if close:
            close()

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
            if self.backend == "openslide":
                arr = np.asarray(self._h.read_region((x, y), level, (w, h)))
            elif self.backend == "tiffslide":
                return self._read_tiffslide(x, y, level, w, h)
            else:
                arr = self._h.read_region((x, y), level, (w, h))
        except Exception as e:  # codec/IO errors surface here
            raise ReadError(f"cannot decode region {w}x{h}@({x},{y}) level {level}: {e}") from e
        return to_rgb(arr)

    def _read_tiffslide(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """tiffslide pads outside the image with black: read the inside only, pad with white."""
        ds = self.info.level_downsamples[level]
        lw, lh = self.info.level_dimensions[level]
        lx, ly = x / ds, y / ds
        x0, y0 = max(0, int(np.ceil(-lx))), max(0, int(np.ceil(-ly)))  # first inside column/row
        x1, y1 = min(w, int(np.floor(lw - lx))), min(h, int(np.floor(lh - ly)))
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            loc = (x + round(x0 * ds), y + round(y0 * ds))
            arr = np.asarray(self._h.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True))
            out[y0:y1, x0:x1] = to_rgb(arr)
        return out

    def read_thumbnail(self, target_mpp: float, strip_bytes: int = 2 << 20) -> tuple[np.ndarray, float, float]:
        """Whole-slide image at ~`target_mpp` µm/px, read from the best pyramid level in strips.

        Returns (rgb, downsample_x, downsample_y) with downsample = level-0 px per thumbnail px.
        Each strip is area-resized across; each of its rows is then split between the (at most
        two) thumbnail rows it overlaps with exact area weights, so the result does not depend on
        where strips break. Memory: one strip (`strip_bytes` of RGBA at the level) + the uint8
        thumbnail. OpenSlide's tile cache is shrunk meanwhile: each tile is read once here, and its
        default 32 MiB would otherwise be most of the peak on big slides.
        """
        if not self.info.mpp:
            raise ReadError("thumbnail needs an MPP")
        with self._small_tile_cache():
            return self._read_thumbnail(target_mpp, strip_bytes)

    @contextlib.contextmanager
    def _small_tile_cache(self, capacity: int = 4 << 20) -> Iterator[None]:
        set_cache = getattr(self._h, "set_cache", None)  # OpenSlide >= 4 only
        if set_cache is None:
            yield
            return
        import openslide

        set_cache(openslide.OpenSlideCache(capacity))
        try:
            yield
        finally:
            set_cache(openslide.OpenSlideCache(OPENSLIDE_DEFAULT_CACHE))

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


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 from gray/RGB/RGBA; transparent pixels (no scanned data) become white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4]
        rgb = arr[..., :3]
        if alpha.min() < 255:
            a = alpha.astype(np.float32) / 255.0
            rgb = (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
        return np.ascontiguousarray(rgb)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    hi = float(a.max()) or 1.0
    return np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)


class _PlainImage:
    """A single-level in-memory image with OpenSlide-like read_region (white outside)."""

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb

    def read_region(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = loc
        w, h = size
        H, W = self.rgb.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.rgb[y0:y1, x0:x1]
        return out


def _load_plain_image(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # plain scans can be large; we read them once
    try:
        with Image.open(path) as im:
            im.seek(0)
            return to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("P", "LA", "PA") else im))
    except Exception:
        import tifffile

        return to_rgb(np.asarray(tifffile.imread(path, key=0)))


def _open_openslide(path: str) -> tuple[Any, dict[str, str], tuple, tuple]:
    import openslide

    h = openslide.OpenSlide(path)
    return h, dict(h.properties), tuple(h.level_dimensions), tuple(float(d) for d in h.level_downsamples)


def _open_tiffslide(path: str) -> tuple[Any, dict[str, str], tuple, tuple]:
    import tiffslide

    h = tiffslide.TiffSlide(path)
    props = {k: str(v) for k, v in h.properties.items() if v is not None}
    return h, props, tuple(h.level_dimensions), tuple(float(d) for d in h.level_downsamples)


def open_slide(path: str | Path, mpp_override: float | None = None, probe: bool = True) -> Slide:
    """Open `path` with the first backend that can read it; resolve its MPP.

    Raises SlideOpenError with a one-line reason when nothing can open it. A slide without a
    plausible MPP still opens (`info.mpp is None`, `info.mpp_problem` says why): the stages
    that need physical units fail with a message naming --mpp-csv.
    """
    path = str(path)
    if not os.path.exists(path):
        raise SlideOpenError(f"file not found: {path}")
    if os.path.isdir(path):
        raise SlideOpenError(f"is a directory, not a slide file: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise SlideOpenError("empty file (0 bytes)")
    ext = Path(path).suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise SlideOpenError(f"unsupported extension {ext!r}; supported: {' '.join(SUPPORTED_EXTENSIONS)}")

    errors: list[str] = []
    attempts: list[tuple[str, Any]] = []
    if ext in OPENSLIDE_EXTENSIONS:
        attempts.append(("openslide", _open_openslide))
    if ext in TIFF_EXTENSIONS:
        attempts.append(("tiffslide", _open_tiffslide))
    if ext in IMAGE_EXTENSIONS or ext in (".tif", ".tiff"):
        attempts.append(("image", None))

    for backend, opener in attempts:
        try:
            if opener is None:
                rgb = _load_plain_image(path)
                h: Any = _PlainImage(rgb)
                props: dict[str, str] = {}
                dims = ((rgb.shape[1], rgb.shape[0]),)
                dss: tuple = (1.0,)
            else:
                h, props, dims, dss = opener(path)
            slide = _make_slide(path, backend, h, props, dims, dss, mpp_override)
            if probe:
                _probe(slide)
            return slide
        except ReadError as e:
            errors.append(f"{backend}: {e.reason}")
        except Exception as e:
            errors.append(f"{backend}: {type(e).__name__}: {str(e).strip() or 'cannot open'}")
    raise SlideOpenError("cannot open slide (" + "; ".join(errors) + ")")


def _make_slide(
    path: str,
    backend: str,
    h: Any,
    props: dict[str, str],
    dims: tuple,
    dss: tuple,
    mpp_override: float | None,
) -> Slide:
    if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
        raise SlideOpenError("slide has no pixels")
    res: MppResolution = resolve_mpp(props, backend=backend, path=path, override=mpp_override)
    vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor") or ("image" if backend == "image" else None)
    info = SlideInfo(
        path=path,
        backend=backend,
        vendor=vendor,
        width=int(dims[0][0]),
        height=int(dims[0][1]),
        level_count=len(dims),
        level_dimensions=tuple((int(w), int(hh)) for w, hh in dims),
        level_downsamples=tuple(float(d) for d in dss),
        mpp=res.mpp,
        mpp_source=res.source,
        objective_power=res.objective_power,
        mpp_problem=res.problem,
        properties=props,
    )
    return Slide(path, backend, h, info)


def _probe(slide: Slide) -> None:
    """Decode one small region of the coarsest level so corrupt files fail at open time."""
    lvl = slide.info.level_count - 1
    lw, lh = slide.info.level_dimensions[lvl]
    w, h = min(lw, 64), min(lh, 64)
    ds = slide.info.level_downsamples[lvl]
    x0 = int((lw - w) // 2 * ds)
    y0 = int((lh - h) // 2 * ds)
    slide.read_region((x0, y0), lvl, (w, h))
