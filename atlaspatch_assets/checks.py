"""Partitioned asset checks: the slide has tissue, and it has patches."""

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from .core.pipeline import COORDS, MASK
from .partitions import slides_partitions
from .resources import StoreResource


def _keys(context: AssetCheckExecutionContext) -> list[str]:
    return list(context.partition_keys) if context.has_partition_key_range else [context.partition_key]


@asset_check(asset="tissue_mask", partitions_def=slides_partitions, description="The mask finds tissue.")
def has_tissue(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    layout = store.layout
    missing, empty, fractions = [], [], {}
    for key in _keys(context):
        attrs = layout.store(key).dataset_attrs(MASK)
        if not attrs:
            missing.append(key)
        elif float(attrs.get("tissue_fraction", 0.0)) <= 0:
            empty.append(key)
        else:
            fractions[key] = round(float(attrs["tissue_fraction"]), 4)
    passed = not missing and not empty
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.ERROR if missing else AssetCheckSeverity.WARN,
        metadata={
            "no_mask": ", ".join(missing) or "none",
            "no_tissue": ", ".join(empty) or "none",
            "checked": len(fractions) + len(missing) + len(empty),
        },
        description=None if passed else "slides without a mask or without tissue",
    )


@asset_check(asset="patch_coords", partitions_def=slides_partitions, description="Coordinates exist and are non-empty.")
def has_patches(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    layout = store.layout
    missing, empty, counts = [], [], {}
    for key in _keys(context):
        s = layout.store(key)
        if not s.has(COORDS):
            missing.append(key)
            continue
        n = int(s.attrs().get("num_patches", 0))
        (empty.append(key) if n == 0 else counts.__setitem__(key, n))
    passed = not missing and not empty
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.ERROR if missing else AssetCheckSeverity.WARN,
        metadata={
            "no_coords": ", ".join(missing) or "none",
            "zero_patches": ", ".join(empty) or "none",
            "patches": sum(counts.values()),
        },
        description=None if passed else "slides without coordinates or with 0 patches",
    )
