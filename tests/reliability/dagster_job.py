"""Run a slide job in process on the $DAGSTER_HOME instance, in a process of its own (the tests signal
it, run it as another user or next to a CLI run). Prints one JSON line per run and, with
--progress, `PROGRESS <slide> <asset> <done> <total>` lines from the reporter resource.

    python -m reliability.dagster_job OUTPUT --job process --encoder mobilenet_v2 [--batched] SLIDE...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from atlaspatch_assets.core.discovery import assign_ids, discover
from atlaspatch_assets.defs.definitions import build_definitions
from atlaspatch_assets.defs.instance import open_instance
from atlaspatch_assets.defs.resources import ReporterResource, SlideSourceResource, StoreResource, register_sink


class _Printer:
    def outcomes(self, slide_id: str, outcomes: list[Any]) -> None:
        print("OUTCOMES", slide_id, json.dumps([[o.asset, o.status] for o in outcomes]), flush=True)

    def progress(self, slide_id: str, asset: str, done: int, total: int) -> None:
        print("PROGRESS", slide_id, asset, done, total, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--job", default="segment_and_get_coords")
    ap.add_argument("--encoder", action="append", default=[])
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--target-mag", type=float, default=20.0)
    ap.add_argument("--batched", action="store_true", help="one run over every partition (a backfill batch)")
    ap.add_argument("--raw", action="store_true", help="register each path as given (no discovery)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    store = StoreResource(output_dir=a.output, patch_size=a.patch_size, target_mag=a.target_mag)
    source = SlideSourceResource(output_dir=a.output)
    register_sink("reliability", _Printer())
    defs = build_definitions(
        store=store,
        slide_source=source,
        encoders=a.encoder,
        slide_encoders=[],
        reporter=ReporterResource(sink="reliability" if a.progress else ""),
    )
    if a.raw:
        ids = {os.path.basename(p).rsplit(".", 1)[0]: p for p in a.slides}
    else:
        found, _ = discover(a.slides)
        ids = {k: sf.path for k, sf in assign_ids(found, taken=source.catalog.slide_paths()).items()}
    for key, path in ids.items():
        source.register(key, path)
    print("IDS", json.dumps(ids), flush=True)
    instance = open_instance()
    new = [k for k in ids if not instance.has_dynamic_partition("slides", k)]
    instance.add_dynamic_partitions("slides", new)
    job = defs.resolve_job_def(a.job)
    cfg = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    keys = list(ids)
    runs: list[dict[str, Any]] = []
    if a.batched:
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        batches: list[tuple[str | None, dict[str, str]]] = [(None, tags)]
    else:
        batches = [(k, {}) for k in keys]
    for key, tags in batches:
        res = job.execute_in_process(
            instance=instance, run_config=cfg, raise_on_error=False, partition_key=key, tags=tags
        )
        runs.append({"partition": key, "run_id": res.run_id, "success": res.success})
        print("RUN", json.dumps(runs[-1]), flush=True)
    return 0 if all(r["success"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
