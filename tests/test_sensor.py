"""The `new_slides` inbox sensor and `core.inbox`: complete slides only, hostile inboxes never crash.

Ticks are simulated by evaluating the sensor with `build_sensor_context` and a fake clock (each
tick advances it by the sensor interval); the quiet-period logic is also tested on
`core.inbox.advance` directly with explicit times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    Definitions,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
)

from atlaspatch_assets.core.catalog import EVENTS, Catalog, fingerprint
from atlaspatch_assets.core.discovery import SlideFile, assign_ids, safe_key
from atlaspatch_assets.core.inbox import InboxState, advance, content_fingerprint, scan_inbox
from atlaspatch_assets.defs.jobs import SEGMENT_AND_COORDS
from atlaspatch_assets.defs.resources import SlideSourceResource, StoreResource
from atlaspatch_assets.defs.sensors import build_new_slides_sensor

SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "slides"
CMU = SLIDES / "real" / "CMU-1-Small-Region.svs"
SMALL = SLIDES / "real" / "small-16px.svs"
BOXES = SLIDES / "real" / "boxes-synthetic-4level.tiff"
DICOM_DIR = SLIDES / "real" / "dicom-boxes"
BROKEN = SLIDES / "broken"
KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
TICK = 30.0  # seconds between simulated ticks (the sensor's default interval)


class Inbox:
    """An inbox folder, an output folder, the sensor, and a fake clock; `tick()` evaluates once."""

    def __init__(self, tmp: Path, quiet: float = 0, cap: int = 50, **kw: Any):
        self.dir = tmp / "inbox"
        self.dir.mkdir(exist_ok=True)
        self.out = tmp / "out"
        self.now = 1_000_000.0
        self.quiet, self.cap = quiet, cap
        self.sensor = self.build(**kw)
        self.instance = DagsterInstance.ephemeral()
        self.resources: dict[str, Any] = {
            "store": StoreResource(output_dir=str(self.out)),
            "slide_source": SlideSourceResource(output_dir=str(self.out)),
        }
        self.cursor: str | None = None

    def build(self, **kw: Any):
        kw.setdefault("inbox_dirs", [str(self.dir)])
        return build_new_slides_sensor(quiet_seconds=self.quiet, max_per_tick=self.cap, clock=lambda: self.now, **kw)

    def tick(self, sensor=None) -> SensorResult | SkipReason:
        self.now += TICK
        ctx = build_sensor_context(instance=self.instance, cursor=self.cursor, resources=self.resources)
        result = (sensor or self.sensor)(ctx)
        if isinstance(result, SensorResult) and result.cursor:
            self.cursor = result.cursor
        return result

    def runs(self, result: SensorResult | SkipReason) -> list[tuple[str, str]]:
        if isinstance(result, SkipReason):
            return []
        return [(r.run_key, r.partition_key) for r in result.run_requests]

    def events(self) -> list[dict[str, Any]]:
        rows = Catalog(self.out / "catalog").read(EVENTS).sort_by("time").to_pylist()
        for r in rows:
            r["parameters"] = json.loads(r["parameters"])
        return rows

    def kinds(self, path: Path | str) -> list[str]:
        return [e["parameters"]["event"] for e in self.events() if e["parameters"]["path"] == str(path)]


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)  # copyfile: not the read-only mode of the shared slides
    return dst


def test_chunked_copy_becomes_one_run_after_the_quiet_period(tmp_path: Path) -> None:
    box = Inbox(tmp_path, quiet=60)
    data = CMU.read_bytes()
    dst = box.dir / CMU.name
    dst.write_bytes(data[: len(data) // 2])
    assert box.runs(box.tick()) == []  # first seen: waiting
    with open(dst, "ab") as fh:
        fh.write(data[len(data) // 2 :])
    assert box.runs(box.tick()) == []  # changed since the last tick: still copying
    assert box.runs(box.tick()) == []  # unchanged, but only for 30 s < 60 s
    result = box.tick()  # unchanged for 60 s and it opens
    sid = "CMU-1-Small-Region"
    assert box.runs(result) == [(f"{sid}:{fingerprint(dst)}", sid)]
    assert result.run_requests[0].job_name == SEGMENT_AND_COORDS
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [[sid]]
    assert Catalog(box.out / "catalog").slide_paths() == {sid: str(dst)}
    assert box.kinds(dst) == ["waiting", "copying", "taken"]
    taken = box.events()[-1]
    assert (taken["slide_id"], taken["asset"], taken["status"]) == (sid, "inbox", "done")
    assert box.runs(box.tick()) == [] and box.kinds(dst) == ["waiting", "copying", "taken"]


def test_quiet_period_and_broken_retry_on_advance(tmp_path: Path) -> None:
    f = copy(SMALL, tmp_path / "s.svs")
    opened: list[str] = []

    def opener(path: str) -> None:
        opened.append(path)

    state = InboxState()
    for now, expect in [(0, 0), (30, 0), (59, 0), (61, 1)]:
        state, ready, _ = advance(state, scan_inbox([tmp_path]), now, 60, opener=opener)
        assert len(ready) == expect, now
    assert len(opened) == 1 and ready[0].fingerprint == fingerprint(f)

    g = copy(SMALL, tmp_path / "g.svs")
    state, _, _ = advance(state, scan_inbox([tmp_path]), 100, 60, opener=opener)
    os.utime(g, (5000, 5000))  # touched: the quiet period starts again
    state, ready, _ = advance(state, scan_inbox([tmp_path]), 150, 60, opener=opener)
    state, ready2, _ = advance(state, scan_inbox([tmp_path]), 200, 60, opener=opener)
    state, ready3, _ = advance(state, scan_inbox([tmp_path]), 211, 60, opener=opener)
    assert (ready, ready2, [c.name for c in ready3]) == ([], [], ["g"])

    def bad(path: str) -> None:
        opened.append(path)
        raise OSError("boom")

    h = copy(SMALL, tmp_path / "h.svs")
    n = len(opened)
    for now in (300, 400, 500):  # broken once, then not re-opened while unchanged
        state, ready, events = advance(state, scan_inbox([tmp_path]), now, 60, opener=bad)
        assert ready == []
    assert len(opened) == n + 1 and state.entries[str(h)].status == "broken"
    assert "boom" in state.entries[str(h)].reason
    os.utime(h, (6000, 6000))
    for now in (600, 700):
        state, ready, _ = advance(state, scan_inbox([tmp_path]), now, 60, opener=opener)
    assert [c.name for c in ready] == ["h"]


def test_recopy_identical_is_not_rerun_and_changed_content_is(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    dst = copy(CMU, box.dir / CMU.name)
    box.tick()
    (first,) = box.runs(box.tick())
    assert first[0] == f"{first[1]}:{fingerprint(dst)}"

    dst.unlink()  # re-copied: same bytes, new mtime
    copy(CMU, dst)
    os.utime(dst, (2e9, 2e9))
    assert box.runs(box.tick()) == [] and box.runs(box.tick()) == []
    assert box.kinds(dst)[-2:] == ["changed", "unchanged"]
    assert fingerprint(dst) == first[0].split(":")[1]  # content-based, not mtime-based

    box.cursor = None  # a lost cursor: same run key, which Dagster never launches twice
    box.tick()
    assert box.runs(box.tick()) == [first]

    copy(BOXES, dst)  # different content under the same name: same slide id, new run key
    box.tick()
    (second,) = box.runs(box.tick())
    assert second[1] == first[1] and second[0] != first[0]
    assert second[0] == f"{first[1]}:{fingerprint(dst)}"


def test_broken_files_are_recorded_once_and_never_run(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    names = sorted(p.name for p in BROKEN.iterdir())
    for name in names:
        copy(BROKEN / name, box.dir / name)
    observed, skips = [], []
    for _ in range(3):
        result = box.tick()
        assert box.runs(result) == []
        observed += result.asset_events
        skips.append(result.skip_reason.skip_message)
    # visible in the UI: an observation of the `inbox` asset per broken file, with its reason
    broken_obs = {Path(o.metadata["path"].value).name: o for o in observed if o.metadata["status"].value == "failed"}
    assert sorted(broken_obs) == names
    assert all(o.asset_key.to_user_string() == "inbox" for o in broken_obs.values())
    assert all(o.metadata["reason"].value.startswith("does not open: ") for o in broken_obs.values())
    assert any("3 file(s) cannot be taken" in m for m in skips)  # and the tick says so
    failed = [e for e in box.events() if e["status"] == "failed"]
    assert sorted(Path(e["parameters"]["path"]).name for e in failed) == names
    assert all(e["error"].startswith("does not open: ") and e["slide_id"] is None for e in failed)
    assert "no new complete slide" in result.skip_reason.skip_message
    assert "3 broken" in result.skip_reason.skip_message

    fixed = copy(SMALL, box.dir / "unreadable.svs")  # replaced by a good file: re-checked
    box.tick()
    assert box.runs(box.tick()) == [(f"unreadable:{fingerprint(fixed)}", "unreadable")]


def test_hostile_names_symlinks_and_renames(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    d = box.dir
    hostile = ["a|b.svs", "Schnitt-é-ü-切片.svs", "x" * 246 + ".svs", "sp ace,[1].svs", "new\nline.svs"]
    for name in hostile:
        copy(SMALL, d / name)
    bad_bytes = os.path.join(os.fsencode(d), b"latin1-\xe9.svs")  # not UTF-8
    with open(bad_bytes, "wb") as fh:
        fh.write(SMALL.read_bytes())
    (d / "sub").mkdir()
    os.symlink(d, d / "sub" / "loop")  # a folder loop
    os.symlink("self.svs", d / "self.svs")  # a file loop
    os.symlink("nowhere.svs", d / "dangling.svs")
    os.symlink(d / "a|b.svs", d / "sub" / "link.svs")  # same file twice: counted once
    copy(SMALL, d / "notes.txt")  # unsupported extension: not a slide
    part = d / ".x.svs.part"  # a copy tool writing a hidden temp file
    part.write_bytes(CMU.read_bytes()[:1000])

    box.tick()
    result = box.tick()
    keys = [k for _, k in box.runs(result)]
    assert len(keys) == len(hostile) == len(set(keys))
    assert all(KEY_RE.match(k) and ".." not in k for k in keys), keys
    ignored = {Path(e["parameters"]["path"]).name for e in box.events() if e["parameters"]["event"] == "ignored"}
    assert ignored == {"loop", "self.svs", "dangling.svs", os.fsdecode(b"latin1-\xe9.svs")}
    assert not any(Path(e["parameters"]["path"]).name.endswith(".part") for e in box.events())
    paths = Catalog(box.out / "catalog").slide_paths()
    assert paths[safe_key("a|b")] == str(d / "a|b.svs")

    # renamed when complete: appears once, then taken
    with open(part, "ab") as fh:
        fh.write(CMU.read_bytes()[1000:])
    part.rename(d / "x.svs")
    assert box.runs(box.tick()) == []
    assert [k for _, k in box.runs(box.tick())] == ["x"]

    # renamed mid-copy: the old name vanishes, the new one must become complete first
    half = d / "y.svs"
    half.write_bytes(CMU.read_bytes()[:500_000])
    box.tick()
    half.rename(d / "z.svs")
    assert box.runs(box.tick()) == []
    assert box.kinds(half) == ["waiting", "vanished"]
    result = box.tick()  # stable but incomplete: does not open -> broken, nothing launched
    assert box.runs(result) == [] and box.kinds(d / "z.svs") == ["waiting", "broken"]
    copy(CMU, d / "z.svs")  # the copy finishes
    box.tick()
    assert [k for _, k in box.runs(box.tick())] == ["z"]

    # a taken slide deleted: recorded, partition kept, no crash
    (d / "x.svs").unlink()
    result = box.tick()
    assert box.runs(result) == [] and result.dynamic_partitions_requests == []
    deleted = [e for e in box.events() if e["parameters"]["event"] == "deleted"]
    assert [(e["slide_id"], e["status"]) for e in deleted] == [("x", "skipped")]
    n = len(box.events())
    assert box.runs(box.tick()) == [] and len(box.events()) == n  # recorded once, not every tick


def test_key_sanitizer_on_names_that_cannot_be_files() -> None:
    for name in ["../x", "..", "a/../../b", "...", "a|b", "x" * 250, "é", ""]:
        key = safe_key(name)
        assert KEY_RE.match(key) and ".." not in key, (name, key)
    ids = assign_ids([SlideFile("/in/a/x.svs", "x"), SlideFile("/in/b/x.svs", "x")])
    assert list(ids)[0] == "x" and list(ids)[1].startswith("x-")


def test_cursor_is_compact_and_round_trips(tmp_path: Path) -> None:
    for i in range(400):
        (tmp_path / f"slide-{i:04d}.svs").write_bytes(b"x")
    state, _, _ = advance(InboxState(), scan_inbox([tmp_path]), 0, 60, opener=lambda p: None)
    text = state.dumps()
    assert text.startswith("z:") and len(text) < 20_000  # compressed past 32 kB of JSON
    assert InboxState.loads(text) == state
    with pytest.raises(ValueError):
        InboxState.loads("z:!!")

    gone = tmp_path / "slide-0000.svs"
    state.entries[str(gone)].status = "taken"
    gone.unlink()
    state, _, events = advance(state, scan_inbox([tmp_path]), 100, 60, opener=lambda p: None)
    assert state.entries[str(gone)].status == "deleted" and events[0]["parameters"]["event"] == "deleted"
    state, _, events = advance(state, scan_inbox([tmp_path]), 8 * 86400, 60, opener=lambda p: None)
    assert str(gone) not in state.entries  # forgotten after the retention period


def test_cap_per_tick(tmp_path: Path) -> None:
    box = Inbox(tmp_path, cap=2)
    for i in range(5):
        copy(SMALL, box.dir / f"s{i}.svs")
    box.tick()
    counts = [len(box.runs(box.tick())) for _ in range(4)]
    assert counts == [2, 2, 1, 0]
    assert len({k for k in Catalog(box.out / "catalog").slide_paths()}) == 5


def test_restart_resumes_from_cursor(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    copy(CMU, box.dir / CMU.name)
    shutil.copytree(DICOM_DIR, box.dir / "dicom-boxes", copy_function=shutil.copyfile)
    box.tick()
    first = box.runs(box.tick())
    assert len(first) == 2

    # daemon restart: new definition, new instance, the stored cursor
    box.sensor, box.instance = box.build(), DagsterInstance.ephemeral()
    n_events = len(box.events())
    assert box.runs(box.tick()) == [] and box.runs(box.tick()) == []
    assert len(box.events()) == n_events

    # an unreadable cursor: starts over without raising; same run keys (deduplicated by Dagster)
    box.cursor = "{not json"
    box.tick()
    assert sorted(box.runs(box.tick())) == sorted(first)


def test_dicom_series_and_mrxs_are_one_slide(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    series = box.dir / "dicom-boxes"
    series.mkdir()
    for f in DICOM_DIR.iterdir():
        copy(f, series / f.name)
    box.tick()
    (run,) = box.runs(box.tick())
    assert run[1] == "dicom-boxes"
    assert Catalog(box.out / "catalog").slide_paths()["dicom-boxes"] == str(series / "boxes_0.dcm")

    # MIRAX: the .mrxs and its companion folder are one candidate; a .dat change changes it
    m = tmp_path / "mx"
    (m / "slide").mkdir(parents=True)
    (m / "slide.mrxs").write_bytes(b"[GENERAL]\n")
    (m / "slide" / "Index.dat").write_bytes(b"i" * 10)
    (m / "slide" / "Data0000.dat").write_bytes(b"d" * 10)
    (c,) = scan_inbox([m]).candidates
    assert (c.name, len(c.members), c.size) == ("slide", 3, 30)
    fp = content_fingerprint(c)
    with open(m / "slide" / "Data0000.dat", "ab") as fh:
        fh.write(b"more")
    (c2,) = scan_inbox([m]).candidates
    assert c2.sig != c.sig and content_fingerprint(c2) != fp


def test_unmounted_inbox_is_not_a_deletion(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    copy(SMALL, box.dir / "s.svs")
    box.tick()
    assert len(box.runs(box.tick())) == 1
    box.dir.rename(tmp_path / "away")
    result = box.tick()
    assert box.runs(result) == []
    assert [e["parameters"]["event"] for e in box.events()][-1] == "ignored"
    assert not any(e["parameters"]["event"] == "deleted" for e in box.events())
    (tmp_path / "away").rename(box.dir)
    n = len(box.events())
    assert box.runs(box.tick()) == [] and len(box.events()) == n


def test_failures_around_the_tick_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Inbox(tmp_path)
    copy(SMALL, box.dir / "s.svs")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    good_source = box.resources["slide_source"]
    box.resources["store"] = StoreResource(output_dir=str(not_a_dir))  # events cannot be written
    box.resources["slide_source"] = SlideSourceResource(output_dir=str(not_a_dir))  # nor slides
    box.tick()
    assert box.runs(box.tick()) == []  # could not register: stays pending
    box.resources["slide_source"] = good_source
    assert len(box.runs(box.tick())) == 1  # retried on the next tick

    import atlaspatch_assets.defs.sensors as sensors

    def explode(*a: Any, **k: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sensors, "scan_inbox", explode)
    cursor = box.cursor
    result = box.tick()
    assert isinstance(result, SkipReason) and "disk on fire" in result.skip_message
    assert box.cursor == cursor


def test_environment_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    copy(SMALL, a / "one.svs")
    copy(SMALL, b / "two.svs")
    monkeypatch.delenv("ATLASPATCH_INBOX", raising=False)
    assert build_new_slides_sensor().default_status == DefaultSensorStatus.STOPPED
    ctx = build_sensor_context(
        resources={"store": StoreResource(output_dir=str(tmp_path)), "slide_source": SlideSourceResource()}
    )
    assert isinstance(build_new_slides_sensor()(ctx), SkipReason)

    monkeypatch.setenv("ATLASPATCH_INBOX", f"{a}{os.pathsep}{b}")
    monkeypatch.setenv("ATLASPATCH_INBOX_QUIET_SECONDS", "not-a-number")  # warned, default 60
    monkeypatch.setenv("ATLASPATCH_INBOX_MAX_PER_TICK", "1")
    box = Inbox(tmp_path, inbox_dirs=None)
    box.sensor = build_new_slides_sensor(clock=lambda: box.now)
    assert box.sensor.default_status == DefaultSensorStatus.RUNNING
    assert box.sensor.minimum_interval_seconds == 30 and box.sensor.name == "new_slides"
    assert [len(box.runs(box.tick())) for _ in range(4)] == [0, 0, 1, 1]  # 60 s quiet, 1 per tick


def test_sensor_in_definitions_resolves_partitioned_runs(tmp_path: Path) -> None:
    from atlaspatch_assets.defs.definitions import build_definitions

    box = Inbox(tmp_path)
    copy(CMU, box.dir / "s.svs")
    store = StoreResource(output_dir=str(box.out))
    base = build_definitions(
        store=store, slide_source=SlideSourceResource(output_dir=str(box.out)), encoders=[], slide_encoders=[]
    )
    defs = Definitions(assets=base.assets, jobs=base.jobs, sensors=[box.sensor], resources=base.resources)
    Definitions.validate_loadable(defs)
    sensor = defs.resolve_sensor_def("new_slides")
    data = None
    with instance_for_test() as instance:  # a persistent instance: Dagster resolves partitions
        for _ in range(2):
            ctx = build_sensor_context(
                instance_ref=instance.get_ref(), cursor=box.cursor, definitions=defs, resources=box.resources
            )
            data = sensor.evaluate_tick(ctx)
            box.cursor = data.cursor
        (req,) = data.run_requests
        assert req.partition_key == "s" and req.tags["dagster/partition"] == "s"
        assert req.run_key == f"s:{fingerprint(box.dir / 's.svs')}"
        # what the daemon does next: add the partition, launch the run; the job finds the file
        instance.add_dynamic_partitions("slides", ["s"])
        res = defs.resolve_job_def(SEGMENT_AND_COORDS).execute_in_process(
            instance=instance,
            partition_key="s",
            tags=req.tags,
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        )
        assert res.success
    assert (box.out / "catalog").is_dir() and StoreResource(output_dir=str(box.out)).layout.store("s").path.exists()
