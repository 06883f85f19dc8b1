"""Watching inbox folders for complete slides (Dagster-free; the `new_slides` sensor drives it).

A tick is: `scan_inbox(dirs)` lists the slides present now with a signature of their files
(size, mtime); `advance(state, scan, now, quiet_seconds)` compares it with the state kept from
the previous ticks and returns the new state, the slides that became ready, and one event per
path whose state changed. A slide is ready when its signature was seen unchanged on two ticks
at least `quiet_seconds` apart AND it opens; a stable file that does not open is `broken` (with
its one-line reason) and is re-checked only when its size/mtime change.

Multi-file slides are one candidate with one signature over all their files: a DICOM series
(the `.dcm` of a folder sharing a SeriesInstanceUID, named as `discovery.discover` names it) and
a `.mrxs` with its companion folder `<stem>/` (Index.dat, Data*.dat). Extensions are the slide
registry's, as in discovery; known formats without a reader (.czi) are `ignored` with a reason.

The state is JSON (the sensor cursor): per path status pending | taken | broken | deleted |
ignored, size, mtime, signature, since (when that signature was first seen), slide id,
content fingerprint, reason, last event. Nothing here raises on a bad file: unreadable paths,
dangling symlinks and symlink loops become `ignored` entries with a reason.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .catalog import fingerprint
from .discovery import SlideFile, assign_ids, dicom_series
from .slides import file_extension, is_supported, open_slide, unsupported_reason

# Names that copy tools use for files still being written (rsync, browsers, WinSCP, editors).
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", "~")
MAX_DEPTH = 32  # deeper trees are not walked (guards pathological nesting)
RETENTION_SECONDS = 7 * 24 * 3600  # deleted entries are forgotten after this
_CURSOR_VERSION = 1
_COMPRESS_ABOVE = 32_000  # cursor characters; larger cursors are zlib+base64 ("z:" prefix)

PENDING, TAKEN, BROKEN, DELETED, IGNORED = "pending", "taken", "broken", "deleted", "ignored"


def is_temp_name(name: str) -> bool:
    """Hidden files and partial downloads/copies (`.x.svs.part`, `x.svs.tmp`, ...)."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def clean_text(text: object) -> str:
    """One line, valid UTF-8 (file names may hold undecodable bytes or newlines)."""
    s = " ".join(str(text).split())
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


# -- scanning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One slide present in an inbox.

    `key` identifies it in the state (the file, or the folder of a DICOM series); `path` is the
    file to open and to register; `members` are all files whose size/mtime make its signature.
    """

    key: str
    path: str
    name: str
    members: tuple[str, ...]
    size: int
    mtime: float
    sig: str
    fingerprint: str | None = None  # set on ready candidates

    @property
    def slide_file(self) -> SlideFile:
        return SlideFile(self.path, self.name)


@dataclass
class Scan:
    candidates: list[Candidate] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    unavailable: list[str] = field(default_factory=list)  # not judged this tick (unlisted, busy)
    roots: list[str] = field(default_factory=list)  # the inbox folders scanned (absolute)


def _stat_members(members: Sequence[str]) -> tuple[int, float, str]:
    """(total size, newest mtime, signature) over the files; raises OSError if one is gone."""
    parts = []
    total, newest = 0, 0.0
    for m in members:
        st = os.stat(m)
        total += st.st_size
        newest = max(newest, st.st_mtime)
        parts.append(f"{m}\0{st.st_size}\0{st.st_mtime_ns}")
    if len(members) == 1:
        return total, newest, f"{st.st_size}:{st.st_mtime_ns}"
    sig = hashlib.sha1("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return total, newest, f"{len(members)}f:{sig}"


def _companion_files(mrxs: Path) -> list[str]:
    """The files of a MIRAX slide's companion folder `<dir>/<stem>/` (recursive, sorted)."""
    comp = mrxs.with_suffix("")
    if not comp.is_dir() or comp.is_symlink():
        return []
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(comp, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not is_temp_name(f))
    return out


def scan_inbox(dirs: Iterable[str | Path], recursive: bool = True) -> Scan:
    """The slides in the inbox folders now, with their file signatures.

    Only supported extensions count; hidden and temporary names are skipped (a copy written as
    `.x.svs.part` and renamed to `x.svs` appears once, complete). Symlinked folders are never
    descended (so symlink loops cannot trap the walk) and are reported; symlinked files are
    followed, and a file reachable twice (symlink, hard link, overlapping inboxes) counts once.
    """
    scan = Scan()
    seen_inodes: set[tuple[int, int]] = set()
    seen_keys: set[str] = set()
    for d in dirs:
        root = os.path.abspath(os.fspath(d))
        scan.roots.append(root)
        if not os.path.isdir(root):
            scan.problems.append((root, "inbox folder missing or not a folder (unmounted?); not scanned"))
            scan.unavailable.append(root)
            continue

        def onerror(err: OSError, _root: str = root) -> None:
            where = err.filename or _root
            scan.problems.append((where, f"cannot list folder: {err.strerror or err}"))
            scan.unavailable.append(where)

        for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
            depth = 0 if dirpath == root else os.path.relpath(dirpath, root).count(os.sep) + 1
            keep = []
            for dn in sorted(dirnames):
                full = os.path.join(dirpath, dn)
                if dn.startswith("."):
                    continue
                if os.path.islink(full):
                    scan.problems.append(
                        (
                            full,
                            "symlinked folder not followed (loops and outside trees are "
                            "never walked); move or bind-mount it into the inbox",
                        )
                    )
                    continue
                keep.append(dn)
            dirnames[:] = keep if recursive and depth < MAX_DEPTH else []
            dicoms: list[str] = []
            for fn in sorted(filenames):
                if is_temp_name(fn):
                    continue
                full = os.path.join(dirpath, fn)
                why = unsupported_reason(fn)
                if why:  # a known slide format without a reader: reported, not skipped silently
                    scan.problems.append((full, why))
                    continue
                if not is_supported(fn):
                    continue
                ext = file_extension(fn)
                if not _utf8(full):
                    scan.problems.append((full, "path is not valid UTF-8 (the catalog stores UTF-8); rename it"))
                    continue
                try:
                    st = os.stat(full)
                except OSError as e:  # dangling symlink, symlink loop, no permission, vanished
                    if e.errno == errno.ENOENT and not os.path.islink(full):
                        scan.unavailable.append(full)  # removed while scanning: judged next tick
                    else:
                        scan.problems.append((full, f"cannot stat: {e.strerror or e}"))
                    continue
                if not os.path.isfile(full):
                    continue
                ino = (st.st_dev, st.st_ino)
                if ino in seen_inodes:
                    continue
                seen_inodes.add(ino)
                if ext == ".dcm":
                    dicoms.append(full)
                    continue
                members = [full] + (_companion_files(Path(full)) if ext == ".mrxs" else [])
                _add(scan, seen_keys, full, full, Path(fn).stem, members)
            # DICOM: one slide per SeriesInstanceUID, named as discovery names it; the folder's
            # only series is keyed by the folder (as before), others by their first file.
            for series in dicom_series(os.path.basename(dirpath), [Path(f) for f in dicoms]):
                members = [str(m) for m in series.members]
                key = dirpath if series.whole_folder else members[0]
                _add(scan, seen_keys, key, members[0], series.name, members)
    return scan


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a name (os uses surrogateescape)
        return False
    return True


def _add(scan: Scan, seen: set[str], key: str, path: str, name: str, members: list[str]) -> None:
    if key in seen:
        return
    try:
        size, mtime, sig = _stat_members(members)
    except OSError:  # a member changed between listing and stat: not judged this tick
        scan.unavailable.append(key)
        return
    seen.add(key)
    scan.candidates.append(Candidate(key, path, name, tuple(members), size, mtime, sig))


def content_fingerprint(c: Candidate) -> str:
    """Content fingerprint (size + first/last 64 KiB per file, never the mtime): a re-copied
    identical slide keeps it, a changed one gets a new one. One file: `catalog.fingerprint`;
    several (DICOM series, MIRAX): a hash over each member's relative path and fingerprint."""
    if len(c.members) == 1:
        return fingerprint(c.members[0])
    base = c.key if os.path.isdir(c.key) else os.path.dirname(c.key)
    h = hashlib.sha1()
    for m in sorted(c.members):
        h.update(f"{os.path.relpath(m, base)}\0{fingerprint(m)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


# -- state --------------------------------------------------------------------------------------


@dataclass
class Entry:
    status: str
    size: int = 0
    mtime: float = 0.0
    sig: str = ""
    since: float = 0.0  # when `sig` was first seen (start of the quiet period)
    changed: float = 0.0  # when `status` last changed (pruning of deleted entries)
    name: str = ""
    slide_id: str | None = None
    fp: str | None = None
    reason: str | None = None
    note: str | None = None  # last event emitted for this path (events only on change)


_SHORT = {
    "status": "s", "size": "z", "mtime": "m", "sig": "g", "since": "t", "changed": "c",
    "name": "n", "slide_id": "i", "fp": "f", "reason": "r", "note": "e",
}  # fmt: skip
_LONG = {v: k for k, v in _SHORT.items()}


@dataclass
class InboxState:
    entries: dict[str, Entry] = field(default_factory=dict)

    def dumps(self) -> str:
        data = {
            "v": _CURSOR_VERSION,
            "e": {
                k: {_SHORT[f]: v for f, v in asdict(e).items() if v not in (None, "", 0, 0.0)}
                for k, e in sorted(self.entries.items())
            },
        }
        text = json.dumps(data, separators=(",", ":"))
        if len(text) > _COMPRESS_ABOVE:
            return "z:" + base64.b64encode(zlib.compress(text.encode(), 9)).decode()
        return text

    @classmethod
    def loads(cls, text: str | None) -> InboxState:
        """Parse a cursor; None/empty means a fresh start. Raises ValueError on a bad cursor."""
        if not text:
            return cls()
        try:
            if text.startswith("z:"):
                text = zlib.decompress(base64.b64decode(text[2:])).decode()
            data = json.loads(text)
            if data.get("v") != _CURSOR_VERSION:
                raise ValueError(f"cursor version {data.get('v')!r}")
            entries = {k: Entry(**{_LONG[f]: v for f, v in d.items() if f in _LONG}) for k, d in data["e"].items()}
        except Exception as e:
            raise ValueError(f"unreadable inbox cursor: {type(e).__name__}: {e}") from e
        for e in entries.values():
            if not e.status:
                raise ValueError("unreadable inbox cursor: entry without status")
        return cls(entries)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            out[e.status] = out.get(e.status, 0) + 1
        return out


# -- one tick -----------------------------------------------------------------------------------

# event kind -> catalog status (events table: done | failed | skipped)
EVENT_STATUS = {
    "taken": "done",
    "broken": "failed",
    "waiting": "skipped",
    "copying": "skipped",
    "changed": "skipped",
    "unchanged": "skipped",
    "deleted": "skipped",
    "vanished": "skipped",
    "reappeared": "skipped",
    "ignored": "skipped",
}


def make_event(key: str, e: Entry, kind: str, message: str | None, **extra: Any) -> dict[str, Any]:
    """A row for the catalog `events` table (asset "inbox"); slide_id only once one is bound."""
    params: dict[str, Any] = {"event": kind, "path": key}
    if e.sig:
        params.update(size=e.size, mtime=e.mtime)
    if e.fp:
        params["fingerprint"] = e.fp
    params.update(extra)
    e.note = kind
    return {
        "slide_id": e.slide_id,
        "asset": "inbox",
        "status": EVENT_STATUS[kind],
        "error": clean_text(message) if message else None,
        "parameters": params,  # the catalog stores dicts as JSON
    }


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _open_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
    return clean_text(reason)


def _check_opens(path: str) -> None:
    with open_slide(path):
        pass


def advance(
    state: InboxState,
    scan: Scan,
    now: float,
    quiet_seconds: float,
    max_per_tick: int = 50,
    *,
    opener: Callable[[str], None] = _check_opens,
    budget_seconds: float = 20.0,
    retention_seconds: float = RETENTION_SECONDS,
) -> tuple[InboxState, list[Candidate], list[dict[str, Any]]]:
    """One tick: (new state, ready candidates with their fingerprint, events).

    Ready candidates are already `taken` in the new state (without slide id: the caller binds
    one with `bind_ids` and emits `taken_event`). At most `max_per_tick` stable candidates are
    opened per tick (and none once `budget_seconds` of opening have passed); the others stay
    pending and go first next tick. Never raises for a file's sake.
    """
    entries = {k: replace(v) for k, v in state.entries.items()}
    events: list[dict[str, Any]] = []
    present = {c.key: c for c in scan.candidates}
    problem_paths: dict[str, str] = {}
    for p, reason in scan.problems:
        problem_paths.setdefault(p, reason)

    # 1. paths that cannot be read: one "ignored" event each, until they go away or change
    for p, reason in problem_paths.items():
        if p in present:
            continue
        e = entries.get(p)
        if e is not None and e.status == DELETED:
            continue
        if e is not None and (e.status == TAKEN or e.slide_id):
            e.status, e.changed, e.reason = DELETED, now, reason
            events.append(
                make_event(
                    p,
                    e,
                    "deleted",
                    f"slide file no longer readable ({reason}); its partition and outputs are kept",
                )
            )
            continue
        if e is None or e.status != IGNORED or e.reason != reason:
            e = Entry(IGNORED, since=now, changed=now, name=os.path.basename(p), reason=reason)
            entries[p] = e
            events.append(make_event(p, e, "ignored", reason))

    # 2. paths that are gone (never judged under a folder that could not be listed)
    for k, e in list(entries.items()):
        if k in present or k in problem_paths or _under(k, scan.unavailable):
            continue
        if scan.roots and not _under(k, scan.roots):  # its inbox is no longer configured: forget it
            del entries[k]
            continue
        if e.status == TAKEN:
            e.status, e.changed = DELETED, now
            events.append(
                make_event(
                    k,
                    e,
                    "deleted",
                    f"slide file deleted from the inbox after it was taken as "
                    f"{e.slide_id}; its partition and outputs are kept",
                )
            )
        elif e.status == DELETED:
            if now - e.changed > retention_seconds:
                del entries[k]
        elif e.status == PENDING and e.slide_id is None:
            events.append(
                make_event(
                    k,
                    e,
                    "vanished",
                    "disappeared before it was complete (renamed or deleted mid-copy); nothing was launched",
                )
            )
            del entries[k]
        elif e.status == PENDING:  # a taken slide being re-copied, then removed
            e.status, e.changed = DELETED, now
            events.append(make_event(k, e, "deleted", "slide file deleted from the inbox while changing"))
        else:  # broken / ignored: forget it
            del entries[k]

    # 3. present candidates: new, changing, or stable
    stable: list[tuple[float, str, Candidate]] = []
    for key in sorted(present):
        c = present[key]
        e = entries.get(key)
        if e is None or e.status == IGNORED:
            e = Entry(PENDING, c.size, c.mtime, c.sig, since=now, changed=now, name=c.name)
            entries[key] = e
            events.append(
                make_event(
                    key,
                    e,
                    "waiting",
                    f"new file; waiting until its size and mtime stay unchanged for {quiet_seconds:g}s and it opens",
                )
            )
            continue
        if e.sig != c.sig:
            was = e.status
            e.size, e.mtime, e.sig, e.since = c.size, c.mtime, c.sig, now
            if was != PENDING:
                e.status, e.changed, e.reason = PENDING, now, None
                events.append(make_event(key, e, "changed", f"{was} file changed; re-checking it"))
            elif e.note != "copying":
                events.append(
                    make_event(key, e, "copying", "still being written (size/mtime changed since the last tick)")
                )
            continue
        if e.status == DELETED:  # back with the same size/mtime (e.g. a remounted share)
            e.status, e.changed = TAKEN, now
            events.append(make_event(key, e, "reappeared", "slide file is back unchanged; not re-run"))
            continue
        if e.status == PENDING and now - e.since >= quiet_seconds:
            stable.append((e.since, key, c))

    # 4. open the stable ones, oldest first, capped
    ready: list[Candidate] = []
    t0 = time.monotonic()
    for n, (_, key, c) in enumerate(sorted(stable, key=lambda t: (t[0], t[1]))):
        if n >= max(0, max_per_tick) or time.monotonic() - t0 > budget_seconds:
            break
        e = entries[key]
        try:
            opener(c.path)
            fp = content_fingerprint(c)
            size_after, mtime_after, sig_after = _stat_members(c.members)
        except Exception as exc:  # any failure is this file's: recorded, never raised
            if isinstance(exc, OSError) and not os.path.exists(c.path):
                continue  # vanished while opening: next tick records it
            e.status, e.changed, e.reason = BROKEN, now, _open_reason(exc)
            events.append(
                make_event(
                    key,
                    e,
                    "broken",
                    f"does not open: {e.reason}; fix or replace the file (re-checked when its size/mtime change)",
                )
            )
            continue
        if sig_after != c.sig:  # written to while we opened it: not complete after all
            e.size, e.mtime, e.sig, e.since = size_after, mtime_after, sig_after, now
            events.append(make_event(key, e, "copying", "changed while being checked; waiting"))
            continue
        if e.slide_id and e.fp == fp:
            e.status, e.changed = TAKEN, now
            events.append(make_event(key, e, "unchanged", "re-copied with identical content; not re-run"))
            continue
        e.status, e.changed, e.fp, e.reason = TAKEN, now, fp, None
        ready.append(replace(c, fingerprint=fp))
    return InboxState(entries), ready, events


def bind_ids(state: InboxState, ready: Sequence[Candidate], taken: dict[str, str]) -> dict[str, Candidate]:
    """slide_id -> candidate for the ready slides (`taken`: the catalog's id -> path; a path
    keeps its id, a colliding stem gets the path's short hash); records the ids in `state`."""
    by_path = {os.path.abspath(c.path): c for c in ready}
    out: dict[str, Candidate] = {}
    for sid, sf in assign_ids([c.slide_file for c in ready], taken=taken).items():
        c = by_path[os.path.abspath(sf.path)]
        state.entries[c.key].slide_id = sid
        out[sid] = c
    return out


def taken_event(state: InboxState, c: Candidate, run_key: str) -> dict[str, Any]:
    e = state.entries[c.key]
    return make_event(c.key, e, "taken", None, run_key=run_key, slide_path=c.path)


def run_key(slide_id: str, fp: str) -> str:
    return f"{slide_id}:{fp}"
