"""Finding slides in files/folders and naming them with safe, stable slide ids.

`discover` never drops a path silently: every file or folder it passes over is either a slide
(which may still fail alone when opened: unreadable, vanished ...), a problem (one-line note the
CLI always prints: missing inputs, unlisted folders, known formats without a reader), or an
ignored entry with its reason (dot-files, unknown extensions, dangling links ...; for `-v`).

DICOM WSI: the `.dcm` files of a folder are grouped by SeriesInstanceUID (one slide per series;
OpenSlide opens a series from any of its files and finds the others in the same folder). A
folder holding one series is named after the folder, as before; with several series each is
named `<folder>-<hash of its UID>`; a `.dcm` whose UID cannot be read is a slide of its own, so
it fails alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .slides.base import file_extension
from .slides.registry import is_supported, unsupported_reason

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_KEY = 100
_UID_CACHE_MAX = 20_000  # (path, size, mtime) -> SeriesInstanceUID; the inbox rescans every tick
_uid_cache: dict[tuple[str, int, int], str | None] = {}


@dataclass(frozen=True)
class SlideFile:
    """A slide to process: `path` is the file to open; `name` is what its id derives from."""

    path: str
    name: str  # file stem, or a DICOM series' folder name (`<folder>-<uid hash>` when it holds several)

    @property
    def stem_key(self) -> str:
        return safe_key(self.name)


@dataclass(frozen=True)
class Ignored:
    """A path discovery passed over on purpose, and why (printed by the CLI with -v)."""

    path: str
    reason: str


@dataclass
class Discovery:
    """What `discover` found. Unpacks like the old tuple: `slides, problems = discover(...)`."""

    slides: list[SlideFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<path>: <one-line reason>"
    ignored: list[Ignored] = field(default_factory=list)

    def __iter__(self) -> Iterator[list]:
        return iter((self.slides, self.problems))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> list:
        return (self.slides, self.problems)[i]


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


# -- DICOM series ---------------------------------------------------------------------------------


def dicom_series_uid(path: str | Path) -> str | None:
    """SeriesInstanceUID of a DICOM file (header only), or None when it cannot be read."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError:
        return None
    key = (p, st.st_size, st.st_mtime_ns)
    if key in _uid_cache:
        return _uid_cache[key]
    try:
        import pydicom

        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        uid = str(ds.get("SeriesInstanceUID") or "").strip() or None
    except Exception:  # not DICOM, truncated, unreadable: the file becomes a slide of its own
        uid = None
    if len(_uid_cache) >= _UID_CACHE_MAX:
        _uid_cache.clear()
    _uid_cache[key] = uid
    return uid


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM WSI series of a folder: its slide name and member files (sorted)."""

    name: str
    members: tuple[Path, ...]
    uid: str | None  # None: a file whose SeriesInstanceUID could not be read (a slide alone)
    whole_folder: bool  # the folder's only series: named (and keyed by the inbox) after the folder


def dicom_series(folder_name: str, files: Iterable[Path], named_by_folder: bool = True) -> list[DicomSeries]:
    """The DICOM series among `files` (one folder's .dcm), ordered by first member.

    With one series it is named `folder_name` (or its first file's stem when `named_by_folder`
    is false: a single .dcm given on its own); several series get `<folder>-<uid hash>`; files
    whose UID cannot be read are slides of their own, named by their stem.
    """
    by_uid: dict[str, list[Path]] = {}
    loners: list[Path] = []
    for f in sorted(files):
        uid = dicom_series_uid(f)
        if uid is None:
            loners.append(f)
        else:
            by_uid.setdefault(uid, []).append(f)
    out: list[DicomSeries] = []
    for uid, members in by_uid.items():
        if len(by_uid) > 1:
            out.append(DicomSeries(f"{folder_name}-{short_hash(uid)}", tuple(members), uid, False))
        else:
            out.append(DicomSeries(folder_name if named_by_folder else members[0].stem, tuple(members), uid, True))
    out.extend(DicomSeries(f.stem, (f,), None, False) for f in loners)
    return sorted(out, key=lambda s: s.members[0])


# -- walking --------------------------------------------------------------------------------------


def discover(inputs: Iterable[str | Path], recursive: bool = False) -> Discovery:
    """Slides under the given files/folders; see the module docstring.

    Returns a `Discovery` (slides, problems, ignored) that also unpacks as (slides, problems).
    """
    out = Discovery()
    seen: dict[str, str] = {}  # realpath -> the path it was first found as
    for inp in inputs:
        p = Path(inp)
        if os.path.islink(p) and not p.exists():
            out.problems.append(f"{inp}: dangling symlink (its target is missing)")
            continue
        dicom_dirs: dict[Path, list[Path]] = {}
        if p.is_dir():
            _walk(p, recursive, out, dicom_dirs, seen)
            for d, dcms in dicom_dirs.items():
                _add_dicom(d, dcms, True, out, seen)
        elif p.exists():
            ext = file_extension(p)
            why = unsupported_reason(p)
            if why:
                out.problems.append(f"{inp}: {why}")
            elif not is_supported(p):
                out.problems.append(f"{inp}: {_unknown(ext)}")
            elif ext == ".dcm":
                _add_dicom(p.parent, [p], False, out, seen)
            else:
                _add_file(p, out, seen)
        else:
            out.problems.append(f"{inp}: no such file or directory")
    return out


def _unknown(ext: str) -> str:
    return f"unknown extension {ext!r}" if ext else "no file extension"


def _add_file(f: Path, out: Discovery, seen: dict[str, str]) -> None:
    rp = os.path.realpath(f)
    if rp in seen:
        out.ignored.append(Ignored(str(f), f"same file as {seen[rp]}"))
        return
    seen[rp] = str(f)
    out.slides.append(SlideFile(str(f), f.stem))


def _add_dicom(d: Path, dcms: list[Path], named_by_folder: bool, out: Discovery, seen: dict[str, str]) -> None:
    for series in dicom_series(d.name, dcms, named_by_folder or len(dcms) > 1):
        first = series.members[0]
        rp = os.path.realpath(first)
        if rp in seen:
            out.ignored.append(Ignored(str(first), f"same DICOM series as {seen[rp]}"))
            continue
        for m in series.members:
            seen.setdefault(os.path.realpath(m), str(first))
        out.slides.append(SlideFile(str(first), series.name))


def _walk(
    root: Path, recursive: bool, out: Discovery, dicom_dirs: dict[Path, list[Path]], seen: dict[str, str]
) -> None:
    """Depth-first, sorted, top-down (like os.walk): files of a folder, then its subfolders."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        out.problems.append(f"{root}: cannot list folder: {e.strerror or type(e).__name__}")
        return
    names = {e.name for e in entries}
    subdirs: list[Path] = []
    for e in entries:
        path = Path(e.path)
        if e.name.startswith("."):
            out.ignored.append(Ignored(e.path, "hidden (name starts with '.')"))
            continue
        try:
            is_link = e.is_symlink()
        except OSError:
            is_link = False
        try:
            st = os.stat(e.path)  # follows symlinks
        except FileNotFoundError:
            if is_link and is_supported(path) and file_extension(path) != ".dcm":
                # a slide the user dropped as a link: it fails alone ("dangling symlink"), visibly
                out.slides.append(SlideFile(str(path), path.stem))
                continue
            why = "dangling symlink (its target is missing)" if is_link else "disappeared while listing"
            out.ignored.append(Ignored(e.path, why))
            continue
        except OSError as err:  # symlink loop, permission on the target's folder
            out.ignored.append(Ignored(e.path, f"cannot look up: {err.strerror or type(err).__name__}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            if f"{e.name}.mrxs" in names:
                out.ignored.append(Ignored(e.path, f"data folder of {e.name}.mrxs (part of that slide)"))
            elif is_link and recursive:
                out.ignored.append(Ignored(e.path, "symlinked folder not followed (loops, outside trees)"))
            elif not recursive:
                out.ignored.append(Ignored(e.path, "folder not searched (not recursive)"))
            else:
                if is_supported(path) or unsupported_reason(path):
                    out.ignored.append(Ignored(e.path, "a folder named like a slide file: searched as a folder"))
                subdirs.append(path)
            continue
        why = unsupported_reason(path)
        if why:
            out.problems.append(f"{e.path}: {why}")
            continue
        if not is_supported(path):
            out.ignored.append(Ignored(e.path, _unknown(file_extension(path))))
            continue
        if not stat.S_ISREG(st.st_mode):
            out.ignored.append(Ignored(e.path, "not a regular file (FIFO, socket or device)"))
            continue
        if file_extension(path) == ".dcm":
            dicom_dirs.setdefault(root, []).append(path)
        else:
            _add_file(path, out, seen)
    for d in subdirs:
        _walk(d, recursive, out, dicom_dirs, seen)


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
