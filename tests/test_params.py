"""Every parameter is defined once: the CLI option defaults, the Dagster Config/resource defaults and
the core parameter defaults, read by introspection, agree (and every flag maps back to its field)."""

from __future__ import annotations

import math

import click
import pytest
from pydantic_core import PydanticUndefined

from atlaspatch_assets.cli import main
from atlaspatch_assets.cli.options import DESTS
from atlaspatch_assets.core.params import UsageError, check_params, params_of
from atlaspatch_assets.core.source import SlideSourceParams
from atlaspatch_assets.core.stages import (
    ComputeParams,
    CoordsParams,
    FeatureParams,
    MaskParams,
    ModelParams,
    SlideEmbeddingParams,
)
from atlaspatch_assets.core.store import GeometryParams
from atlaspatch_assets.defs.assets.slides import CoordsConfig, FeaturesConfig, MaskConfig, SlideFeaturesConfig
from atlaspatch_assets.defs.resources import ComputeResource, ModelsResource, SlideSourceResource, StoreResource

DAGSTER = {
    MaskParams: MaskConfig,
    CoordsParams: CoordsConfig,
    FeatureParams: FeaturesConfig,
    SlideEmbeddingParams: SlideFeaturesConfig,
    GeometryParams: StoreResource,
    SlideSourceParams: SlideSourceResource,
    ComputeParams: ComputeResource,
    ModelParams: ModelsResource,
}
# The seed's CLI requires the geometry (`--patch-size`, and `--target-mag` or `--target-mpp`) where
# the UI has a default run folder; slide encoders fill it in. No other CLI default may differ.
CLI_REQUIRED = {("store", "patch_size"), ("store", "target_mag")}
COMMANDS = ("segment-and-get-coords", "detect-tissue", "process", "encode-slide", "encode-patient")


def _pydantic_default(field: object) -> object:
    if field.default is not PydanticUndefined:  # type: ignore[attr-defined]
        return field.default  # type: ignore[attr-defined]
    return field.default_factory()  # type: ignore[attr-defined]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


@pytest.mark.parametrize("params_cls", list(DAGSTER), ids=lambda c: c.__name__)
def test_dagster_defaults_are_the_core_defaults(params_cls: type) -> None:
    fields = DAGSTER[params_cls].model_fields
    for p in params_of(params_cls):
        assert p.name in fields, f"{p.section}.{p.name} has no Dagster field"
        got = _pydantic_default(fields[p.name])
        if p.name in ("slide_dirs", "plugins"):  # both read the environment when created
            continue
        assert _same(got, p.default), f"{p.section}.{p.name}: Dagster {got!r} vs core {p.default!r}"
        assert fields[p.name].description and p.help in fields[p.name].description


def test_cli_defaults_are_the_core_defaults() -> None:
    by_dest = {dest: key for key, dest in DESTS.items()}
    core = {(p.section, p.name): p for cls in DAGSTER for p in params_of(cls)}
    seen: set[tuple[str, str]] = set()
    for name in COMMANDS:
        cmd = main.commands[name]
        for opt in cmd.params:
            if not isinstance(opt, click.Option) or opt.name not in by_dest:
                continue
            key = by_dest[opt.name]
            seen.add(key)
            p = core[key]
            default = opt.default
            if p.base_type in (dict, list) or isinstance(p.default, (dict, list)):
                assert opt.multiple and (not default or getattr(default, "name", "") == "UNSET"), key
            elif key in CLI_REQUIRED:
                assert default is None, key
            else:
                assert _same(default, p.default), f"{name} {opt.opts}: CLI {default!r} vs core {p.default!r}"
            assert opt.help and p.help in opt.help or key in CLI_REQUIRED, key
    with_flags = {k for k, p in core.items() if p.cli != ""}
    assert with_flags <= seen, f"parameters with a flag but no option: {with_flags - seen}"


def test_workers_default_is_one_value_everywhere() -> None:
    """The drift the issue found: patch_workers was the CPU count in the CLI and 2 elsewhere."""
    (opt,) = [o for o in main.commands["process"].params if o.name == "patch_workers"]
    assert opt.default == CoordsParams().patch_workers == CoordsConfig.model_fields["patch_workers"].default


@pytest.mark.parametrize(
    "params,needle",
    [
        (CoordsParams(min_tissue_fraction=1.5), "patch_coords.min_tissue_fraction"),
        (CoordsParams(min_tissue_fraction=float("nan")), "finite"),
        (GeometryParams(target_mag=float("inf")), "finite"),
        (MaskParams(method="watershed"), "must be one of otsu, sam2"),
        (ComputeParams(batch_size=0), "compute.batch_size must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_before_any_work(params: object, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        check_params(params)


def test_launchpad_preset_validates_and_holds_the_core_defaults() -> None:
    from pathlib import Path

    import yaml
    from dagster import validate_run_config

    from atlaspatch_assets.defs.definitions import build_definitions

    preset = yaml.safe_load(
        (Path(__file__).parents[1] / "resources/run_config/segment_and_get_coords.yaml").read_text()
    )
    job = build_definitions(encoders=[], slide_encoders=[]).resolve_job_def("segment_and_get_coords")
    validate_run_config(job, preset)
    sections = preset["ops"]["slide_stages"]["config"]
    for params_cls, section in ((MaskParams, "tissue_mask"), (CoordsParams, "patch_coords")):
        defaults = params_cls()
        for name, value in sections[section].items():
            assert getattr(defaults, name) == value, (section, name)
    store = preset["resources"]["store"]["config"]
    assert GeometryParams().patch_size == store["patch_size"] and GeometryParams().target_mag == store["target_mag"]
