"""What the catalog says of the slides being exported: failed upstream assets, why a slide has 0 patches."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..store import RunLayout

Rows = list[dict[str, Any]]


def catalog_state(run: RunLayout, assets: set[str]) -> dict[str, Rows]:
    """Latest catalog event per (slide, asset) of this run folder (events without an output path count)."""
    from ..catalog import Catalog

    cat = Catalog(run.catalog_dir)
    if not cat.exists():
        return {}
    try:
        state = cat.latest_state().to_pylist()
    except Exception:  # an unreadable catalog must not block an export of valid stores
        return {}
    root = os.path.realpath(run.root) + os.sep
    out: dict[str, Rows] = {}
    for r in state:
        path = r.get("output_path") or ""
        if path and not (path.startswith(root) or os.path.realpath(path).startswith(root)):
            continue  # an event of another run folder (other geometry) sharing this catalog
        if r.get("asset") not in assets:
            continue
        out.setdefault(r["slide_id"], []).append(r)
    return out


def catalog_failures(rows: Iterable[Mapping[str, Any]]) -> str:
    """The failed assets' errors (latest events), one line."""
    bad = [f"{r['asset']} failed: {r.get('error') or 'no message'}" for r in rows if r.get("status") == "failed"]
    return "; ".join(bad)


def coords_warning(rows: Iterable[Mapping[str, Any]]) -> str:
    """patch_coords' warning (e.g. why a slide has 0 patches), without the trailing ': 0 patches'."""
    for r in rows:
        if r.get("asset") == "patch_coords" and r.get("status") != "failed" and r.get("error"):
            return re.sub(r":\s*0 patches$", "", str(r["error"]).strip())
    return ""
