"""Finding slides in files/folders and naming them with safe, stable slide ids."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .slide import SUPPORTED_EXTENSIONS

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_KEY = 100


@dataclass(frozen=True)
class SlideFile:
    """A slide to process: `path` is the file to open; `name` is what its id derives from."""

    path: str
    name: str  # file stem, or the folder name of a DICOM series

    @property
    def stem_key(self) -> str:
        return safe_key(self.name)


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def safe_key(name: str) -> str:
    """Reduce a name to [A-Za-z0-9._-] (no '..', no leading dot, <= 100 chars).

    A name that had to change gets a short hash of the original, so distinct hostile or
    unicode names never collapse onto one key.
    """
    key = re.sub(r"\.{2,}", "_", _UNSAFE.sub("_", name)).strip("._-") or "slide"
    if key == name and len(key) <= MAX_KEY:
        return key
    return f"{key[: MAX_KEY - 9].rstrip('._-')}-{short_hash(name, 8)}"


def discover(inputs: Iterable[str | Path], recursive: bool = False) -> tuple[list[SlideFile], list[str]]:
    """Slides under the given files/folders; DICOM series (a folder of .dcm) count as one slide.

    Returns (slides, problems) where problems are one-line notes on inputs that do not exist.
    """
    found: list[SlideFile] = []
    problems: list[str] = []
    seen: set[str] = set()
    for inp in inputs:
        p = Path(inp)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = _walk(p, recursive)
        else:
            problems.append(f"{inp}: no such file or directory")
            continue
        dicom_dirs: dict[Path, list[Path]] = {}
        for f in files:
            ext = f.suffix.lower()
            if ext not in SUPPORTED_EXTENSIONS:
                continue
            if ext == ".dcm":
                dicom_dirs.setdefault(f.parent, []).append(f)
                continue
            rp = os.path.realpath(f)
            if rp not in seen:
                seen.add(rp)
                found.append(SlideFile(str(f), f.stem))
        for d, dcms in dicom_dirs.items():
            first = sorted(dcms)[0]
            rp = os.path.realpath(d)
            if rp not in seen:
                seen.add(rp)
                found.append(SlideFile(str(first), d.name if len(dcms) > 1 or p.is_dir() else first.stem))
    return found, problems


def _walk(root: Path, recursive: bool) -> list[Path]:
    out: list[Path] = []
    if not recursive:
        return sorted(x for x in root.iterdir() if x.is_file() and not x.name.startswith("."))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        # .mrxs companion folders hold .dat files only; skipping dot-files avoids temp copies
        out.extend(base / f for f in sorted(filenames) if not f.startswith("."))
    return out


def assign_ids(slides: list[SlideFile], taken: dict[str, str] | None = None) -> dict[str, SlideFile]:
    """slide_id → slide. Ids already bound to a path (`taken`: id → path) stay bound; a new
    slide whose stem collides with another path gets the path's short hash appended."""
    taken = dict(taken or {})
    by_path = {os.path.abspath(v): k for k, v in taken.items()}
    out: dict[str, SlideFile] = {}
    for s in slides:
        ap = os.path.abspath(s.path)
        if ap in by_path:
            out[by_path[ap]] = s
            continue
        key = s.stem_key
        if key in taken or key in out:
            key = f"{key[: MAX_KEY - 9]}-{short_hash(ap)}"
        taken[key] = ap
        by_path[ap] = key
        out[key] = s
    return out
