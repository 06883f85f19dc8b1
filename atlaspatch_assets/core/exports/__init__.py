"""Export a run folder's per-slide stores to the layouts other projects read: slide2vec, TRIDENT, CLAM.

All coordinates are level-0 pixels, rows in the store's order; every store is read through
`RunLayout` / `SlideStore`, so the store backend does not matter here.

A slide is exported completely or not at all: everything is read and checked first, then each file is
written to a hidden temporary file beside its target and all of the slide's files are renamed into place
(payloads before their ``.meta.json`` sidecars). A slide without ``features/<encoder>`` (or
``slide_features/<slide_encoder>``), or whose features are stale, is ``failed`` with a one-line error in the
report (and in ``process_list.csv``), and gets no file. A slide with 0 patches gets its files with 0 rows
((0, D): D from its stored features, else the encoder registry; no slide embedding unless one is stored)
and is ``skipped`` with the reason. A slide whose exported files already carry the same export fingerprint
(encoder, recipes, shapes) is ``skipped`` unless ``force``.

Modules: `api` (the entry point and the layout registry), `source` (one slide read and checked),
`commit` (atomic multi-file writes, writers), `meta` (provenance, fingerprints), `h5files` (exported .h5),
`run` (the run folder), `catalog`, `patients` and `runfiles` (slide2vec's patients, process_list.csv,
config.yaml), and one module per layout: `slide2vec`, `trident`, `clam`. A new layout is a module with a
`Layout` subclass and an entry in `api.LAYOUTS`.
"""

from .api import LAYOUTS, export
from .base import ExportContext, Layout
from .commit import Plan, commit, save_npz
from .meta import EXPORT_VERSION, SOFTWARE
from .report import ExportReport, ExportUsageError, PatientExport, SlideExport, SlideExportError
from .run import is_run_dir, resolve_layout, resolve_run_dir
from .source import SlideData, load_slide, process_hint

__all__ = [
    "EXPORT_VERSION",
    "ExportContext",
    "ExportReport",
    "ExportUsageError",
    "LAYOUTS",
    "Layout",
    "PatientExport",
    "Plan",
    "SOFTWARE",
    "SlideData",
    "SlideExport",
    "SlideExportError",
    "commit",
    "export",
    "is_run_dir",
    "load_slide",
    "process_hint",
    "resolve_layout",
    "resolve_run_dir",
    "save_npz",
]
