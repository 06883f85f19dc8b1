"""Patch stores (PNG, HDF5, LMDB) written from a real run: pixels equal the fast reader's (and, at
level 0, OpenSlide's read_region), metadata intact, per-slide atomicity, append, skip, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_run import Run, build_run
from click.testing import CliRunner
from conftest import CMU

from atlaspatch_assets.cli import main
from atlaspatch_assets.core.fast_reader import FastPatchReader, reference_patch
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.stages import load_patch_coords
from atlaspatch_assets.core.training import patch_stores
from atlaspatch_assets.core.training.labels import LabelError
from atlaspatch_assets.core.training.patch_dataset import PatchStoreDataset
from atlaspatch_assets.core.training.patch_export import PatchExport, PatchStoreParams, export_patches
from atlaspatch_assets.core.training.patch_stores import PatchStoreError, decode_image, encode_image

REPO = Path(__file__).resolve().parents[1]
CMU_ID, NDPI_ID = "CMU-1-Small-Region", "ndpi-dapi-fluorescence"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return build_run(tmp_path_factory.mktemp("patch_stores"))


def reader_pixels(run: Run, sid: str, rows: np.ndarray) -> np.ndarray:
    """What the pipeline's reader gives for these coordinate rows (the reference of every store)."""
    c = load_patch_coords(run.layout, sid)
    with FastPatchReader(run.slides[sid], c.geometry) as r:
        return r.read_patches(c.coords[rows])


def by_slide(ds: PatchStoreDataset) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for i in range(len(ds)):
        item = ds[i]
        out.setdefault(item["slide_id"], []).append(item)
    return out


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("png", {}),
        ("hdf5", {}),
        ("hdf5", {"hdf5_compression": "gzip"}),
        ("lmdb", {}),
        ("lmdb", {"image_encoding": "jpeg"}),
    ],
)
def test_round_trip_pixels_and_metadata(run: Run, tmp_path: Path, kind: str, options: dict) -> None:
    dest = tmp_path / kind
    rep = export_patches(run.output, PatchStoreParams(format=kind, dest=str(dest), **options))
    assert rep.ok and {o.slide_id: o.status for o in rep.outcomes} == {CMU_ID: "done", NDPI_ID: "done"}
    ds = PatchStoreDataset(dest)
    items = by_slide(ds)
    for sid in (CMU_ID, NDPI_ID):
        store = run.layout.store(sid)
        coords, frac = store.coords(), store.tissue_fraction()
        g = load_patch_coords(run.layout, sid).geometry
        got = items[sid]
        assert len(got) == len(coords) > 0
        assert np.array_equal([[it["x"], it["y"]] for it in got], coords)
        assert np.array_equal([it["index"] for it in got], np.arange(len(coords)))
        assert np.allclose([it["tissue_fraction"] for it in got], frac)
        assert {(it["level"], it["size"], it["mpp"]) for it in got} == {(g.read_level, g.patch_size, g.target_mpp)}
        pixels = np.stack([it["image"] for it in got])
        want = reader_pixels(run, sid, np.arange(len(coords)))
        assert pixels.dtype == np.uint8 and pixels.shape == (len(coords), 224, 224, 3)
        if options.get("image_encoding") == "jpeg":  # lossy by choice: exactly the JPEG of the reader's pixels
            assert all(
                np.array_equal(p, decode_image(encode_image(w, "jpeg", 95))) for p, w in zip(pixels, want, strict=True)
            )
            assert np.abs(pixels.astype(int) - want).mean() < 2
        else:
            assert np.array_equal(pixels, want)
    # level 0, integral positions: the reader's pixels are OpenSlide's read_region
    with open_slide(run.slides[CMU_ID]) as s:
        g = load_patch_coords(run.layout, CMU_ID).geometry
        first = items[CMU_ID][0]
        if options.get("image_encoding") != "jpeg":
            assert np.array_equal(first["image"], reference_patch(s, g, first["x"], first["y"]))


def test_hdf5_layout_and_png_names(run: Run, tmp_path: Path) -> None:
    import h5py

    export_patches(run.output, PatchStoreParams(format="hdf5", dest=str(tmp_path / "h5"), sample=5))
    with h5py.File(tmp_path / "h5" / f"{CMU_ID}.h5", "r") as f:
        assert f["patches"].dtype == np.uint8 and f["patches"].shape == (5, 224, 224, 3)
        assert f["patches"].chunks == (1, 224, 224, 3)
        assert [s.decode() for s in f["slide_id"][:]] == [CMU_ID] * 5
        assert f["coords"].shape == (5, 2) and f["tissue_fraction"].shape == (5,)
        assert f.attrs["wsi_path"] == str(run.slides[CMU_ID]) and f.attrs["size"] == 224
    index = json.loads((tmp_path / "h5" / "index.json").read_text())
    assert index["kind"] == "hdf5" and set(index["slides"]) == {CMU_ID, NDPI_ID}
    r = CliRunner().invoke(main, ["export-patches", str(run.output), "--format", "png", "--dest", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "p" / CMU_ID).glob("*.png"))
    coords = run.layout.store(CMU_ID).coords()
    assert names == sorted(f"{CMU_ID}_x{x}_y{y}.png" for x, y in coords)  # the seed's naming


def test_samples_balanced_random_and_seeded(run: Run, tmp_path: Path) -> None:
    n = {sid: run.layout.store(sid).num_patches() for sid in (CMU_ID, NDPI_ID)}

    def rows(dest: str, **kw) -> dict[str, list[int]]:
        export_patches(run.output, PatchStoreParams(format="hdf5", dest=str(tmp_path / dest), **kw))
        return {k: [it["index"] for it in v] for k, v in by_slide(PatchStoreDataset(tmp_path / dest)).items()}

    a = rows("a", sample=10, seed=1)
    assert {k: len(v) for k, v in a.items()} == {CMU_ID: 10, NDPI_ID: 10}
    assert rows("b", sample=10, seed=1) == a and rows("c", sample=10, seed=2) != a
    big = rows("d", sample=60)  # more than CMU has: all of CMU, 60 of NDPI
    assert len(big[CMU_ID]) == n[CMU_ID] and len(big[NDPI_ID]) == min(60, n[NDPI_ID])
    r = rows("e", sample=20, sampling="random", seed=3)
    assert sum(len(v) for v in r.values()) == 20
    assert all(len(set(v)) == len(v) and max(v) < n[k] for k, v in r.items())


def test_append_skip_and_force(run: Run, tmp_path: Path) -> None:
    for kind in ("png", "hdf5", "lmdb"):
        dest = tmp_path / kind
        p = PatchStoreParams(format=kind, dest=str(dest), sample=4)
        first = export_patches(run.output, p, slides=[CMU_ID])
        assert [(o.slide_id, o.status) for o in first.outcomes] == [(CMU_ID, "done")]
        before = by_slide(PatchStoreDataset(dest))
        assert set(before) == {CMU_ID}
        second = export_patches(run.output, p)  # append the other slide; the unchanged one is skipped
        assert {o.slide_id: o.status for o in second.outcomes} == {CMU_ID: "skipped", NDPI_ID: "done"}
        after = by_slide(PatchStoreDataset(dest))
        assert set(after) == {CMU_ID, NDPI_ID}
        assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(before[CMU_ID], after[CMU_ID], strict=True))
        again = export_patches(run.output, PatchStoreParams(format=kind, dest=str(dest), sample=4, force=True))
        assert {o.status for o in again.outcomes} == {"done"}
        changed = export_patches(run.output, PatchStoreParams(format=kind, dest=str(dest), sample=6))
        assert {o.status for o in changed.outcomes} == {"done"}  # another sample is another fingerprint
        assert len(PatchStoreDataset(dest)) == 12
        assert not [q for q in dest.rglob("*") if ".tmp-" in q.name]  # no temporaries left


def test_labels_csv(run: Run, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,label\n{CMU_ID},tumor\n")
    rep = export_patches(run.output, PatchStoreParams(format="lmdb", dest=str(tmp_path / "l"), labels=str(labels)))
    st = {o.slide_id: o for o in rep.outcomes}
    assert st[CMU_ID].status == "done" and st[NDPI_ID].status == "skipped" and "no label" in st[NDPI_ID].warnings[0]
    items = by_slide(PatchStoreDataset(tmp_path / "l"))
    assert set(items) == {CMU_ID} and {it["label"] for it in items[CMU_ID]} == {0}  # class index of "tumor"
    labels.write_text(f"slide_id,label\n{CMU_ID},1\nnot-a-slide,0\nalso-missing,1\n")
    with pytest.raises(LabelError, match="2 slide id.*also-missing, not-a-slide"):
        export_patches(run.output, PatchStoreParams(format="png", dest=str(tmp_path / "x"), labels=str(labels)))
    assert not (tmp_path / "x").exists()  # nothing written
    r = CliRunner().invoke(main, ["export-patches", str(run.output), "--labels", str(labels), "--dest", str(tmp_path)])
    assert r.exit_code == 2 and "not-a-slide" in r.output


def test_lmdb_map_grows(run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import lmdb

    dest = tmp_path / "small"
    with caplog.at_level("INFO", logger="atlaspatch.training"):
        rep = export_patches(run.output, PatchStoreParams(format="lmdb", dest=str(dest), map_size_mb=1))
    assert rep.ok and "map full, growing" in caplog.text
    env = lmdb.open(str(dest), readonly=True)
    assert env.info()["map_size"] > 1 << 20
    env.close()
    assert len(PatchStoreDataset(dest)) == sum(run.layout.store(s).num_patches() for s in (CMU_ID, NDPI_ID))


def test_corrupt_tile_fails_the_slide_and_leaves_no_partial_slide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tifffile

    run = build_run(tmp_path, copies=True)
    coords = run.layout.store(CMU_ID).coords()
    with tifffile.TiffFile(run.slides[CMU_ID]) as tf:
        p = tf.pages[0]
        x, y = coords[-1]  # the last patch: the slide's first batches are fine
        t = (y // p.tilelength) * -(-p.imagewidth // p.tilewidth) + x // p.tilewidth
        off, n = int(p.dataoffsets[t]), int(p.databytecounts[t])
    monkeypatch.setattr(patch_stores, "LMDB_TXN_BYTES", 1)  # LMDB commits every batch: partial slides on disk
    for kind in ("png", "hdf5", "lmdb"):
        p = PatchStoreParams(format=kind, dest=str(tmp_path / kind), batch_size=8)
        assert export_patches(run.output, p).ok
        good = by_slide(PatchStoreDataset(tmp_path / kind))
        with open(run.slides[CMU_ID], "r+b") as fh:
            fh.seek(off + n // 2)
            fh.write(np.random.default_rng(0).integers(0, 256, n // 2, dtype=np.uint8).tobytes())
        rep = export_patches(run.output, PatchStoreParams(format=kind, dest=str(tmp_path / kind), batch_size=8, seed=1))
        st = {o.slide_id: o for o in rep.outcomes}
        assert st[CMU_ID].status == "failed" and "cannot decode tile" in st[CMU_ID].reason
        assert "\n" not in st[CMU_ID].reason and st[NDPI_ID].status == "skipped"  # unchanged
        now = by_slide(PatchStoreDataset(tmp_path / kind))
        if kind == "lmdb":  # its first transaction dropped the old slide; the partial one is invisible
            assert set(now) == {NDPI_ID}
        else:  # the previous complete slide stays
            assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(good[CMU_ID], now[CMU_ID], strict=True))
        assert not [q for q in (tmp_path / kind).iterdir() if ".tmp-" in q.name]
        with open(run.slides[CMU_ID], "r+b") as fh:  # repaired for the next kind
            fh.seek(off)
            with open(CMU, "rb") as src:
                src.seek(off)
                fh.write(src.read(n))
        os.utime(run.slides[CMU_ID])
    redo = export_patches(run.output, PatchStoreParams(format="lmdb", dest=str(tmp_path / "lmdb"), batch_size=8))
    assert {o.slide_id: o.status for o in redo.outcomes}[CMU_ID] == "done"  # the interrupted slide is redone
    assert set(by_slide(PatchStoreDataset(tmp_path / "lmdb"))) == {CMU_ID, NDPI_ID}


def test_full_disk_and_unwritable_destination(run: Run, tmp_path: Path) -> None:
    """A per-file size limit (RLIMIT_FSIZE) makes writes fail like a full disk, in a child process."""
    for kind in ("hdf5", "lmdb"):
        dest = tmp_path / kind
        assert export_patches(run.output, PatchStoreParams(format=kind, dest=str(dest)), slides=[NDPI_ID]).ok
        before = by_slide(PatchStoreDataset(dest))
        code = textwrap.dedent(
            f"""
            import resource, signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))
            from atlaspatch_assets.core.training.patch_export import PatchStoreParams, export_patches
            p = PatchStoreParams(format={kind!r}, dest={str(dest)!r})
            rep = export_patches({str(run.output)!r}, p, slides=[{CMU_ID!r}])
            for o in rep.outcomes:
                print(o.slide_id, o.status, o.reason)
            """
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
        assert lines[CMU_ID].startswith("failed") and f"cannot write the {kind} patch store" in lines[CMU_ID]
        after = by_slide(PatchStoreDataset(dest))  # what was stored before is intact and readable
        assert set(after) == {NDPI_ID}
        assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(before[NDPI_ID], after[NDPI_ID], strict=True))
        assert not [q for q in dest.iterdir() if ".tmp-" in q.name]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PatchStoreError, match="cannot write the png patch store"):
        export_patches(run.output, PatchStoreParams(format="png", dest=str(blocker / "store")))
    r = CliRunner().invoke(main, ["export-patches", str(run.output), "--dest", str(blocker / "store")])
    assert r.exit_code == 2 and "choose another --dest" in r.output


def test_dataloader_workers_read_every_store(run: Run, tmp_path: Path) -> None:
    dest = tmp_path / "lmdb"
    export_patches(run.output, PatchStoreParams(format="lmdb", dest=str(dest), sample=8))
    ds = PatchStoreDataset(dest)
    seen = []
    for ctx in ("fork", "spawn"):
        dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=ctx)
        batches = list(dl)
        assert sum(len(b["image"]) for b in batches) == len(ds) == 16
        seen.append(torch.cat([b["image"] for b in batches]))
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0][0], torch.from_numpy(ds[0]["image"]))


def test_dagster_assets_report_each_slide(run: Run, tmp_path: Path) -> None:
    from dagster import AssetKey, DagsterInstance

    from atlaspatch_assets.defs.definitions import build_definitions
    from atlaspatch_assets.defs.resources import StoreResource

    defs = build_definitions(
        store=StoreResource(output_dir=str(run.output), patch_size=224, target_mag=20), encoders=[], slide_encoders=[]
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", [CMU_ID, NDPI_ID, "no-such-slide"])
    key = AssetKey(["patch_store", "hdf5"])
    assert defs.resolve_asset_graph().get(key).parent_keys == {AssetKey("patch_coords")}
    job = defs.resolve_implicit_global_asset_job_def()
    cfg = {
        "ops": {"patch_store_hdf5": {"config": {"dest": str(tmp_path / "d"), "sample": 3}}},
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }
    tags = {"dagster/asset_partition_range_start": CMU_ID, "dagster/asset_partition_range_end": "no-such-slide"}
    res = job.execute_in_process(
        instance=instance, asset_selection=[key], run_config=cfg, raise_on_error=False, tags=tags
    )
    assert not res.success  # the missing slide fails, after the good ones are stored
    mats = instance.fetch_materializations(key, limit=10).records
    assert {r.asset_materialization.partition for r in mats} == {CMU_ID, NDPI_ID}
    fail = next(e for e in res.all_events if e.is_step_failure)
    assert (
        "no-such-slide" in fail.step_failure_data.error.message and CMU_ID not in fail.step_failure_data.error.message
    )
    assert len(PatchStoreDataset(tmp_path / "d")) == 6


def test_patch_export_checks_before_writing(run: Run, tmp_path: Path) -> None:
    from atlaspatch_assets.core.errors import UsageError

    with pytest.raises(UsageError, match="unknown slide id nope"):
        PatchExport(run.layout, PatchStoreParams(dest=str(tmp_path / "u"))).run(["nope"])
    with pytest.raises(UsageError, match=r"patch_store\.sample must be > 0"):
        PatchExport(run.layout, PatchStoreParams(dest=str(tmp_path / "u"), sample=0))
