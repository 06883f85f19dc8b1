"""What every stage shares: its outcome, the environment it runs in, and the guard that turns any
error into a one-line per-slide failure and writes the catalog event after the result.

A stage function takes a slide (or patient), its typed parameters and a `StageEnv`, and returns
an `Outcome`: done / skipped (stored recipe unchanged) / failed (deterministic or transient, with
a one-line reason that keeps the root cause), plus metadata and what it wrote. The catalog event
is written by `guard`, after the stage's atomic save returned — never before the data exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ... import __version__
from ..catalog import Catalog
from ..errors import SlideError
from ..params import Renderer, render_refs
from ..retry import call_with_retries, is_transient
from ..store import RunLayout
from ..tables import record_outcome

log = logging.getLogger("atlaspatch")

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


class StageInterrupted(BaseException):
    """The process was asked to stop (SIGTERM/SIGINT) while a slide was in progress."""

    def __init__(self, signum: int = 0):
        super().__init__(f"interrupted by signal {signum}" if signum else "interrupted")
        self.signum = signum


@dataclass
class Outcome:
    """The result of one stage on one slide (or patient)."""

    asset: str  # tissue_mask, patch_coords, features/<enc>, slide_features/<name>, patient_features/<name>
    slide_id: str
    status: str  # done | skipped | failed
    reason: str = ""  # failed: one line, root cause first
    transient: bool = False  # failed on an I/O error that may go away (retryable)
    metadata: dict[str, Any] = field(default_factory=dict)  # plain values, for the UI and the CLI
    warnings: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # paths written (store, GeoJSON, images, …)
    seconds: float = 0.0
    recipe_hash: str = ""
    parent_hashes: dict[str, str] = field(default_factory=dict)  # upstream asset -> its recipe hash
    rows: int | None = None
    dim: int | None = None
    parameters: dict[str, Any] | None = None  # recorded in the catalog
    weights_hash: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    value: Any = field(default=None, repr=False)  # in-memory result handed to the next stage

    @property
    def ok(self) -> bool:
        return self.status != FAILED


@dataclass
class StageEnv:
    """Where a stage stores its results and how it reports them."""

    layout: RunLayout
    catalog: Catalog | None = None
    run_id: str | None = None
    render: Renderer | None = None  # parameter references → CLI flags or Dagster fields
    logger: logging.Logger = field(default=log)
    on_progress: Callable[[str, str, int, int], None] | None = None  # (slide, asset, done, total)

    def text(self, message: str) -> str:
        return render_refs(" ".join(str(message).split()), self.render)

    def reason(self, exc: BaseException, slide_id: str, asset: str) -> str:
        """One line: `<slide>: [<stage>] <root cause>` with parameter references rendered."""
        if isinstance(exc, SlideError):
            exc.slide = exc.slide or slide_id
            return self.text(exc.one_line())
        return self.text(f"{slide_id}: [{asset}] {type(exc).__name__}: {exc}")

    def progress(self, slide_id: str, asset: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(slide_id, asset, done, total)

    def record(self, out: Outcome) -> None:
        """The catalog event of an outcome (called after the result is stored), then its table rows."""
        if self.catalog is None:
            return
        self.catalog.record_event(
            slide_id=out.slide_id,
            asset=out.asset,
            status=out.status,
            error=out.reason if out.status == FAILED else ("; ".join(out.warnings) or None),
            recipe_hash=out.recipe_hash or None,
            parameters=out.parameters,
            output_path=out.written[0] if out.written else None,
            rows=out.rows,
            dim=out.dim,
            seconds=out.seconds,
            run_id=self.run_id,
            versions={"atlaspatch": __version__, **out.versions},
            weights_hash=out.weights_hash,
            run_folder=self.layout.root.name,
        )
        if out.status == DONE:  # the lakehouse tables (embeddings, patch summary) follow the event
            record_outcome(self.layout, out.asset, out.slide_id, out.written, self.run_id)


def failed(asset: str, slide_id: str, reason: str, transient: bool = False, **kw: Any) -> Outcome:
    return Outcome(asset, slide_id, FAILED, reason=reason, transient=transient, **kw)


def guard_all(
    assets: list[str], slide_id: str, env: StageEnv, work: Callable[[], list[Outcome]], record: bool = True
) -> list[Outcome]:
    """Run `work` (skip check, compute, atomic save) for these assets of one slide; transient I/O
    errors are retried in place, anything else fails every asset with its one-line reason. Then the
    catalog events — after the save, so no event ever describes data that is not stored."""
    t0 = time.perf_counter()

    def log_retry(n: int, e: BaseException, wait: float) -> None:
        env.logger.warning(f"{slide_id}: transient error, retry {n} in {wait:.1f}s: {type(e).__name__}: {e}")

    try:
        outs = call_with_retries(work, on_retry=log_retry)
    except Exception as e:  # a slide's problem, never the batch's
        reason, transient = env.reason(e, slide_id, assets[0] if len(assets) == 1 else "features"), is_transient(e)
        outs = [failed(a, slide_id, reason, transient) for a in assets]
    for out in outs:
        out.seconds = out.seconds or time.perf_counter() - t0
        if out.status == FAILED:
            env.logger.error(f"FAILED {out.reason}")
        if record:
            env.record(out)
    return outs


def guard(asset: str, slide_id: str, env: StageEnv, work: Callable[[], Outcome], record: bool = True) -> Outcome:
    """`guard_all` for a stage with one output."""
    return guard_all([asset], slide_id, env, lambda: [work()], record)[0]


def not_run(asset: str, slide_id: str, upstream: Outcome, env: StageEnv | None = None) -> Outcome:
    """A stage skipped because its upstream failed in this run: failed, with the upstream reason
    (no catalog event: nothing was attempted, the slide's stored outputs are unchanged)."""
    why = upstream.reason.removeprefix(f"{slide_id}: ")
    out = failed(asset, slide_id, f"{slide_id}: [{asset}] not run: {upstream.asset} failed: {why}", upstream.transient)
    out.metadata["upstream"] = upstream.asset
    if env is not None:
        env.logger.error(f"FAILED {out.reason}")
    return out


def upstream_missing(env: StageEnv, slide_id: str, asset: str, upstream: str, what: str) -> SlideError:
    """The error for a missing upstream result, carrying the upstream's own failure when it failed."""
    from ..store import StoreMissingError

    cause = None
    if env.catalog is not None and env.catalog.exists():
        try:
            rows = env.catalog.latest_state(slide_id).to_pylist()
        except Exception:  # an unreadable catalog must not hide the missing upstream
            rows = []
        here = (env.layout.root.name, None)  # this geometry's events (or ones without a run folder)
        cause = next(
            (r for r in rows if r["asset"] == upstream and r["status"] == FAILED and r.get("run_folder") in here), None
        )
    if cause is not None:
        why = str(cause.get("error") or "no message").removeprefix(f"{slide_id}: ")
        return StoreMissingError(f"{what}: {upstream} failed: {why}", slide=slide_id, stage=asset)
    return StoreMissingError(
        f"{what} in {env.layout.root.name}; materialize {upstream} first", slide=slide_id, stage=asset
    )
