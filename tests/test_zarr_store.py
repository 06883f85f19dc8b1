"""Zarr per-slide stores: the same datasets and attributes as HDF5 (CLI runs on a real slide, compared
through the SlideStore API and through plain h5py / plain zarr), atomic against SIGKILL while staging and
mid-commit (real processes), concurrent writers of one slide, readers of both formats, and `convert`."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from atlaspatch_assets.cli import main
from atlaspatch_assets.core.catalog import Catalog
from atlaspatch_assets.core.store import DatasetWrite, RunLayout, SlideStore
from atlaspatch_assets.core.store.convert import compare_stores
from atlaspatch_assets.core.store.h5 import H5SlideStore
from atlaspatch_assets.core.store.zarr import ZarrSlideStore

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
SID = "CMU-1-Small-Region"
ENC = "mobilenet_v2"
SLIDE_ENC = f"mean_{ENC}"
RUN = "20x_224px_0px_overlap"
ARGS = ["--feature-extractors", ENC, "--slide-encoders", "mean", "--patch-size", "224", "--target-mag", "20"]


@pytest.fixture(autouse=True)
def _no_dagster_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


@dataclass
class Runs:
    h5: Path  # output roots
    zarr: Path

    def layout(self, fmt: str) -> RunLayout:
        return RunLayout.from_run_dir(getattr(self, fmt) / RUN)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The same encode-slide run on CMU (mask, coords, mobilenet_v2 features, mean slide embedding) per format."""
    root = tmp_path_factory.mktemp("zarr-runs")
    out = Runs(root / "h5", root / "zarr")
    for fmt in ("h5", "zarr"):
        code, text = _cli("encode-slide", str(CMU), "-o", str(getattr(out, fmt)), *ARGS, "--store", fmt)
        assert code == 0, text
    return out


# -- the CLI writes the same store in both formats ---------------------------------------------------


def test_cli_store_option_writes_zarr_layout(runs: Runs) -> None:
    run = runs.zarr / RUN
    assert not (run / "patches").exists()
    store = run / "zarr" / f"{SID}.zarr"
    assert (store / "zarr.json").is_file()
    for name in (
        "coords",
        "coords_ext",
        "tissue_fraction",
        "tissue/mask",
        f"features/{ENC}",
        f"slide_features/{SLIDE_ENC}",
    ):
        meta = json.loads((store / name / "zarr.json").read_text())
        assert meta["node_type"] == "array" and meta["zarr_format"] == 3
    lay = runs.layout("zarr")
    assert lay.format == "zarr" and lay.slide_ids() == [SID] and isinstance(lay.store(SID), ZarrSlideStore)
    assert runs.layout("h5").format == "h5" and isinstance(runs.layout("h5").store(SID), H5SlideStore)


def test_same_datasets_and_attributes_through_the_store_api(runs: Runs) -> None:
    h5s, zs = runs.layout("h5").store(SID), runs.layout("zarr").store(SID)
    assert (
        set(h5s.names())
        == set(zs.names())
        == {
            "coords",
            "coords_ext",
            "tissue_fraction",
            "tissue/mask",
            "tissue/thumbnail_jpeg",
            f"features/{ENC}",
            f"slide_features/{SLIDE_ENC}",
        }
    )
    assert compare_stores(h5s, zs) == []  # every array (dtype, shape, values) and every attribute, typed
    # spot checks of the values readers rely on, identical in type
    assert zs.attrs() == h5s.attrs()
    assert isinstance(zs.attrs()["recipe"], str) and json.loads(zs.attrs()["recipe"])["stage"] == "patch_coords"
    assert zs.coords_attrs()["downsample"] == [1.0, 1.0] and zs.coords_attrs()["patch_level"] == 0
    n = zs.num_patches()
    assert n and zs.coords().dtype == np.int32 and zs.coords().shape == (n, 2) == h5s.coords().shape
    assert zs.features(ENC)[0].dtype == np.float32 and zs.features(ENC)[0].shape == (n, 1280)
    assert zs.encoders() == [ENC] and zs.slide_feature_names() == [SLIDE_ENC]
    for asset in ("tissue_mask", "patch_coords", f"features/{ENC}", f"slide_features/{SLIDE_ENC}"):
        assert zs.recipe_hash_of(asset) == h5s.recipe_hash_of(asset) is not None


def _plain(v: Any) -> Any:
    """An attribute as a plain-library reader would interpret it (JSON strings decoded)."""
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    if isinstance(v, str) and v[:1] in ("{", "["):
        return json.loads(v)
    return v


def test_same_content_through_plain_h5py_and_plain_zarr(runs: Runs) -> None:
    """No project code: h5py on the HDF5 file and `zarr.open_group` on the Zarr store agree."""
    g = zarr.open_group(str(runs.zarr / RUN / "zarr" / f"{SID}.zarr"), mode="r")
    with h5py.File(runs.h5 / RUN / "patches" / f"{SID}.h5", "r") as f:
        assert {k: _plain(v) for k, v in f.attrs.items()} == {k: _plain(v) for k, v in g.attrs.items()}
        names: list[str] = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        zarr_names = sorted(n for n, node in g.members(max_depth=None) if isinstance(node, zarr.Array))
        assert sorted(names) == zarr_names
        for n in names:
            a, z = f[n], g[n]
            assert a.dtype == z.dtype and a.shape == z.shape, n
            assert np.array_equal(a[()], z[...]), n
            assert {k: _plain(v) for k, v in a.attrs.items()} == {k: _plain(v) for k, v in z.attrs.items()}, n
    # readable metadata: JSON attributes are JSON in zarr.json, not strings
    assert isinstance(g.attrs["recipe"], dict) and isinstance(g.attrs["feature_sets"], list)
    assert isinstance(g["tissue/mask"].attrs["parameters"], dict)
    # row chunks (whole rows), compressed
    feats = g[f"features/{ENC}"]
    assert feats.chunks[1] == 1280 and feats.chunks[0] >= 1 and feats.compressors


def test_rerun_skips_by_stored_recipe_and_force_recomputes(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs.zarr, out)
    code, text = _cli("encode-slide", str(CMU), "-o", str(out), *ARGS, "--store", "zarr")
    assert code == 0, text
    latest = {r["asset"]: r["status"] for r in Catalog(out / "catalog").latest_state(SID).to_pylist()}
    assert latest == {
        "tissue_mask": "skipped",
        "patch_coords": "skipped",
        f"features/{ENC}": "skipped",
        f"slide_features/{SLIDE_ENC}": "skipped",
    }
    code, text = _cli("encode-slide", str(CMU), "-o", str(out), *ARGS, "--store", "zarr", "--force")
    assert code == 0, text
    latest = {r["asset"]: r["status"] for r in Catalog(out / "catalog").latest_state(SID).to_pylist()}
    assert set(latest.values()) == {"done"}
    assert compare_stores(runs.layout("zarr").store(SID), RunLayout.from_run_dir(out / RUN).store(SID)) == []


# -- readers of both formats -----------------------------------------------------------------------


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.mark.parametrize("layout", ["trident", "clam", "slide2vec"])
def test_exports_of_a_zarr_run_equal_those_of_the_h5_run(runs: Runs, tmp_path: Path, layout: str) -> None:
    from atlaspatch_assets.core.exports import export

    slide_enc = None if layout == "clam" else SLIDE_ENC
    for fmt in ("h5", "zarr"):
        rep = export(getattr(runs, fmt), layout, tmp_path / fmt, ENC, slide_encoder=slide_enc)
        assert [s.status for s in rep.slides] == ["done"], rep
    files = {
        fmt: sorted(p.relative_to(tmp_path / fmt) for p in (tmp_path / fmt).rglob("*") if p.is_file())
        for fmt in ("h5", "zarr")
    }
    assert files["h5"] == files["zarr"] and files["h5"]
    for rel in files["h5"]:
        a, b = tmp_path / "h5" / rel, tmp_path / "zarr" / rel
        if rel.suffix == ".h5":
            x, y = _h5_arrays(a), _h5_arrays(b)
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), rel
        elif rel.suffix == ".pt":
            import torch

            assert torch.equal(torch.load(a), torch.load(b)), rel


def test_dagster_store_resource_and_io_manager_read_zarr(runs: Runs) -> None:
    from atlaspatch_assets.defs.io_managers import load_value
    from atlaspatch_assets.defs.resources import StoreResource

    res = StoreResource(output_dir=str(runs.zarr), patch_size=224, target_mag=20.0, format="zarr")
    assert isinstance(res.layout.store(SID), ZarrSlideStore)
    feats = load_value(res.layout, ["features", ENC], SID)
    assert np.array_equal(feats, runs.layout("h5").store(SID).features(ENC)[0])
    coords = load_value(res.layout, ["patch_coords"], SID)
    assert np.array_equal(coords.coords, runs.layout("h5").store(SID).coords())
    with pytest.raises(ValueError):
        StoreResource(output_dir=str(runs.zarr), patch_size=224, format="parquet").layout  # noqa: B018


def test_status_reads_the_zarr_run(runs: Runs) -> None:
    code, text = _cli("status", "-o", str(runs.zarr), "--no-csv")
    assert code == 0, text
    assert "1 slides: 1 done" in text and "tables" in text and "slide_embeddings 1 rows" in text


# -- convert -------------------------------------------------------------------------------------------


def test_convert_h5_to_zarr_and_back_verified(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs.h5, out)
    run = out / RUN
    original = H5SlideStore(tmp_path / "original.h5", SID)
    shutil.copyfile(run / "patches" / f"{SID}.h5", original.path)

    code, text = _cli("convert", str(run), "--to", "zarr")
    assert code == 0, text
    assert "1 converted, 0 failed" in text
    assert not (run / "patches" / f"{SID}.h5").exists()  # the source went once verified
    lay = RunLayout.from_run_dir(run)
    assert lay.format == "zarr" and lay.slide_ids() == [SID]
    assert compare_stores(original, lay.store(SID)) == []
    # the converted store is what the CLI writes in zarr, down to the structured JSON in zarr.json
    native = json.loads((runs.zarr / RUN / "zarr" / f"{SID}.zarr" / "zarr.json").read_text())["attributes"]
    converted = json.loads((run / "zarr" / f"{SID}.zarr" / "zarr.json").read_text())["attributes"]
    assert converted == native

    code, text = _cli("convert", str(run), "--to", "zarr")
    assert code == 2 and "already zarr" in text

    code, text = _cli("convert", str(run), "--to", "h5", "--keep-source")
    assert code == 0, text
    assert compare_stores(original, H5SlideStore(run / "patches" / f"{SID}.h5")) == []
    assert (run / "zarr" / f"{SID}.zarr" / "zarr.json").is_file()  # kept
    assert sorted(RunLayout.from_run_dir(run).formats_on_disk()) == ["h5", "zarr"]
    assert RunLayout.from_run_dir(run).format == "h5"  # both, as many slides each: the seed's format
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name], "temporaries left behind"


def test_convert_failure_keeps_the_source_and_exits_1(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs.zarr, out)
    run = out / RUN
    chunk = next((run / "zarr" / f"{SID}.zarr" / "features" / ENC / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[:100])  # a damaged chunk: the copy cannot be read
    code, text = _cli("convert", str(run), "--to", "h5")
    assert code == 1, text
    assert "FAILED" in text and SID in text
    assert not (run / "patches" / f"{SID}.h5").exists()
    assert (run / "zarr" / f"{SID}.zarr" / "zarr.json").is_file()
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]
    code, text = _cli("convert", str(tmp_path), "--to", "h5")
    assert code == 2 and "not a run folder" in text


# -- atomicity and concurrency (real processes) -----------------------------------------------------


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _staging(store: ZarrSlideStore) -> list[Path]:
    return sorted(store.path.parent.glob(f".{store.path.name}.tmp-*"))


def _visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def _seed(path: Path) -> tuple[ZarrSlideStore, np.ndarray, np.ndarray]:
    store = ZarrSlideStore(path)
    coords = np.arange(200, dtype=np.int32).reshape(-1, 2)
    mask = (np.arange(60 * 40).reshape(60, 40) % 3 == 0).astype(np.uint8)
    store.write(
        {
            "coords": DatasetWrite(coords, {"patch_size": 256, "patch_level": 0, "name": "s1"}),
            "tissue/mask": DatasetWrite(mask, {"downsample": [16.0, 16.0], "method": "otsu"}),
        },
        {"slide_id": "s1", "num_patches": 100, "recipe_hash": "abc"},
    )
    return store, coords, mask


def test_write_keeps_earlier_datasets_and_deletes_only_what_is_named(tmp_path: Path) -> None:
    store, coords, mask = _seed(tmp_path / "s1.zarr")
    feats = np.random.default_rng(0).random((100, 8), dtype=np.float32)
    store.write({"features/enc_a": DatasetWrite(feats, {"encoder": "enc_a"})})
    store.write({"features/enc_b": DatasetWrite(np.ones((100, 4), np.float16))}, {"extra": 1})
    store.write({"features/enc_a": DatasetWrite(feats[:, :2])}, delete=["tissue/mask"])
    assert set(store.names()) == {"coords", "features/enc_a", "features/enc_b"}
    g = zarr.open_group(str(store.path), mode="r")
    assert np.array_equal(g["coords"][...], coords) and g["features/enc_b"].dtype == np.float16
    assert np.array_equal(g["features/enc_a"][...], feats[:, :2])
    assert dict(g.attrs) == {"slide_id": "s1", "num_patches": 100, "recipe_hash": "abc", "extra": 1}
    assert _visible(tmp_path) == {"s1.zarr"} and _staging(store) == []
    empty = ZarrSlideStore(tmp_path / "e.zarr")
    empty.write({"coords": DatasetWrite(np.zeros((0, 2), np.int32))})  # 0 patches
    assert empty.coords().shape == (0, 2)


_KILLED_WHILE_STAGING = r"""
import sys
import numpy as np
from atlaspatch_assets.core.store import DatasetWrite
from atlaspatch_assets.core.store.zarr import ZarrSlideStore
data = np.random.default_rng(1).random((6_000_000, 8), dtype=np.float32)  # ~190 MB, incompressible
print("ready", flush=True)
ZarrSlideStore(sys.argv[1]).write({"features/big": DatasetWrite(data)}, {"num_patches": 1})
print("finished", flush=True)
"""


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_killed_while_staging_leaves_the_store_untouched(tmp_path: Path) -> None:
    store, coords, mask = _seed(tmp_path / "s1.zarr")
    before = _tree_digest(store.path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WHILE_STAGING, str(store.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        deadline, started = time.monotonic() + 120, False
        while time.monotonic() < deadline:
            stages = _staging(store)
            if stages and _size(stages[0]) > 8 * 1024 * 1024:
                started = True
                break
            assert proc.poll() is None, f"writer exited early: {proc.stderr.read() if proc.stderr else ''}"
            time.sleep(0.005)
        assert started, "the writer never started staging its array"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _tree_digest(store.path) == before  # not one byte of the store changed
    assert set(store.names()) == {"coords", "tissue/mask"} and store.attrs()["num_patches"] == 100
    assert np.array_equal(zarr.open_group(str(store.path), mode="r")["coords"][...], coords)
    assert _visible(tmp_path) == {"s1.zarr"} and _staging(store), "the killed writer's staging stays hidden"

    store.write({"features/small": DatasetWrite(np.zeros((100, 3), np.float32))})
    assert _staging(store) == []  # the next writer removed the dead writer's staging
    assert set(store.names()) == {"coords", "tissue/mask", "features/small"}


_KILLED_MID_COMMIT = r"""
import os, signal, sys
import numpy as np
from atlaspatch_assets.core.store import DatasetWrite
from atlaspatch_assets.core.store.zarr import ZarrSlideStore
moves = [0]
real_move = ZarrSlideStore._move
def move(src, dst):  # SIGKILL this process at its third rename of the commit
    moves[0] += 1
    if moves[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real_move(src, dst)
ZarrSlideStore._move = staticmethod(move)
n = 7
ZarrSlideStore(sys.argv[1]).write(
    {"coords": DatasetWrite(np.full((n, 2), 5, np.int32), {"name": "new"}),
     "tissue_fraction": DatasetWrite(np.full(n, 0.5, np.float32))},
    {"num_patches": n},
)
print("finished", flush=True)
"""


def test_killed_mid_commit_is_finished_by_the_next_writer(tmp_path: Path) -> None:
    store, _, mask = _seed(tmp_path / "s1.zarr")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_COMMIT, str(store.path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed after coords was renamed in, before tissue_fraction and the group metadata: every
    # visible array is whole, the untouched ones unchanged.
    assert set(store.names()) == {"coords", "tissue/mask"}
    assert np.array_equal(store.coords(), np.full((7, 2), 5, np.int32))
    assert np.array_equal(store.mask()[0], mask)
    assert store.attrs()["num_patches"] == 100  # group metadata is written last
    (journaled,) = _staging(store)
    assert (journaled / "commit.json").is_file()

    store.write({"features/x": DatasetWrite(np.ones((7, 2), np.float32))})  # recovers first
    assert set(store.names()) == {"coords", "tissue/mask", "tissue_fraction", "features/x"}
    assert np.array_equal(store.tissue_fraction(), np.full(7, 0.5, np.float32))
    assert store.attrs()["num_patches"] == 7 and store.coords_attrs()["name"] == "new"
    assert _staging(store) == []


def _writer(path: str, prefix: str, n: int, barrier: Any) -> None:
    store = ZarrSlideStore(path)
    barrier.wait()
    for i in range(n):
        store.write(
            {f"features/{prefix}{i:02d}": DatasetWrite(np.full((50, 4), i, np.float32), {"writer": prefix})},
            {f"last_{prefix}": i},
            update_attrs=lambda cur, i=i: {"writes": int(cur.get("writes", 0)) + 1},
        )


def test_two_processes_writing_one_slide_both_survive(tmp_path: Path) -> None:
    store, coords, _ = _seed(tmp_path / "s1.zarr")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 12
    procs = [ctx.Process(target=_writer, args=(str(store.path), p, n, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0
    expected = {f"features/{p}{i:02d}" for p in ("a", "b") for i in range(n)}
    assert set(store.names()) == expected | {"coords", "tissue/mask"}
    g = zarr.open_group(str(store.path), mode="r")
    for name in expected:
        i = int(name[-2:])
        assert (g[name][...] == i).all() and g[name].attrs["writer"] == name.split("/")[1][0]
    a = store.attrs()
    assert a["last_a"] == n - 1 and a["last_b"] == n - 1
    assert a["writes"] == 2 * n  # read-modify-write under the lock lost no update
    assert np.array_equal(store.coords(), coords)
    assert _staging(store) == []


def test_format_registry_and_detection(tmp_path: Path) -> None:
    lay = RunLayout.create(tmp_path, 224, target_mag=20, format="zarr")
    assert lay.stores_dir == lay.root / "zarr" and lay.store_path("s") == lay.root / "zarr" / "s.zarr"
    assert lay.with_format("h5").stores_dir == lay.root / "patches"
    with pytest.raises(ValueError):
        RunLayout.create(tmp_path, 224, target_mag=20, format="n5")
    assert RunLayout.from_run_dir(lay.root).format == "h5"  # nothing on disk: the default
    lay.store("a").write({"coords": DatasetWrite(np.zeros((1, 2), np.int32))})
    (lay.stores_dir / "half.zarr").mkdir()  # a folder without group metadata is no store
    assert RunLayout.from_run_dir(lay.root).format == "zarr" and lay.slide_ids() == ["a"]
    h5 = lay.with_format("h5")
    for s in ("b", "c"):
        h5.store(s).write({"coords": DatasetWrite(np.zeros((1, 2), np.int32))})
    assert RunLayout.from_run_dir(lay.root).format == "h5"  # both: the one with more slides
    assert RunLayout.from_run_dir(lay.root, format="zarr").slide_ids() == ["a"]
    assert isinstance(lay.store("a"), SlideStore)


@pytest.mark.parametrize("cls", [H5SlideStore, ZarrSlideStore])
def test_read_rows_reads_any_rows_of_either_backend(tmp_path: Path, cls: type) -> None:
    feats = np.random.default_rng(2).random((1000, 6), dtype=np.float32)
    store = cls(tmp_path / f"s{'.h5' if cls is H5SlideStore else '.zarr'}")
    store.write({"features/a": DatasetWrite(feats, chunk_rows=64)})
    rows = [999, 3, 3, 500, 0, 64, 63]
    assert np.array_equal(store.read_rows("features/a", rows), feats[rows])
    assert store.read_rows("features/a", []).shape == (0, 6)
