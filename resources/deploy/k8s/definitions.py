"""Kubernetes deployment: the atlaspatch code location with dagster-k8s's `k8s_job_executor`.

Point the code location at this file (`dagster api grpc -f resources/deploy/k8s/definitions.py`,
or `python_file:` in the Helm chart's `dagster-user-deployments`); it needs the `k8s` extra
(`pip install 'atlaspatch-assets[k8s]'`). The executor's config is `executor.yaml` beside this
file: each step runs in its own pod, the per-slide step with a GPU. The instance (Postgres,
queued runs, pools, K8sRunLauncher) is `dagster.yaml` beside it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster import Definitions
from dagster_k8s import k8s_job_executor

from atlaspatch_assets.defs.definitions import build_definitions

EXECUTOR_CONFIG = yaml.safe_load((Path(__file__).with_name("executor.yaml")).read_text(encoding="utf-8"))


def k8s_definitions(**kw) -> Definitions:
    """The standard definitions (`build_definitions(**kw)`) with every step as a Kubernetes Job."""
    base = build_definitions(**kw)
    return Definitions(
        assets=base.assets,
        jobs=base.jobs,
        sensors=base.sensors,
        resources=base.resources,
        executor=k8s_job_executor.configured(EXECUTOR_CONFIG, name="k8s_job_executor"),
    )


defs = k8s_definitions()
