"""IO manager for the per-slide store: values are `{slide_id: result}` for any number of slides."""

from typing import Any

from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from .core.errors import SlideError
from .core.pipeline import load_patch_coords, load_tissue_mask, save_patch_coords, save_tissue_mask
from .resources import StoreResource

_SAVE = {"tissue_mask": save_tissue_mask, "patch_coords": save_patch_coords}
_LOAD = {"tissue_mask": load_tissue_mask, "patch_coords": load_patch_coords}


class SlideStoreIOManager(ConfigurableIOManager):
    """Writes each slide of a (possibly batched) output atomically into its HDF5 store."""

    store: ResourceDependency[StoreResource]

    def handle_output(self, context: OutputContext, obj: dict[str, Any]) -> None:
        name = context.asset_key.path[-1]
        layout = self.store.layout
        for slide_id, result in (obj or {}).items():
            _SAVE[name](layout, result)
            context.log.debug(f"{name}/{slide_id} written to {layout.store(slide_id).path}")

    def load_input(self, context: InputContext) -> dict[str, Any]:
        name = context.asset_key.path[-1]
        layout = self.store.layout
        out: dict[str, Any] = {}
        for slide_id in context.asset_partition_keys:
            try:
                out[slide_id] = _LOAD[name](layout, slide_id)
            except SlideError as e:
                # Missing upstream for one slide (failed earlier in a batch): that slide fails
                # downstream with a clear reason; the others go on.
                context.log.warning(str(e))
        return out
