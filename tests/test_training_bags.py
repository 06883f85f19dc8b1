"""Feature bags over a real run with mobilenet_v2 features: bags equal the stored features, per slide
and per patient (manifest), labels from a CSV, subsampling, padding collate; label CSV checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _training_run import ENC, Run, build_run

from atlaspatch_assets.core.errors import UsageError
from atlaspatch_assets.core.training.bags import FeatureBagDataset, collate_bags
from atlaspatch_assets.core.training.labels import LabelError, read_labels

CMU_ID, NDPI_ID = "CMU-1-Small-Region", "ndpi-dapi-fluorescence"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return build_run(tmp_path_factory.mktemp("bags"), features=True)


def stored(run: Run, sid: str) -> tuple[np.ndarray, np.ndarray]:
    store = run.layout.store(sid)
    return store.features(ENC)[0], store.coords()


def test_slide_bags_equal_the_stored_features(run: Run, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,label\n{CMU_ID},tumor\n{NDPI_ID},normal\n")
    ds = FeatureBagDataset(run.output, ENC, labels=labels)
    assert ds.ids == [CMU_ID, NDPI_ID] and ds.labels.classes == ["normal", "tumor"]
    for i, sid in enumerate(ds.ids):
        item = ds[i]
        feats, coords = stored(run, sid)
        assert item["features"].dtype == torch.float32 and torch.equal(item["features"], torch.from_numpy(feats))
        assert torch.equal(item["coords"], torch.from_numpy(coords.astype(np.int64)))
        assert item["label"] == {CMU_ID: 1, NDPI_ID: 0}[sid] and item["n"] == len(feats)
    batch = collate_bags([ds[0], ds[1]])
    n = [len(stored(run, s)[0]) for s in ds.ids]
    assert batch["features"].shape == (2, max(n), 1280) and batch["lengths"].tolist() == n
    assert batch["mask"].sum(1).tolist() == n and torch.equal(batch["label"], torch.tensor([1, 0]))
    short = int(np.argmin(n))
    assert not batch["features"][short, n[short] :].any() and (batch["patch_slide"][short, n[short] :] == -1).all()
    assert torch.equal(batch["features"][short, : n[short]], torch.from_numpy(stored(run, ds.ids[short])[0]))


def test_subsampling_draws_real_rows_per_epoch(run: Run) -> None:
    ds = FeatureBagDataset(run.output, ENC, slide_ids=[NDPI_ID], max_patches=10, seed=4)
    feats, coords = stored(run, NDPI_ID)
    a = ds[0]
    assert a["n"] == 10
    rows = [int(np.flatnonzero((coords == c).all(1))[0]) for c in a["coords"].numpy()]
    assert rows == sorted(set(rows)) and torch.equal(a["features"], torch.from_numpy(feats[rows]))  # pairs kept
    assert torch.equal(ds[0]["coords"], a["coords"])  # same epoch: same draw
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["coords"], a["coords"])


def test_patient_bags_from_a_manifest(run: Run, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"case_id,slide_path\np1,{run.slides[CMU_ID]}\np1,{run.slides[NDPI_ID]}\np2,{run.slides[NDPI_ID]}\n"
        f"p3,{tmp_path / 'missing.svs'}\n"
    )
    labels = tmp_path / "cases.csv"
    labels.write_text("case_id,label\np1,1\np2,0\np3,1\n")
    with pytest.raises(UsageError, match="p3: manifest: slide not found"):
        FeatureBagDataset(run.output, ENC, manifest=manifest, labels=labels)
    ds = FeatureBagDataset(run.output, ENC, manifest=manifest, labels=labels, missing="skip")
    assert ds.ids == ["p1", "p2"] and "p3" in ds.skipped
    p1 = ds[0]
    f1, c1 = stored(run, CMU_ID)
    f2, c2 = stored(run, NDPI_ID)
    assert p1["slide_ids"] == [CMU_ID, NDPI_ID] and p1["label"] == 1
    assert torch.equal(p1["features"], torch.from_numpy(np.concatenate([f1, f2])))
    assert torch.equal(p1["patch_slide"], torch.tensor([0] * len(f1) + [1] * len(f2)))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_bags)
    (batch,) = list(loader)
    assert batch["id"] == ["p1", "p2"] and batch["lengths"].tolist() == [len(f1) + len(f2), len(f2)]


def test_bad_labels_and_missing_features(run: Run, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,label\n{CMU_ID},1\nunknown-slide,0\n")
    with pytest.raises(LabelError, match="unknown-slide"):
        FeatureBagDataset(run.output, ENC, labels=labels)
    labels.write_text(f"slide_id,label\n{CMU_ID},1\n")
    with pytest.raises(UsageError, match=f"{NDPI_ID}: no label"):
        FeatureBagDataset(run.output, ENC, labels=labels)
    ds = FeatureBagDataset(run.output, ENC, labels=labels, missing="skip")
    assert ds.ids == [CMU_ID] and "no label" in ds.skipped[NDPI_ID]
    with pytest.raises(UsageError, match="has no features/uni_v1 .stored: mobilenet_v2"):
        FeatureBagDataset(run.output, "uni_v1")


def test_read_labels_types_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label\na,1\nb,0\n")
    assert read_labels(p).values == {"a": 1, "b": 0} and read_labels(p).classes is None
    p.write_text("slide,label\na,0.5\nb,2\n")
    assert read_labels(p).values == {"a": 0.5, "b": 2.0}
    p.write_text("id,grade\na,high\nb,low\nc,high\n")
    lab = read_labels(p, label_column="grade")
    assert lab.values == {"a": 0, "b": 1, "c": 0} and lab.classes == ["high", "low"]
    p.write_text("slide_id,label\na,1\na,2\n")
    with pytest.raises(LabelError, match="labelled both"):
        read_labels(p)
    p.write_text("name,label\na,1\n")
    with pytest.raises(LabelError, match="needs columns"):
        read_labels(p)


def test_abmil_training_steps(run: Run) -> None:
    """The README's loop: a tiny attention-MIL model trains on the bags (loss is finite, weights move)."""
    ds = FeatureBagDataset(run.output, ENC, max_patches=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate_bags)
    attn, head = torch.nn.Linear(1280, 1), torch.nn.Linear(1280, 2)
    opt = torch.optim.Adam([*attn.parameters(), *head.parameters()], lr=1e-3)
    before = head.weight.detach().clone()
    for b in loader:
        a = attn(b["features"]).squeeze(-1).masked_fill(~b["mask"], float("-inf")).softmax(-1)
        logits = head((a.unsqueeze(-1) * b["features"]).sum(1))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert not torch.equal(before, head.weight)
