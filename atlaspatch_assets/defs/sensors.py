"""The `new_slides` sensor: complete slides dropped into inbox folders become partitions and runs.

Each tick scans the inbox folders (`core.inbox`), and for every slide whose size and mtime stayed
unchanged for the quiet period and that opens: binds a slide id (a path keeps its id; collisions
get a short path hash), registers it in the catalog, adds the `slides` partition and requests a
run of the default job with run_key `<slide_id>:<content fingerprint>` — so a re-copied identical
file is never re-run (also after a lost cursor: Dagster skips known run keys) and a changed file
is. The cursor is the JSON inbox state; a daemon restart resumes from it. Each change of a path's
state (waiting, still copying, broken + reason, taken, deleted, ...) is one catalog event
(asset "inbox"). Nothing a file does can make a tick raise.

Configuration (builder arguments win over the environment, read at each tick):
  ATLASPATCH_INBOX                 inbox folders, os.pathsep-separated (sensor RUNNING by default when set)
  ATLASPATCH_INBOX_QUIET_SECONDS   quiet period (default 60)
  ATLASPATCH_INBOX_MAX_PER_TICK    slides opened/requested per tick (default 50)
  ATLASPATCH_SENSOR_INTERVAL_SECONDS  minimum seconds between ticks (default 30; read when the code
                                   location loads; the daemon evaluates sensors about every 5 s at most)
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence

from dagster import (
    AssetObservation,
    AssetSpec,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from .. import __version__
from ..core.catalog import EVENTS
from ..core.inbox import InboxState, advance, bind_ids, clean_text, run_key, scan_inbox, taken_event
from .jobs import SEGMENT_AND_COORDS
from .partitions import slides_partitions
from .resources import SlideSourceResource, StoreResource

INBOX_ENV = "ATLASPATCH_INBOX"
QUIET_ENV = "ATLASPATCH_INBOX_QUIET_SECONDS"
MAX_PER_TICK_ENV = "ATLASPATCH_INBOX_MAX_PER_TICK"
DEFAULT_QUIET_SECONDS = 60.0
DEFAULT_MAX_PER_TICK = 50
INTERVAL_ENV = "ATLASPATCH_SENSOR_INTERVAL_SECONDS"
DEFAULT_INTERVAL_SECONDS = 30


def interval_from_env() -> int:
    """$ATLASPATCH_SENSOR_INTERVAL_SECONDS as an integer >= 1, else the default (30)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_SECONDS
    try:
        value = int(float(raw))
        if value < 1:
            raise ValueError
    except ValueError:
        warnings.warn(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 1; using {DEFAULT_INTERVAL_SECONDS}",
            stacklevel=2,
        )
        return DEFAULT_INTERVAL_SECONDS
    return value


def inbox_dirs_from_env() -> list[str]:
    return [d for d in os.environ.get(INBOX_ENV, "").split(os.pathsep) if d.strip()]


def _env_number(name: str, default: float, log) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if value < 0:
            raise ValueError("negative")
        return value
    except ValueError:
        log.warning(f"{name}={raw!r} is not a non-negative number; using {default:g}")
        return default


INBOX_ASSET = "inbox"
inbox_asset = AssetSpec(
    INBOX_ASSET,
    group_name="intake",
    description=(
        "Files in the inbox folders ($ATLASPATCH_INBOX), as the new_slides sensor sees them: one observation "
        "per change (taken, broken with its reason, still copying, deleted …)."
    ),
)


def inbox_observation(ev: dict) -> AssetObservation:
    """A sensor event as an observation of the `inbox` asset (shown in the UI with its reason)."""
    p = ev["parameters"]
    md = {"event": p["event"], "status": ev["status"], "path": MetadataValue.path(p["path"])}
    if ev.get("error"):
        md["reason"] = ev["error"]
    if ev.get("slide_id"):
        md["slide_id"] = ev["slide_id"]
    return AssetObservation(asset_key=INBOX_ASSET, metadata=md)


def build_new_slides_sensor(
    job_name: str = SEGMENT_AND_COORDS,
    *,
    name: str = "new_slides",
    inbox_dirs: Sequence[str] | None = None,
    quiet_seconds: float | None = None,
    max_per_tick: int | None = None,
    recursive: bool = True,
    minimum_interval_seconds: int | None = None,
    default_status: DefaultSensorStatus | None = None,
    clock: Callable[[], float] = time.time,
) -> SensorDefinition:
    """The inbox sensor for `job_name`. Unset arguments come from the environment at each tick;
    the default status is RUNNING when inbox folders are configured, else STOPPED. `clock`
    (seconds) is only replaced in tests. `minimum_interval_seconds` defaults to
    $ATLASPATCH_SENSOR_INTERVAL_SECONDS (else 30), read when the sensor is built."""
    if minimum_interval_seconds is None:
        minimum_interval_seconds = interval_from_env()
    if default_status is None:
        configured = bool(inbox_dirs) or bool(inbox_dirs_from_env())
        default_status = DefaultSensorStatus.RUNNING if configured else DefaultSensorStatus.STOPPED

    @sensor(
        job_name=job_name,
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=(
            "Adds a `slides` partition and a run for every complete slide (size/mtime unchanged for "
            f"the quiet period, and it opens) found in the inbox folders (${INBOX_ENV})."
        ),
    )
    def _new_slides(
        context: SensorEvaluationContext, store: StoreResource, slide_source: SlideSourceResource
    ) -> SensorResult | SkipReason:
        log = context.log
        dirs = list(inbox_dirs) if inbox_dirs else inbox_dirs_from_env()
        if not dirs:
            return SkipReason(f"no inbox folder configured: set {INBOX_ENV} (folders separated by {os.pathsep!r})")
        quiet = quiet_seconds
        if quiet is None:
            quiet = _env_number(QUIET_ENV, DEFAULT_QUIET_SECONDS, log)
        cap = max_per_tick
        if cap is None:
            cap = int(_env_number(MAX_PER_TICK_ENV, DEFAULT_MAX_PER_TICK, log))

        try:
            state = InboxState.loads(context.cursor)
        except ValueError as e:  # start over; run keys keep already-launched slides from re-running
            log.warning(f"{e}; starting from an empty inbox state")
            state = InboxState()
        try:
            scan = scan_inbox(dirs, recursive=recursive)
            state, ready, events = advance(state, scan, clock(), quiet, cap)
        except Exception as e:  # a bug or an unexpected OS failure: keep the cursor, try next tick
            log.exception(f"inbox scan failed: {type(e).__name__}: {e}")
            return SkipReason(clean_text(f"inbox scan failed: {type(e).__name__}: {e}"))

        run_requests = _request_runs(state, ready, events, slide_source, job_name, log)
        _record(events, store, log)
        return _result(state, events, run_requests)

    return _new_slides


new_slides = build_new_slides_sensor()


def _request_runs(state, ready, events, slide_source, job_name: str, log) -> list[RunRequest]:
    """Bind ids to the ready slides, register them and request their runs (taken events added)."""
    run_requests: list[RunRequest] = []
    if not ready:
        return run_requests
    try:
        ids = bind_ids(state, ready, taken=slide_source.catalog.slide_paths())
    except Exception as e:  # catalog unreadable: these stay pending, retried next tick
        log.error(
            clean_text(
                f"cannot read the slide catalog ({type(e).__name__}: {e}); "
                f"{len(ready)} ready slide(s) wait for the next tick"
            )
        )
        for c in ready:
            state.entries[c.key].status = "pending"
            state.entries[c.key].fp = None
        ids = {}
    for slide_id, c in ids.items():
        key = run_key(slide_id, c.fingerprint or "")
        try:
            slide_source.register(slide_id, c.path)
        except Exception as e:  # e.g. vanished just now or catalog not writable: retry next tick
            log.error(clean_text(f"{slide_id}: cannot register {c.path}: {type(e).__name__}: {e}"))
            entry = state.entries[c.key]
            entry.status, entry.fp = "pending", None
            continue
        run_requests.append(
            RunRequest(
                run_key=key,
                partition_key=slide_id,
                job_name=job_name,
                tags={"atlaspatch/source": "inbox", "atlaspatch/fingerprint": c.fingerprint or ""},
            )
        )
        events.append(taken_event(state, c, key))

    return run_requests


def _record(events: list[dict], store, log) -> None:
    """Log each inbox event once and append them to the catalog (best effort)."""
    for ev in events:  # one per change of a path's state, never one per tick
        p = ev["parameters"]
        msg = clean_text(
            f"inbox {p['event']} ({ev['status']}): {p['path']}"
            + (f": {ev['error']}" if ev["error"] else f" -> {ev['slide_id']}" if ev["slide_id"] else "")
        )
        if ev["status"] == "failed":
            log.warning(msg)
        elif p["event"] == "waiting":  # can be thousands on a first scan
            log.debug(msg)
        else:
            log.info(msg)
    if events:
        try:
            store.catalog.append(EVENTS, [{**ev, "versions": {"atlaspatch": __version__}} for ev in events])
        except Exception as e:  # provenance is best effort: never lose the tick for it
            log.warning(
                clean_text(f"cannot write {len(events)} inbox event(s) to the catalog: {type(e).__name__}: {e}")
            )


def _result(state, events: list[dict], run_requests: list[RunRequest]) -> SensorResult:
    counts = state.counts()
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"
    broken = [ev for ev in events if ev["status"] == "failed"]
    if broken:  # said in the tick itself, not only in its log
        first = clean_text(f"{broken[0]['parameters']['path']}: {broken[0]['error']}")
        summary += f"; {len(broken)} file(s) cannot be taken, e.g. {first}"
    keys = [r.partition_key for r in run_requests if r.partition_key]
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[slides_partitions.build_add_request(keys)] if keys else [],
        asset_events=[inbox_observation(ev) for ev in events if ev["parameters"]["event"] != "waiting"],
        cursor=state.dumps(),
        skip_reason=None if run_requests else f"no new complete slide (inbox: {summary})",
    )
