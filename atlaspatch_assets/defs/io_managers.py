"""IO manager of the per-slide store, for assets downstream of ours: loading `tissue_mask`,
`patch_coords`, `features/<enc>` or `slide_features/<name>` gives `{slide_id: value}` for the
partitions asked for, read through the store layout (whatever the store format). Our own stages
write their stores themselves (atomically, then the catalog), so there is nothing to handle on output.
"""

from typing import Any

from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from ..core.errors import SlideError
from ..core.stages import load_patch_coords, load_tissue_mask
from .resources import StoreResource


def load_value(layout: Any, asset: list[str], slide_id: str) -> Any:
    """The stored value of one asset for one slide."""
    store = layout.store(slide_id)
    if asset == ["tissue_mask"]:
        return load_tissue_mask(layout, slide_id)
    if asset == ["patch_coords"]:
        return load_patch_coords(layout, slide_id)
    if asset[0] == "features":
        return store.features(asset[1])[0]
    if asset[0] == "slide_features":
        return store.slide_features(asset[1])[0]
    raise KeyError(f"no stored value for asset {'/'.join(asset)}")


class SlideStoreIOManager(ConfigurableIOManager):
    """Loads per-slide values from the stores of the run folder (`{slide_id: value}`)."""

    store: ResourceDependency[StoreResource]

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is not None:
            raise TypeError("the slide stages write their stores themselves; return nothing")

    def load_input(self, context: InputContext) -> dict[str, Any]:
        layout = self.store.layout
        out: dict[str, Any] = {}
        for slide_id in context.asset_partition_keys:
            try:
                out[slide_id] = load_value(layout, list(context.asset_key.path), slide_id)
            except SlideError as e:  # missing for one slide (it failed upstream): the others still load
                context.log.warning(str(e))
        return out
