"""SlideTileDataset on real slides: tiles equal the fast reader's pixels (and read_region at level 0),
level choice, determinism across worker counts and start methods, bounded open slides, corrupt tiles
and vanished slides skipped and counted, never returned."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _training_run import Run, build_run
from conftest import CMU

from atlaspatch_assets.core.fast_reader import FastPatchReader, reference_patch
from atlaspatch_assets.core.geometry import compute_geometry
from atlaspatch_assets.core.slide import open_slide
from atlaspatch_assets.core.training.tiles import SlideTileDataset, TileSlide, tile_slides_from_run

CMU_ID, NDPI_ID = "CMU-1-Small-Region", "ndpi-dapi-fluorescence"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return build_run(tmp_path_factory.mktemp("tiles"))


def reader_tile(ds: SlideTileDataset, item: dict) -> np.ndarray:
    p = ds.plans[item["slide_index"]]
    with FastPatchReader(p.slide.path, p.geometry) as r:
        return r.read_patches(np.array([[item["x"], item["y"]]]))[0]


def keys(items: list[dict]) -> list[tuple[str, int, int]]:
    return [(it["slide_id"], it["x"], it["y"]) for it in items]


@pytest.mark.parametrize("source", ["coords", "mask"])
def test_tiles_are_the_readers_pixels(run: Run, source: str) -> None:
    ds = SlideTileDataset(tile_slides_from_run(run.output, source=source), 224, num_samples=40, source=source)
    items = ds.__getitems__(list(range(40)))
    assert {it["slide_id"] for it in items} == {CMU_ID, NDPI_ID}
    for it in items:
        assert it["image"].shape == (224, 224, 3) and it["image"].dtype == np.uint8 and it["skipped"] == 0
        assert np.array_equal(it["image"], reader_tile(ds, it))
        p = ds.plans[it["slide_index"]]
        assert 0 <= it["x"] <= p.width - p.geometry.patch_size_level0
    with open_slide(CMU) as s:  # level 0: OpenSlide's read_region itself
        for it in (i for i in items if i["slide_id"] == CMU_ID):
            assert np.array_equal(
                it["image"], reference_patch(s, ds.plans[it["slide_index"]].geometry, it["x"], it["y"])
            )
    if source == "coords":  # the stored coordinates themselves (same geometry as the run)
        stored = {sid: {tuple(c) for c in run.layout.store(sid).coords()} for sid in (CMU_ID, NDPI_ID)}
        assert all((it["x"], it["y"]) in stored[it["slide_id"]] for it in items)


def test_level_choice_for_the_target(run: Run) -> None:
    slides = tile_slides_from_run(run.output)
    ds = SlideTileDataset(slides, 256, target_mag=5, num_samples=8, sampling="balanced")
    d = {r["slide_id"]: r for r in ds.describe()}
    for s in slides:
        with open_slide(s.path) as sl:
            g = compute_geometry(sl.info, 256, target_mag=5)
            need = 2.0 / sl.info.mpp  # µm/px at 5x over slide µm/px
            assert d[s.slide_id]["read_level"] == g.read_level
            assert sl.info.level_downsamples[g.read_level] <= need * 1.01
            coarser = [ds_ for ds_ in sl.info.level_downsamples if ds_ <= need * 1.01]
            assert sl.info.level_downsamples[g.read_level] == max(coarser)  # the coarsest level that suffices
    assert d[NDPI_ID]["read_level"] > 0
    item = ds[0]
    assert np.array_equal(item["image"], reader_tile(ds, item))


def test_deterministic_across_workers_and_start_methods(run: Run) -> None:
    def make() -> SlideTileDataset:
        return SlideTileDataset(tile_slides_from_run(run.output), 224, num_samples=48, seed=7, max_open_slides=1)

    ref = make().__getitems__(list(range(48)))
    assert keys(ref) == keys(make().__getitems__(list(range(48))))
    other = SlideTileDataset(tile_slides_from_run(run.output), 224, num_samples=48, seed=8)
    assert keys(other.__getitems__(list(range(48)))) != keys(ref)
    for workers, ctx in ((0, None), (2, "fork"), (2, "spawn")):
        dl = torch.utils.data.DataLoader(make(), batch_size=16, num_workers=workers, multiprocessing_context=ctx)
        got = [b for b in dl]
        flat = [(s, int(x), int(y)) for b in got for s, x, y in zip(b["slide_id"], b["x"], b["y"], strict=True)]
        assert flat == keys(ref), (workers, ctx)
        images = torch.cat([b["image"] for b in got]).numpy()
        assert np.array_equal(images, np.stack([it["image"] for it in ref]))
    ds = make()
    ds.set_epoch(1)
    assert keys(ds.__getitems__(list(range(48)))) != keys(ref)  # another epoch, other tiles


def test_open_slides_are_bounded(run: Run) -> None:
    ds = SlideTileDataset(tile_slides_from_run(run.output), 224, num_samples=64, sampling="balanced", max_open_slides=1)
    seen = set()
    for i in range(64):
        seen.add(ds[i]["slide_id"])
        assert len(ds.open_slide_ids) <= 1
    assert seen == {CMU_ID, NDPI_ID}


def _corrupt_tile_under(path: Path, xy: tuple[int, int]) -> None:
    """Overwrite the second half of the level-0 tile under (x, y) with random bytes."""
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[0]
        t = (xy[1] // p.tilelength) * -(-p.imagewidth // p.tilewidth) + xy[0] // p.tilewidth
        off, n = int(p.dataoffsets[t]), int(p.databytecounts[t])
    with open(path, "r+b") as fh:
        fh.seek(off + n // 2)
        fh.write(np.random.default_rng(0).integers(0, 256, n - n // 2, dtype=np.uint8).tobytes())


def test_corrupt_tile_mid_epoch_is_skipped_counted_and_logged(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = Path(shutil.copyfile(CMU, tmp_path / "CMU-bad.svs"))
    coords = run.layout.store(CMU_ID).coords()
    _corrupt_tile_under(bad, tuple(coords[0]))  # a corner patch: the reader's central self-check still passes
    slide = TileSlide("CMU-bad", str(bad), coords=coords, coords_size0=224)
    ds = SlideTileDataset([slide], 224, num_samples=200, seed=3)
    with caplog.at_level(logging.WARNING, logger="atlaspatch.training"):
        items = [it for b in range(0, 200, 50) for it in ds.__getitems__(list(range(b, b + 50)))]
    assert len(items) == 200
    assert ds.stats.skipped > 0 and ds.stats.read_errors["CMU-bad"] == ds.stats.skipped
    assert sum(it["skipped"] for it in items) == ds.stats.skipped
    assert "skipped tile" in caplog.text and "cannot decode tile" in caplog.text
    with open_slide(CMU) as good:  # every tile returned is the intact slide's pixels
        g = ds.plans[0].geometry
        for it in items:
            assert np.array_equal(it["image"], reference_patch(good, g, it["x"], it["y"]))
    assert (int(coords[0][0]), int(coords[0][1])) not in {(it["x"], it["y"]) for it in items}
    # through DataLoader workers the per-item counts add up the same
    dl = torch.utils.data.DataLoader(ds, batch_size=50, num_workers=2)
    assert sum(int(b["skipped"].sum()) for b in dl) == ds.stats.skipped


def test_slide_vanishing_between_epochs(run: Run, tmp_path: Path) -> None:
    copies = {sid: Path(shutil.copyfile(p, tmp_path / p.name)) for sid, p in run.slides.items()}
    slides = tile_slides_from_run(run.output)
    for s in slides:
        s.path = str(copies[s.slide_id])
    ds = SlideTileDataset(slides, 224, num_samples=64, sampling="balanced")
    first = ds.__getitems__(list(range(64)))
    assert {it["slide_id"] for it in first} == {CMU_ID, NDPI_ID}
    copies[NDPI_ID].unlink()
    ds.set_epoch(1)
    second = ds.__getitems__(list(range(64)))
    assert {it["slide_id"] for it in second} == {CMU_ID} and len(second) == 64
    assert NDPI_ID in ds.stats.unreadable_slides and ds.stats.skipped == sum(it["skipped"] for it in second) > 0
    for it in second[:8]:
        assert np.array_equal(it["image"], reader_tile(ds, it))


def test_labels_and_unusable_slides(run: Run, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,label\n{CMU_ID},0\n{NDPI_ID},1\n")
    slides = tile_slides_from_run(run.output, labels=labels)
    slides.append(TileSlide("gone", str(tmp_path / "gone.svs"), coords=np.zeros((1, 2), np.int32), label=1))
    ds = SlideTileDataset(slides, 224, num_samples=16, sampling="balanced")
    assert "gone" in ds.unusable and len(ds.plans) == 2
    batch = torch.utils.data.default_collate(ds.__getitems__(list(range(16))))
    want = torch.tensor([0 if s == CMU_ID else 1 for s in batch["slide_id"]])
    assert torch.equal(batch["label"], want)
