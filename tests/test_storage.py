"""SlideStore: atomic updates that keep earlier datasets, survive a killed writer, and serialize
concurrent writers of one slide (real processes, no monkeypatching of the store)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from atlaspatch_assets.core.store import DatasetWrite
from atlaspatch_assets.core.store.h5 import H5SlideStore as SlideStore


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def _hidden_temps(store: SlideStore) -> list[Path]:
    return [p for p in store.path.parent.iterdir() if p.name.startswith(f".{store.path.name}") and p != store.lock_path]


def _seed(path: Path) -> tuple[SlideStore, np.ndarray, np.ndarray]:
    store = SlideStore(path)
    coords = np.arange(200, dtype=np.int32).reshape(-1, 2)
    mask = (np.arange(60 * 40).reshape(60, 40) % 3 == 0).astype(np.uint8)
    store.write(
        {
            "coords": DatasetWrite(coords, {"patch_size": 256, "patch_level": 0, "name": "s1"}),
            "tissue/mask": DatasetWrite(mask, {"downsample": [16.0, 16.0], "method": "otsu"}, compression="gzip"),
        },
        {"slide_id": "s1", "num_patches": 100, "recipe_hash": "abc"},
    )
    return store, coords, mask


def test_write_keeps_earlier_datasets(tmp_path: Path) -> None:
    store, coords, mask = _seed(tmp_path / "s1.h5")
    feats = np.random.default_rng(0).random((100, 8), dtype=np.float32)
    store.write({"features/enc_a": DatasetWrite(feats, {"encoder": "enc_a", "precision": "float32"})})
    feats_b = np.ones((100, 4), np.float16)
    store.write({"features/enc_b": DatasetWrite(feats_b, {"encoder": "enc_b"})}, {"extra": 1})

    with h5py.File(store.path, "r") as f:
        np.testing.assert_array_equal(f["coords"][()], coords)
        assert f["coords"].dtype == np.int32
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["name"] in ("s1", b"s1")
        np.testing.assert_array_equal(f["tissue/mask"][()], mask)
        np.testing.assert_allclose(f["tissue/mask"].attrs["downsample"], [16.0, 16.0])
        np.testing.assert_array_equal(f["features/enc_a"][()], feats)
        assert f["features/enc_a"].dtype == np.float32
        np.testing.assert_array_equal(f["features/enc_b"][()], feats_b)
        assert f["features/enc_b"].dtype == np.float16
        assert f.attrs["num_patches"] == 100 and f.attrs["extra"] == 1
        assert f.attrs["slide_id"] in ("s1", b"s1")

    # Replacing one dataset of a group keeps its sibling; deleting removes only what is named.
    store.write({"features/enc_a": DatasetWrite(feats[:, :2])}, delete=["tissue/mask"])
    names = set(store.names())
    assert names == {"coords", "features/enc_a", "features/enc_b"}
    np.testing.assert_array_equal(store.read("features/enc_a")[0], feats[:, :2])
    np.testing.assert_array_equal(store.read("features/enc_b")[0], feats_b)
    assert _visible(tmp_path) == {"s1.h5"}
    assert _hidden_temps(store) == []


_KILLED_WRITER = r"""
import sys
import numpy as np
from atlaspatch_assets.core.store import DatasetWrite
from atlaspatch_assets.core.store.h5 import H5SlideStore as SlideStore
data = np.random.default_rng(1).random((6_000_000, 8), dtype=np.float32)  # ~190 MB, incompressible
print("ready", flush=True)
SlideStore(sys.argv[1]).write({"features/big": DatasetWrite(data, compression="gzip", chunk_rows=4096)})
print("finished", flush=True)
"""


def test_killed_writer_leaves_store_intact(tmp_path: Path) -> None:
    store, coords, mask = _seed(tmp_path / "s1.h5")
    before = _sha(store.path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(store.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        # Wait until the writer has started filling its temporary file, then kill it mid-write.
        deadline = time.monotonic() + 60
        temp: Path | None = None
        while time.monotonic() < deadline:
            temps = _hidden_temps(store)
            if temps and temps[0].exists() and temps[0].stat().st_size > 8 * 1024 * 1024:
                temp = temps[0]
                break
            assert proc.poll() is None, f"writer exited early: {proc.stderr.read() if proc.stderr else ''}"
            time.sleep(0.005)
        assert temp is not None, "the writer never started writing its temporary file"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in (proc.stdout.read() if proc.stdout else "")

    # The stored file is untouched and readable; nothing half-written became visible.
    assert _sha(store.path) == before
    with h5py.File(store.path, "r") as f:
        assert "features" not in f
        np.testing.assert_array_equal(f["coords"][()], coords)
        np.testing.assert_array_equal(f["tissue/mask"][()], mask)
    assert _visible(tmp_path) == {"s1.h5"}
    assert _hidden_temps(store), "the killed writer's temp file should still be there (hidden)"

    # The next write cleans the leftover temp file (the lock of the dead process is free).
    t0 = time.monotonic()
    store.write({"features/small": DatasetWrite(np.zeros((100, 3), np.float32))})
    assert time.monotonic() - t0 < 30
    assert _hidden_temps(store) == []
    assert _visible(tmp_path) == {"s1.h5"}
    assert set(store.names()) == {"coords", "tissue/mask", "features/small"}


def _writer(path: str, prefix: str, n: int, barrier: Any) -> None:
    store = SlideStore(path)
    barrier.wait()
    for i in range(n):
        store.write(
            {f"features/{prefix}{i:02d}": DatasetWrite(np.full((50, 4), i, np.float32), {"writer": prefix})},
            {f"last_{prefix}": i},
        )


def test_concurrent_writers_both_survive(tmp_path: Path) -> None:
    store, coords, _ = _seed(tmp_path / "s1.h5")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 20
    procs = [ctx.Process(target=_writer, args=(str(store.path), p, n, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0

    names = set(store.names())
    expected = {f"features/{p}{i:02d}" for p in ("a", "b") for i in range(n)}
    assert expected <= names, f"lost writes: {sorted(expected - names)}"
    assert names == expected | {"coords", "tissue/mask"}
    with h5py.File(store.path, "r") as f:
        for p in ("a", "b"):
            for i in range(n):
                ds = f[f"features/{p}{i:02d}"]
                assert (ds[()] == i).all()
                assert ds.attrs["writer"] in (p, p.encode())
        assert f.attrs["last_a"] == n - 1 and f.attrs["last_b"] == n - 1
        np.testing.assert_array_equal(f["coords"][()], coords)
    assert _visible(tmp_path) == {"s1.h5"}
    assert _hidden_temps(store) == []
