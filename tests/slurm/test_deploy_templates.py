"""The plain-CLI job templates in resources/deploy/slurm: accepted by `sbatch --test-only` as
written (gpu partition, GRES, time), and run for real on the test cluster (CPU, small slide)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import h5py
import pytest
from conftest import CMU

from .conftest import REPO, Cluster

TEMPLATES = REPO / "resources" / "deploy" / "slurm"
SMALL = ["--cpus-per-task=1", "--mem=1G"]  # the test node is smaller than a GPU node: only sizes change


@pytest.mark.parametrize("name", ["atlaspatch_patch.sbatch", "atlaspatch_features.sbatch"])
def test_template_passes_sbatch_test_only(slurm_cluster: Cluster, name: str) -> None:
    proc = slurm_cluster.run("sbatch", "--test-only", *SMALL, str(TEMPLATES / name))
    assert proc.returncode == 0, proc.stderr
    assert "in partition gpu" in proc.stderr  # its #SBATCH lines: partition gpu with gpu:1
    assert not slurm_cluster.queued()


def _run_template(cluster: Cluster, tmp_path: Path, name: str, env: dict[str, str]) -> dict[str, str]:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copyfile(CMU, slides / "cmu.svs")
    exports = {
        "WSI_ROOT": str(slides),
        "OUTPUT_ROOT": str(tmp_path / "out"),
        "DEVICE": "cpu",
        "ATLASPATCH": str(Path(sys.executable).parent / "atlaspatch"),
        "PYTHONPATH": str(REPO),
        **env,
    }
    export = "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items())
    proc = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", export, *SMALL, str(TEMPLATES / name))
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    end = time.monotonic() + 300
    while time.monotonic() < end:
        info = next(j for j in cluster.jobs() if j["JobId"] == job)
        if info["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.5)
    log = (tmp_path / f"{name.split('.')[0].replace('_', '-')}-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    return info


def test_patch_template_runs(slurm_cluster: Cluster, tmp_path: Path) -> None:
    _run_template(slurm_cluster, tmp_path, "atlaspatch_patch.sbatch", {"SEG_METHOD": "otsu"})
    (store,) = (tmp_path / "out").glob("*/patches/cmu.h5")
    with h5py.File(store, "r") as f:
        assert f["coords"].shape[0] > 0


def test_features_template_runs(slurm_cluster: Cluster, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    env = {"ENCODERS": "mobilenet_v2", "WEIGHTS_DIR": str(weights), "FEATURE_BATCH": "16"}
    _run_template(slurm_cluster, tmp_path, "atlaspatch_features.sbatch", env)
    (store,) = (tmp_path / "out").glob("*/patches/cmu.h5")
    with h5py.File(store, "r") as f:
        assert f["features/mobilenet_v2"].shape == (f["coords"].shape[0], 1280)
