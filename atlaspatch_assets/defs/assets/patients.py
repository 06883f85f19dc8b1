"""`patient_features/<name>` over the `patients` partitions: one embedding per case from the
slide embeddings of its slides (or the model's own case aggregator), through the shared adapter."""

from collections.abc import Sequence
from typing import Any

from dagster import AllPartitionMapping, AssetDep, AssetExecutionContext, AssetKey, AssetSpec, multi_asset

from ...core.stages import SlideTarget, StageEnv, run_patients
from ...core.stages.embeddings import case_aggregation, load_patients
from ..adapter import PartitionReporter, dagster_ref
from ..partitions import patients_partitions
from ..resources import ComputeResource, ModelsResource, StoreResource
from .slides import slide_key


def patient_key(target: SlideTarget) -> AssetKey:
    return AssetKey(["patient_features", target.name])


def build_patient_assets(targets: Sequence[SlideTarget]) -> Any:
    targets = list(dict.fromkeys(targets))
    specs = [
        AssetSpec(
            patient_key(t),
            deps=[AssetDep(slide_key(t), partition_mapping=AllPartitionMapping())],
            partitions_def=patients_partitions,
            group_name="patients",
            code_version=f"1-{t.name}",
            kinds={"hdf5"},
            description=f"Patient embedding: {case_aggregation(t)} ({t.name}) of the case's slides.",
        )
        for t in targets
    ]

    @multi_asset(name="patient_stages", specs=specs, can_subset=True)
    def patient_stages(
        context: AssetExecutionContext, store: StoreResource, compute: ComputeResource, models: ModelsResource
    ):
        selected = [t for t in targets if patient_key(t) in context.selected_asset_keys]
        layout = store.layout
        if swept := layout.sweep_orphans():
            context.log.info(f"removed {swept} temporary file(s) left by killed writers in {layout.root}")
        env = StageEnv(layout=layout, catalog=store.catalog, run_id=context.run.run_id, render=dagster_ref)
        env.logger = context.log
        registered = load_patients(layout)
        cases = {c: registered.get(c) for c in context.partition_keys}
        out = PartitionReporter(context)
        for case_id, outcomes in run_patients(cases, selected, env, compute.params(), models.cache).items():
            out.report(case_id, outcomes)
        out.finish()
        yield from ()

    return patient_stages
