"""The Parquet catalog: concurrent writers, compaction under load, `atlaspatch status`, the asset.

Readers outside our code (DuckDB, pandas, bare pyarrow) are checked too: the catalog's contract
is that it is a plain Parquet dataset.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from atlaspatch_assets.cli.status import compact_command, status_command
from atlaspatch_assets.core.catalog import EVENTS, SLIDES, Catalog

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
BROKEN = SHARED / "slides" / "broken" / "not-an-image.svs"

duckdb = pytest.importorskip("duckdb")
pd = pytest.importorskip("pandas")


# -- helpers run in spawned processes (module level: importable by the children) -----------------


def _writer(root: str, writer: int, n: int, go: mp.synchronize.Event) -> None:
    cat = Catalog(root)
    go.wait(60)
    for seq in range(n):  # one append (one file) per event, as in production
        cat.record_event(
            slide_id=f"slide-{writer}-{seq % 7}",
            asset="stress",
            status="done",
            run_id=f"writer-{writer}",
            rows=seq,
            parameters={"writer": writer, "seq": seq},
        )


def _compactor(root: str, stop: mp.synchronize.Event, out: mp.Queue) -> None:
    cat = Catalog(root)
    merged = rounds = 0
    while not stop.is_set():
        r = cat.compact(EVENTS)
        merged += r.files_merged
        rounds += 1
        time.sleep(0.02)
    out.put((rounds, merged))


class _Writers:
    """`writers` spawned processes appending `per_writer` events each, released at once."""

    def __init__(self, root: Path, writers: int, per_writer: int):
        ctx = mp.get_context("spawn")
        self.go = ctx.Event()  # keep a reference until the children have started
        self.procs = [ctx.Process(target=_writer, args=(str(root), w, per_writer, self.go)) for w in range(writers)]
        for p in self.procs:
            p.start()
        self.go.set()

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def join(self) -> None:
        for p in self.procs:
            p.join(120)
            assert p.exitcode == 0


def _events_dir(root: Path) -> str:
    return str(root / EVENTS)


def _duck_count(root: Path, dedup: bool = False) -> int:
    glob = f"{root / EVENTS}/*.parquet"
    if dedup:
        q = (
            f"select count(*) from (select * from read_parquet('{glob}') "
            "qualify row_number() over (partition by event_id) = 1)"
        )
    else:
        q = f"select count(*) from read_parquet('{glob}')"
    return duckdb.sql(q).fetchall()[0][0]


# -- (a) concurrent writers ----------------------------------------------------------------------


def test_8_concurrent_writers_x_1000_events_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    t0 = time.perf_counter()
    _Writers(root, writers=8, per_writer=1000).join()
    write_s = time.perf_counter() - t0
    # a hidden in-flight/abandoned temp file must be invisible to every reader
    (root / EVENTS / ".1-2-3.parquet.tmp").write_bytes(b"not parquet")

    cat = Catalog(root)
    t1 = time.perf_counter()
    t = cat.read(EVENTS)
    read_s = time.perf_counter() - t1
    assert t.num_rows == 8000
    assert len(cat.files(EVENTS)) == 8000
    pairs = {(r["run_id"], r["rows"]) for r in t.select(["run_id", "rows"]).to_pylist()}
    assert len(pairs) == 8000
    assert len(set(t["event_id"].to_pylist())) == 8000

    # without our code: DuckDB and pandas (pandas goes through a bare pyarrow dataset)
    t2 = time.perf_counter()
    q = f"select count(*), count(distinct (run_id, rows)) from read_parquet('{root / EVENTS}/*.parquet')"
    assert duckdb.sql(q).fetchall() == [(8000, 8000)]
    duck_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    df = pd.read_parquet(_events_dir(root))
    pandas_s = time.perf_counter() - t3
    assert len(df) == 8000 and df[["run_id", "rows"]].drop_duplicates().shape[0] == 8000

    # compaction: one file, same rows; the readers agree
    t4 = time.perf_counter()
    r = cat.compact(EVENTS)
    compact_s = time.perf_counter() - t4
    assert (r.files_merged, r.rows, r.files_removed) == (8000, 8000, 8000)
    assert cat.files(EVENTS) == [r.path.name]
    assert cat.read(EVENTS).num_rows == 8000 and _duck_count(root) == 8000
    assert len(pd.read_parquet(_events_dir(root))) == 8000
    assert ds.dataset(_events_dir(root), format="parquet").count_rows() == 8000
    print(
        f"\n8x1000 single-event appends: write {write_s:.1f}s (incl. spawn), read pyarrow {read_s:.2f}s, "
        f"duckdb {duck_s:.2f}s, pandas {pandas_s:.2f}s, compact {compact_s:.2f}s"
    )


# -- (b) compaction concurrent with writers (and with another compactor) ------------------------


def test_compaction_during_writes_loses_nothing_and_readers_never_see_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    compactors = [ctx.Process(target=_compactor, args=(str(root), stop, out)) for _ in range(2)]
    for c in compactors:
        c.start()
    writers = _Writers(root, writers=4, per_writer=500)
    cat = Catalog(root)
    seen, reads = 0, 0
    while writers.alive():
        t = cat.read(EVENTS, columns=["run_id", "rows"])
        reads += 1
        assert t.num_rows >= seen  # a row once visible never disappears
        assert len(set(zip(t["run_id"].to_pylist(), t["rows"].to_pylist(), strict=True))) == t.num_rows
        seen = t.num_rows
    writers.join()
    stop.set()
    stats = [out.get(timeout=60) for _ in compactors]
    for c in compactors:
        c.join(60)
        assert c.exitcode == 0
    assert sum(m for _, m in stats) > 0, "the compactors never overlapped the writers"

    t = cat.read(EVENTS)
    assert t.num_rows == 2000
    assert len({(r["run_id"], r["rows"]) for r in t.to_pylist()}) == 2000
    cat.compact(EVENTS)
    assert len(cat.files(EVENTS)) == 1
    assert _duck_count(root) == 2000 and len(pd.read_parquet(_events_dir(root))) == 2000
    print(f"\ncompaction under load: {reads} concurrent reads, compactor (rounds, files merged) {stats}")


def test_crash_between_merged_write_and_unlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = Catalog(tmp_path / "catalog")
    for i in range(10):
        cat.record_event(slide_id=f"s{i}", asset="tissue_mask", status="done", rows=i)
    cat.append(SLIDES, [{"slide_id": "s0", "path": "/a.svs"}])
    cat.append(SLIDES, [{"slide_id": "s1", "path": "/b.svs"}])

    calls = {"n": 0}

    def crash(path: Path) -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        path.unlink()

    monkeypatch.setattr(Catalog, "_unlink", staticmethod(crash))
    with pytest.raises(KeyboardInterrupt):
        cat.compact(EVENTS)
    assert len(cat.files(EVENTS)) == 1 + 7  # merged file + 7 sources left behind
    # our reader: exact; raw DuckDB: duplicates, removed by the documented event_id query
    assert cat.read(EVENTS).num_rows == 10
    assert _duck_count(cat.root) == 17 and _duck_count(cat.root, dedup=True) == 10
    assert cat.latest_state().num_rows == 10

    calls["n"] = 3  # slides: crash right after the rename, before any unlink
    with pytest.raises(KeyboardInterrupt):
        cat.compact(SLIDES)
    assert len(cat.files(SLIDES)) == 3
    assert cat.read(SLIDES).num_rows == 2 and cat.slide_paths() == {"s0": "/a.svs", "s1": "/b.svs"}

    monkeypatch.undo()
    r = cat.compact(EVENTS)  # the next compaction removes the leftovers
    assert r.path is None and r.files_removed == 7
    assert len(cat.files(EVENTS)) == 1 and _duck_count(cat.root) == 10
    cat.compact(SLIDES)
    assert len(cat.files(SLIDES)) == 1 and cat.read(SLIDES).num_rows == 2


def test_compaction_lock_and_stale_temps(tmp_path: Path) -> None:
    from filelock import Timeout

    cat = Catalog(tmp_path / "catalog")
    cat.record_event(slide_id="a", asset="tissue_mask", status="done")
    cat.record_event(slide_id="a", asset="patch_coords", status="done")
    old = cat.root / EVENTS / ".123-1-abc.parquet.tmp"
    fresh = cat.root / EVENTS / ".124-1-abd.parquet.tmp"
    for f in (old, fresh):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with cat.lock(), pytest.raises(Timeout):
        Catalog(cat.root).compact(EVENTS, timeout=0.2)
    with cat.lock():
        assert Catalog(cat.root).maybe_compact(min_files=2) == {}  # busy: skipped, no wait
    assert Catalog(cat.root).maybe_compact(min_files=3) == {}  # below the threshold
    r = Catalog(cat.root).maybe_compact(min_files=2)[EVENTS]
    assert r.files_merged == 2 and r.stale_temps_removed == 1
    assert not old.exists() and fresh.exists()


def test_old_files_without_new_columns(tmp_path: Path) -> None:
    """Files written before event_id/host/pid existed stay readable; compaction upgrades them."""
    cat = Catalog(tmp_path / "catalog")
    d = cat.root / EVENTS
    d.mkdir(parents=True)
    pq.write_table(_old_table(), d / "1000000000000000000-1-aaaaaaaaaaaa.parquet")
    cat.record_event(slide_id="a", asset="tissue_mask", status="done")
    t = cat.read(EVENTS)
    assert t.num_rows == 2 and t["event_id"].null_count == 1
    assert [r["status"] for r in cat.latest_state().to_pylist()] == ["done"]
    cat.compact(EVENTS)
    t = cat.read(EVENTS)
    assert t.num_rows == 2 and t["event_id"].null_count == 0
    got = duckdb.sql(f"select count(distinct event_id) from read_parquet('{d}/*.parquet')").fetchall()[0][0]
    assert got == 2


def _old_table() -> pa.Table:
    from atlaspatch_assets.core.catalog import schema

    old = pa.schema([f for f in schema(EVENTS) if f.name not in ("event_id", "host", "pid")])
    row: dict[str, list] = {f.name: [None] for f in old}
    row.update(
        slide_id=["a"],
        asset=["tissue_mask"],
        status=["failed"],
        error=["boom"],
        time=[datetime(2024, 1, 1, tzinfo=timezone.utc)],
    )
    return pa.table(row, schema=old)


def test_latest_state_semantics(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog")
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    ev = [
        ("a", "tissue_mask", "failed", 0),
        ("a", "tissue_mask", "done", 2),  # a later success replaces the failure
        ("a", "patch_coords", "failed", 3),
        ("b", "patch_coords", "done", 1),
        ("b", "tissue_mask", "skipped", 5),
        ("b", "tissue_mask", "failed", 4),  # written later, but older: not the latest
    ]
    for sid, asset, status, minutes in ev:
        cat.record_event(slide_id=sid, asset=asset, status=status, time=t0 + timedelta(minutes=minutes), error=status)
    got = [(r["slide_id"], r["asset"], r["status"]) for r in cat.latest_state().to_pylist()]
    assert got == [
        ("a", "tissue_mask", "done"),
        ("a", "patch_coords", "failed"),
        ("b", "tissue_mask", "skipped"),
        ("b", "patch_coords", "done"),
    ]
    assert [r["slide_id"] for r in cat.latest_state(failed_only=True).to_pylist()] == ["a"]
    assert cat.latest_state(slide="b", failed_only=True).num_rows == 0
    assert cat.latest_state(slide=["b"]).num_rows == 2
    cat.append(SLIDES, [{"slide_id": "c", "path": "/c.svs"}])
    # the inbox sensor's events: unbound files (no slide_id) are not slides; intake alone is not done
    cat.record_event(slide_id=None, asset="inbox", status="failed", error="broken file")
    cat.record_event(slide_id="d", asset="inbox", status="done")
    assert cat.latest_state(slide="d").num_rows == 1 and None not in cat.latest_state()["slide_id"].to_pylist()
    pl = {r["sample_id"]: r for r in cat.process_list()}
    assert {k: v["status"] for k, v in pl.items()} == {"a": "failed", "b": "done", "c": "pending", "d": "pending"}
    assert pl["a"]["error"] == "patch_coords: failed" and pl["b"]["error"] == ""


def test_status_without_catalog_exits_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(status_command, ["-o", str(tmp_path)])
    assert res.exit_code == 2 and "no catalog" in res.output
    assert CliRunner().invoke(compact_command, ["-o", str(tmp_path)]).exit_code == 2


# -- (c) `status` on a catalog written by the real pipeline -------------------------------------


@pytest.fixture(scope="module")
def pipeline_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """segment-and-get-coords on CMU-1-Small-Region.svs + a broken .svs (through the real CLI)."""
    from atlaspatch_assets.cli import main

    base = tmp_path_factory.mktemp("pipeline")
    inp = base / "in"
    inp.mkdir()
    for f in (CMU, BROKEN):
        shutil.copy(f, inp / f.name)
    out = base / "out"
    env = {"DAGSTER_HOME": None}
    args = ["segment-and-get-coords", str(inp), "--patch-size", "256", "--target-mag", "20", "-o", str(out)]
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 1, res.output  # the broken slide fails alone
    return out


def _status(out: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(status_command, ["-o", str(out), *args], env={"COLUMNS": "250"})
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, res.output


def test_status_on_a_real_pipeline_catalog(pipeline_output: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(pipeline_output, out)
    code, text = _status(out)
    assert code == 1
    assert "CMU-1-Small-Region" in text and "not-an-image" in text
    assert "failed" in text and "done" in text
    cat = Catalog(out / "catalog")
    (bad,) = cat.latest_state(failed_only=True).to_pylist()
    assert bad["slide_id"] == "not-an-image" and bad["asset"] == "tissue_mask" and bad["error"]
    assert f"FAILED not-an-image tissue_mask ({bad['run_folder']}): {bad['error']}\n" in text  # unfolded, greppable
    assert "[open] cannot open slide" in text  # "[open]" is not taken for rich markup
    assert "2 slides: 1 done, 0 skipped, 1 failed" in text

    with open(out / "process_list.csv", newline="") as fh:
        assert fh.readline().startswith("sample_id,status,error,")
        fh.seek(0)
        rows = {r["sample_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"CMU-1-Small-Region", "not-an-image"}
    assert rows["CMU-1-Small-Region"]["status"] == "done" and rows["CMU-1-Small-Region"]["error"] == ""
    assert int(rows["CMU-1-Small-Region"]["num_patches"]) > 0
    assert rows["not-an-image"]["status"] == "failed"
    assert bad["error"] in rows["not-an-image"]["error"]
    assert rows["not-an-image"]["status_tissue_mask"] == "failed"
    assert rows["CMU-1-Small-Region"]["status_patch_coords"] == "done"

    code, text = _status(out, "--failed", "--no-csv")
    assert code == 1 and "not-an-image" in text and "CMU-1-Small-Region" not in text
    code, text = _status(out, "--slide", "CMU-1-Small-Region", "--csv", str(tmp_path / "pl.csv"))
    assert code == 0 and "not-an-image" not in text
    assert (tmp_path / "pl.csv").read_text().count("\n") == 3  # header + every slide, whatever is shown
    code, text = _status(out, "--slide", "nope")
    assert code == 2 and "unknown slide" in text

    # the catalog is plain Parquet: DuckDB sees the same failure
    failed = duckdb.sql(
        f"select slide_id, asset from read_parquet('{out}/catalog/events/*.parquet') where status = 'failed'"
    ).fetchall()
    assert failed == [("not-an-image", "tissue_mask")]

    res = CliRunner().invoke(compact_command, ["-o", str(out)])
    assert res.exit_code == 0 and "events:" in res.output, res.output
    assert len(cat.files(EVENTS)) == 1
    code, text2 = _status(out, "--no-csv")
    assert code == 1 and "2 slides: 1 done, 0 skipped, 1 failed" in text2


# -- (d) the `catalog` asset ----------------------------------------------------------------------


def test_catalog_asset_materializes_with_matching_counts(pipeline_output: Path, tmp_path: Path) -> None:
    from dagster import DagsterInstance, materialize

    from atlaspatch_assets.defs.assets.catalog import catalog
    from atlaspatch_assets.defs.resources import StoreResource

    out = tmp_path / "out"
    shutil.copytree(pipeline_output, out)
    cat = Catalog(out / "catalog")
    before = cat.read(EVENTS).num_rows
    expected = cat.latest_state().to_pylist()
    with DagsterInstance.ephemeral() as instance:
        result = materialize([catalog], resources={"store": StoreResource(output_dir=str(out))}, instance=instance)
    assert result.success
    (mat,) = result.asset_materializations_for_node("catalog")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["slides"] == 2 and md["slides_failed"] == 1 and md["slides_done"] == 1
    assert md["events"] == before == md["dagster/row_count"]
    for asset_name in ("tissue_mask", "patch_coords"):
        for status in ("done", "failed", "skipped"):
            n = sum(1 for r in expected if r["asset"] == asset_name and r["status"] == status)
            assert md[f"{asset_name}.{status}"] == n
    assert md["tissue_mask.failed"] == 1 and md["patch_coords.done"] == 1
    records = {r.data["asset"]: r.data for r in md["status_counts"].records}
    assert records["tissue_mask"]["failed"] == 1
    assert md["catalog_dir"] == str(cat.root)
    assert "not-an-image" in md["latest_failures"]
    assert Path(md["process_list"]).read_text().startswith("sample_id,status,error")
    assert md["files"] == {"slides": 1, "events": 1}  # compacted
    assert cat.read(EVENTS).num_rows == before
