"""Deployment files under resources/deploy: the Kubernetes example (k8s_job_executor with a GPU on
the per-slide step, instance with pools) and the Slurm resource example load and validate."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml
from dagster import Definitions
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

from atlaspatch_assets.defs.jobs import GPU_TAG
from atlaspatch_assets.defs.slurm import SLURM_CONFIG_ENV, slurm_from_env

DEPLOY = Path(__file__).resolve().parents[1] / "resources" / "deploy"


def _load_k8s_module():
    spec = importlib.util.spec_from_file_location("atlaspatch_k8s_definitions", DEPLOY / "k8s" / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_k8s_definitions_run_every_step_as_a_job_with_a_gpu_on_the_slide_step() -> None:
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    module = _load_k8s_module()
    Definitions.validate_loadable(module.defs)
    job = module.defs.resolve_job_def("process")
    assert job.executor_def.name == "k8s_job_executor"
    assert "slide_stages" in {n.name for n in job.nodes}  # the step key per_step_k8s_config names
    cfg = module.EXECUTOR_CONFIG
    checked = process_config(k8s_job_executor.config_schema.config_type, cfg)
    assert checked.success, checked.errors
    step = UserDefinedDagsterK8sConfig.from_dict(cfg["per_step_k8s_config"]["slide_stages"])
    k8s_job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="atlaspatch:test", dagster_home="/opt/dagster/dagster_home"),
        ["dagster", "api", "execute_step"],
        "slide-stages",
        user_defined_k8s_config=step,
    )
    container = k8s_job.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert k8s_job.spec.backoff_limit == 0  # Dagster's retry policy decides


def test_k8s_instance_has_queued_runs_pools_and_a_valid_run_launcher(tmp_path: Path) -> None:
    from dagster_k8s import K8sRunLauncher

    home = tmp_path / "k8s"
    home.mkdir()
    shutil.copy(DEPLOY / "k8s" / "dagster.yaml", home / "dagster.yaml")
    config, _ = dagster_instance_config(str(home))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    limits = {t["key"]: t["limit"] for t in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert limits[GPU_TAG] >= 1  # the tag the model jobs carry
    checked = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert checked.success, checked.errors


def test_postgres_instance_has_queued_runs_and_the_pool_limit(tmp_path: Path) -> None:
    home = tmp_path / "pg"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.postgres.yaml", home / "dagster.yaml")
    config, _ = dagster_instance_config(str(home))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] == 1
    limits = {t["key"]: t["limit"] for t in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert limits[GPU_TAG] == 1  # one run holding the GPU host's model at a time


def test_slurm_resource_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    path = DEPLOY / "slurm" / "slurm.yaml"
    monkeypatch.setenv(SLURM_CONFIG_ENV, str(path))
    resource = slurm_from_env()
    assert resource is not None and resource.enabled
    p = resource.params()
    assert (p.partition, p.gres, p.from_stage) == ("gpu", "gpu:1", "features")
    assert set(yaml.safe_load(path.read_text())) == set(type(resource).model_fields)  # every field shown
