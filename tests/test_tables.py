"""Lakehouse tables (slide / patient embeddings, patch summary): rows written by the real stages on real
slides equal what the stores hold, append-only with a documented latest-row query, readable by DuckDB
and pandas; the README's DuckDB cosine-similarity example gives numpy's answer."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

from atlaspatch_assets.cli import main
from atlaspatch_assets.core.store import RunLayout
from atlaspatch_assets.core.store.patients import read_patient
from atlaspatch_assets.core.tables import (
    PATCH_SUMMARY,
    PATIENT_EMBEDDINGS,
    SLIDE_EMBEDDINGS,
    Tables,
    record_outcome,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CMU = SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"
BOXES = SHARED / "slides" / "real" / "boxes-synthetic-4level.tiff"  # no usable MPP: given in the manifest
ENC, NAME = "mobilenet_v2", "mean_mobilenet_v2"
RUN = "20x_224px_0px_overlap"
ARGS = ["--slide-encoders", "mean", "--feature-extractors", ENC, "--patch-size", "224", "--target-mag", "20"]


@pytest.fixture(autouse=True)
def _no_dagster_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """encode-patient on two cases (CMU; the synthetic boxes slide), Zarr stores."""
    root = tmp_path_factory.mktemp("tables")
    manifest = root / "manifest.csv"
    manifest.write_text(f"case_id,slide_path,mpp\ncase-cmu,{CMU},\ncase-boxes,{BOXES},0.5\n")
    _cli("encode-patient", str(manifest), "-o", str(root / "out"), *ARGS, "--store", "zarr")
    return root / "out"


def _layout(out: Path) -> RunLayout:
    return RunLayout.from_run_dir(out / RUN)


def test_slide_embedding_rows_are_what_the_stores_hold(out: Path) -> None:
    t = Tables.of_output(out).latest(SLIDE_EMBEDDINGS)
    assert t.schema.field("vector").type == pa.list_(pa.float32())
    rows = {r["slide_id"]: r for r in t.to_pylist()}
    assert set(rows) == {"CMU-1-Small-Region", "boxes-synthetic-4level"}
    for sid, r in rows.items():
        store = _layout(out).store(sid)
        vec, attrs = store.slide_features(NAME)
        assert np.array_equal(np.asarray(r["vector"], np.float32), vec)
        assert r["encoder"] == NAME and r["slide_encoder"] == "mean" and r["patch_encoder"] == ENC
        assert r["dim"] == 1280 == len(r["vector"])
        assert r["recipe_hash"] == store.recipe_hash_of(f"slide_features/{NAME}")
        assert r["patch_weights_hash"] == store.feature_attrs(ENC)["weights_sha256"] and r["weights_hash"] is None
        assert r["run_dir"] == str(out / RUN) and r["store_path"] == str(store.path) and r["run_id"]


def test_patient_rows_and_patch_summary(out: Path) -> None:
    tables = Tables.of_output(out)
    patients = {r["case_id"]: r for r in tables.latest(PATIENT_EMBEDDINGS).to_pylist()}
    assert set(patients) == {"case-cmu", "case-boxes"}
    for case, r in patients.items():
        p = read_patient(r["path"])
        assert np.array_equal(np.asarray(r["vector"], np.float32), p.vector) and r["slide_ids"] == p.slide_ids
        assert r["aggregation"] == "mean of slide embeddings" and r["encoder"] == NAME and r["recipe_hash"]
        assert p.case_id == case
    summary = {r["slide_id"]: r for r in tables.latest(PATCH_SUMMARY).to_pylist()}
    cmu = summary["CMU-1-Small-Region"]
    store = _layout(out).store("CMU-1-Small-Region")
    mask, _ = store.mask()
    a = store.attrs()
    area = (mask > 0).mean() * a["level0_width"] * a["level0_height"] * a["mpp"] ** 2 / 1e6
    assert cmu["patches"] == len(store.coords()) > 0
    assert cmu["tissue_area_mm2"] == pytest.approx(area, rel=1e-6) and 0.3 < cmu["tissue_area_mm2"] < 1.64
    assert cmu["mean_tissue_fraction"] == pytest.approx(float(store.tissue_fraction().mean()))
    assert cmu["encoders"] == [ENC] and cmu["store_format"] == "zarr" and cmu["patch_size"] == 224
    assert summary["boxes-synthetic-4level"]["patches"] == len(_layout(out).store("boxes-synthetic-4level").coords())


def test_duckdb_cosine_similarity_example_and_pandas(out: Path) -> None:
    """The README query, verbatim in spirit: every slide's latest mean embedding against one slide."""
    glob = str(Tables.of_output(out).path(SLIDE_EMBEDDINGS) / "*.parquet")
    got = duckdb.sql(
        f"""
        with latest as (
          select * from read_parquet('{glob}')
          qualify row_number() over (partition by slide_id, encoder order by time desc) = 1
        )
        select b.slide_id, list_cosine_similarity(a.vector, b.vector) as cosine
        from latest a join latest b on a.encoder = b.encoder
        where a.slide_id = 'CMU-1-Small-Region' and a.encoder = '{NAME}'
        order by cosine desc
        """
    ).fetchall()
    lay = _layout(out)
    ref = lay.store("CMU-1-Small-Region").slide_features(NAME)[0].astype(np.float64)
    want = {}
    for sid in lay.slide_ids():
        v = lay.store(sid).slide_features(NAME)[0].astype(np.float64)
        want[sid] = float(ref @ v / np.linalg.norm(ref) / np.linalg.norm(v))
    assert [s for s, _ in got] == sorted(want, key=want.get, reverse=True)
    assert {s: c for s, c in got} == pytest.approx(want, rel=1e-5)
    assert got[0] == ("CMU-1-Small-Region", pytest.approx(1.0))
    df = pd.read_parquet(Tables.of_output(out).path(PATCH_SUMMARY))
    assert {"slide_id", "patches", "tissue_area_mm2", "mean_tissue_fraction", "encoders"} <= set(df.columns)


def test_append_only_latest_row_and_skips_add_none(out: Path, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    tables = Tables.of_output(copy)
    before = {t: sorted(p.name for p in tables.files(t)) for t in (SLIDE_EMBEDDINGS, PATCH_SUMMARY)}
    _cli("encode-slide", str(CMU), "-o", str(copy), *ARGS, "--store", "zarr")  # unchanged recipe: skipped
    assert {t: sorted(p.name for p in tables.files(t)) for t in before} == before
    n = tables.count(SLIDE_EMBEDDINGS)
    _cli("encode-slide", str(CMU), "-o", str(copy), *ARGS, "--store", "zarr", "--force")
    files = sorted(p.name for p in tables.files(SLIDE_EMBEDDINGS))
    assert set(before[SLIDE_EMBEDDINGS]) < set(files) and tables.count(SLIDE_EMBEDDINGS) == n + 1  # appended
    latest = tables.latest(SLIDE_EMBEDDINGS)
    assert latest.num_rows == 2 and tables.read(SLIDE_EMBEDDINGS).num_rows == 3
    glob = str(tables.path(SLIDE_EMBEDDINGS) / "*.parquet")
    by_duckdb = duckdb.sql(
        f"select slide_id, run_id from read_parquet('{glob}') "
        "qualify row_number() over (partition by slide_id, encoder order by time desc) = 1 order by slide_id"
    ).fetchall()
    assert by_duckdb == [(r["slide_id"], r["run_id"]) for r in latest.select(["slide_id", "run_id"]).to_pylist()]


def test_concurrent_appends_lose_no_row(tmp_path: Path) -> None:
    tables = Tables(tmp_path / "tables")

    def append(k: int) -> None:
        for i in range(10):
            tables.append(PATCH_SUMMARY, [{"slide_id": f"s{k}-{i}", "patches": i, "encoders": []}])

    threads = [threading.Thread(target=append, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert tables.count(PATCH_SUMMARY) == 80 and tables.latest(PATCH_SUMMARY).num_rows == 80
    assert not [p for p in tables.path(PATCH_SUMMARY).iterdir() if p.name.startswith(".")]


def test_a_table_that_cannot_be_written_does_not_fail_the_result(out: Path, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(out / RUN, copy / RUN)
    (copy / "tables").write_text("not a folder")  # appends fail with an OSError
    record_outcome(_layout(copy), f"slide_features/{NAME}", "CMU-1-Small-Region", [], None)  # logged, no raise
    assert (copy / "tables").is_file()


def test_status_and_catalog_asset_link_the_tables(out: Path) -> None:
    from dagster import materialize

    from atlaspatch_assets.defs.assets.catalog import catalog
    from atlaspatch_assets.defs.resources import StoreResource

    text = _cli("status", "-o", str(out), "--no-csv")
    assert f"tables {out / 'tables'}: " in text
    assert "slide_embeddings 2 rows" in text and "patient_embeddings 2 rows" in text
    res = materialize(
        [catalog], resources={"store": StoreResource(output_dir=str(out), patch_size=224, target_mag=20.0)}
    )
    md = res.asset_materializations_for_node("catalog")[0].metadata
    assert md["tables_dir"].value == str(out / "tables")
    counts = md["table_rows"].value
    assert counts[SLIDE_EMBEDDINGS] == 2 and counts[PATIENT_EMBEDDINGS] == 2 and counts[PATCH_SUMMARY] >= 2
