"""The slide-encoder registry: one table row per slide encoder.

Required patch encoders and geometries follow the authors' published recipes (TRIDENT's table for
TITAN/PRISM/CHIEF/GigaPath/MADELEINE/FEATHER; the MOOZY package for MOOZY). Nothing here imports a
model package until an encoder is built.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from types import ModuleType

from ..encoders.errors import PluginError
from ..registry import Registry, cached_registry
from .base import SlideEncoderSpec, format_mag
from .errors import UnknownSlideEncoderError
from .moozy import build_moozy, moozy_case_forward, moozy_forward
from .pooling import build_pooling, max_forward, mean_forward
from .prism import build_prism, prism_forward
from .remote import remote_only_build
from .titan import UNICORN_HINT, build_titan, feather_forward, titan_forward

_NOT_ON_PYPI = " That code is not on PyPI, so it is not available offline here."

# fmt: off
_SPECS = [
    # parameter-free poolings: any patch encoder, any geometry, output dim = feature dim
    SlideEncoderSpec(
        name="mean", dim=None, patch_encoder=None, patch_size=None, target_magnification=None, needs_coords=False,
        library="builtin", build_fn=build_pooling, forward_fn=mean_forward, needs_weights=False,
        notes="mean of the patch features (float64 accumulation)",
    ),
    SlideEncoderSpec(
        name="max", dim=None, patch_encoder=None, patch_size=None, target_magnification=None, needs_coords=False,
        library="builtin", build_fn=build_pooling, forward_fn=max_forward, needs_weights=False,
        notes="element-wise max of the patch features",
    ),
    SlideEncoderSpec(
        name="titan", dim=768, patch_encoder="conch_v15", patch_size=512, target_magnification=20.0,
        needs_coords=True, library="remote-code", build_fn=build_titan, forward_fn=titan_forward, input_dim=768,
        model_id="MahmoodLab/TITAN", weight_files=("model.safetensors",), url="https://huggingface.co/MahmoodLab/TITAN",
        install_hint=UNICORN_HINT,
        notes="CoCa-pooled slide embedding (encode_slide_from_patch_features); ALiBi attention run in row chunks",
    ),
    SlideEncoderSpec(
        name="prism", dim=1280, patch_encoder="virchow_v1", patch_size=224, target_magnification=20.0,
        needs_coords=False, library="prism-embedder", build_fn=build_prism, forward_fn=prism_forward,
        input_dim=2560, model_id="paige-ai/Prism", weight_files=("model.safetensors",),
        requires=("prism_embedder", "environs"),
        install_hint="pip install --no-deps prism-embedder==1.1.1 && pip install environs",
        url="https://huggingface.co/paige-ai/Prism",
        notes="Perceiver resampler image_embedding (slide_representations); linear memory in N",
    ),
    SlideEncoderSpec(
        name="moozy", dim=768, patch_encoder="lunit_vit_small_patch8_dino", patch_size=224,
        target_magnification=20.0, needs_coords=True, library="moozy", build_fn=build_moozy,
        forward_fn=moozy_forward, case_forward_fn=moozy_case_forward,
        case_aggregation="MOOZY case transformer over the slides' CLS tokens", input_dim=384,
        model_id="AtlasAnalyticsLab/MOOZY", weight_files=("moozy.pt",),
        requires=("moozy",), install_hint="pip install --no-deps moozy==0.1.1",
        url="https://huggingface.co/AtlasAnalyticsLab/MOOZY",
        notes="slide = case embedding of a one-slide case, patient = case transformer over all its slides "
        "(moozy.encoding.run_encoding); ALiBi attention run in row chunks",
    ),
    SlideEncoderSpec(
        name="gigapath_slide", dim=768, patch_encoder="prov_gigapath", patch_size=256, target_magnification=20.0,
        needs_coords=True, library="gigapath", input_dim=1536, model_id="prov-gigapath/prov-gigapath",
        weight_files=("slide_encoder.pth",), url="https://github.com/prov-gigapath/prov-gigapath",
        unavailable="Prov-GigaPath's LongNet slide encoder (gigapath.slide_encoder.create_model("
        "'gigapath_slide_enc12l768d', in_chans=1536)) lives in the `gigapath` package on GitHub "
        "(prov-gigapath/prov-gigapath) and its dilated attention needs flash-attn (CUDA)." + _NOT_ON_PYPI,
    ),
    SlideEncoderSpec(
        name="feather", dim=512, patch_encoder="conch_v15", patch_size=512, target_magnification=20.0,
        needs_coords=False, library="remote-code", build_fn=remote_only_build, forward_fn=feather_forward,
        input_dim=768, model_id="MahmoodLab/abmil.base.conch_v15.pc108-24k", weight_files=("model.safetensors",),
        url="https://huggingface.co/MahmoodLab/abmil.base.conch_v15.pc108-24k",
        notes="ABMIL remote code of the snapshot (forward_features); needs the local snapshot directory",
    ),
    SlideEncoderSpec(
        name="madeleine", dim=512, patch_encoder="conch_v1", patch_size=256, target_magnification=10.0,
        needs_coords=False, library="madeleine", input_dim=512, model_id="MahmoodLab/madeleine",
        weight_files=("model.pt",), url="https://github.com/mahmoodlab/MADELEINE",
        unavailable="MADELEINE's architecture (madeleine.models.factory.create_model_from_pretrained, encode_he) "
        "lives in the authors' `madeleine` package on GitHub (mahmoodlab/MADELEINE)." + _NOT_ON_PYPI,
    ),
    SlideEncoderSpec(
        name="chief", dim=768, patch_encoder="chief_ctranspath", patch_size=256, target_magnification=10.0,
        needs_coords=False, library="chief", input_dim=768, model_id="hms-dbmi/CHIEF",
        weight_files=("CHIEF_pretraining.pth",), url="https://github.com/hms-dbmi/CHIEF",
        unavailable="CHIEF's slide model (models/CHIEF.py, CHIEF(size_arg='small'), 'WSI_feature') lives in the "
        "authors' GitHub repository hms-dbmi/CHIEF (weights on their Google Drive)." + _NOT_ON_PYPI,
    ),
]
# fmt: on

ENTRY_POINT_GROUP = "atlaspatch.slide_encoders"
HOOK_NAME = "register_slide_encoders"


class SlideEncoderRegistry(Registry[SlideEncoderSpec]):
    """Name -> :class:`SlideEncoderSpec` (built-ins and what installed plugins register)."""

    kind = "slide encoder"

    def validate(self, spec: SlideEncoderSpec) -> None:
        if not isinstance(spec, SlideEncoderSpec):
            raise TypeError(f"expected a SlideEncoderSpec, got {type(spec).__name__}")

    def unknown(self, name: str, suggestions: list[str]) -> Exception:
        return UnknownSlideEncoderError(name, suggestions, sorted(self))


SLIDE_ENCODERS = SlideEncoderRegistry({s.name: s for s in _SPECS})
BUILTIN_SLIDE_ENCODERS: tuple[str, ...] = tuple(SLIDE_ENCODERS)


@cached_registry
def slide_encoder_registry(plugin_files: tuple[str, ...] = ()) -> SlideEncoderRegistry:
    """Built-ins + every installed `atlaspatch.slide_encoders` entry point (a function, or a module
    defining `register_slide_encoders(registry)`), built once per process."""
    reg = SLIDE_ENCODERS.copy()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = f"entry point {ep.name!r} ({ep.value})"
        try:
            obj = ep.load()
            hook = getattr(obj, HOOK_NAME, None) if isinstance(obj, ModuleType) else obj
            staging = reg.copy()
            hook(staging)
        except Exception as exc:
            raise PluginError(f"Slide-encoder plugin {source}: {type(exc).__name__}: {exc}") from exc
        for name in staging:
            if reg.get(name) is not staging[name]:
                reg.register(staging[name], replace=True)
    return reg


def get_slide_encoder_spec(name: str, registry: Mapping[str, SlideEncoderSpec] | None = None) -> SlideEncoderSpec:
    """Look a slide encoder up (case/hyphen-insensitive); raises :class:`UnknownSlideEncoderError`."""
    reg = slide_encoder_registry() if registry is None else registry
    if not isinstance(reg, Registry):
        reg = SlideEncoderRegistry(reg)
    return reg.spec(name)


def compatible_groups(
    names: Iterable[str], registry: Mapping[str, SlideEncoderSpec] | None = None
) -> list[tuple[tuple[int, float] | None, list[str]]]:
    """Group slide encoders by the patch geometry (patch size, magnification) they need.

    Encoders in one group can share one run (one coords asset; each pulls its own patch features):
    e.g. prism + moozy (224 px at 20x). titan (512 px at 20x) + prism cannot. Geometry-free encoders
    (mean, max) join every group; alone they form the group ``(None, [...])``.
    """
    specs = [get_slide_encoder_spec(n, registry) for n in dict.fromkeys(names)]
    groups: dict[tuple[int, float], list[str]] = {}
    free = []
    for spec in specs:
        if spec.geometry is None:
            free.append(spec.name)
        else:
            groups.setdefault(spec.geometry, []).append(spec.name)
    if not groups:
        return [(None, free)] if free else []
    return [(geom, members + free) for geom, members in groups.items()]


def check_slide_encoder_run(
    names: Iterable[str],
    patch_size: int | None = None,
    target_magnification: float | None = None,
    registry: Mapping[str, SlideEncoderSpec] | None = None,
) -> list[SlideEncoderSpec]:
    """Validate a run's slide encoders before any work: one shared geometry, matching the given one.

    Raises :class:`SlideEncoderMismatchError` naming each encoder's requirement. Returns the specs.
    """
    from .errors import SlideEncoderMismatchError

    names = list(dict.fromkeys(names))
    specs = [get_slide_encoder_spec(n, registry) for n in names]
    groups = [g for g in compatible_groups(names, registry) if g[0] is not None]
    if len(groups) > 1:
        parts = "; ".join(
            f"{', '.join(n for n in members if get_slide_encoder_spec(n, registry).geometry == geom)} "
            f"need {geom[0]} px patches at {format_mag(geom[1])}"
            for geom, members in groups
        )
        raise SlideEncoderMismatchError(
            f"These slide encoders cannot share one run because their patch geometry differs: {parts}. "
            "Run each group separately (with its --patch-size/--target-mag)."
        )
    if groups and (patch_size is not None or target_magnification is not None):
        (size, mag), _ = groups[0]
        for spec in specs:
            if spec.geometry is not None:
                spec.check_compatible(
                    spec.patch_encoder or "",
                    size if patch_size is None else patch_size,
                    mag if target_magnification is None else target_magnification,
                )
    return specs


def required_patch_encoders(names: Iterable[str], registry: Mapping[str, SlideEncoderSpec] | None = None) -> list[str]:
    """Patch encoders the slide encoders need (mean/max need none of their own), in first-seen order."""
    out = [get_slide_encoder_spec(n, registry).patch_encoder for n in names]
    return list(dict.fromkeys(p for p in out if p))
