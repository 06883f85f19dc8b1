"""How models run (device, precision, batch size, reader threads) and where their weights come
from; `ModelCache` loads each patch/slide encoder once per process and remembers load errors,
so one missing weights file fails that encoder on every slide with the same reason."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..params import param, split_names

PLUGINS_ENV = "ATLASPATCH_FEATURE_PLUGINS"


def plugins_from_env() -> list[str]:
    """Plugin files named in $ATLASPATCH_FEATURE_PLUGINS: absolute paths only (a relative name
    would import whatever file of that name the process's working directory holds)."""
    paths = split_names(os.environ.get(PLUGINS_ENV))
    relative = [p for p in paths if not os.path.isabs(p)]
    if relative:
        raise ValueError(f"${PLUGINS_ENV} must list absolute paths of plugin files; not: {', '.join(relative)}")
    return paths


PRECISION_CHOICES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ComputeParams:
    """Compute settings shared by the model stages (and the SAM2 segmenter's device)."""

    SECTION: ClassVar[str] = "compute"

    device: str = param("cpu", "Device for segmentation and models (cpu, cuda, cuda:<i>)")
    feature_device: str = param("", "Device for patch/slide encoders; empty = the device above")
    precision: str = param(
        "auto",
        "Model precision; auto = float16 on CUDA, float32 elsewhere (CPU half precision runs under autocast)",
        choices=PRECISION_CHOICES,
        cli="feature-precision",
    )
    batch_size: int = param(32, "Patches per forward pass", ge=1, cli="feature-batch-size")
    num_workers: int = param(4, "Reader threads decoding tiles ahead of the model", ge=1, cli="feature-num-workers")

    @property
    def model_device(self) -> str:
        return self.feature_device or self.device

    @property
    def model_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "float16" if self.model_device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class ModelParams:
    """Where weights come from (never downloaded) and which plugin files add encoders."""

    SECTION: ClassVar[str] = "models"

    weights_dir: str = param("", "Folder with <encoder>/<file> or <encoder>.<ext> weights ($ATLASPATCH_WEIGHTS_DIR)")
    encoder_weights: dict[str, str] = param(
        default_factory=dict, help="Weights file of one patch encoder, NAME=PATH (repeatable)"
    )
    slide_encoder_weights: dict[str, str] = param(
        default_factory=dict, help="Weights file of one slide encoder, NAME=PATH (repeatable)"
    )
    plugins: list[str] = param(
        default_factory=lambda: plugins_from_env(),
        help="Python file defining register_feature_extractors(registry, device, dtype, num_workers) "
        f"(repeatable; the UI: ${PLUGINS_ENV})",
        cli="feature-plugin",
    )
    random_slide_weights: bool = param(False, "Random-weight slide encoders (tests and benchmarks only)", cli="")


@dataclass
class ModelCache:
    """Loaded encoders by (name, device, precision); a failed load is kept as its exception."""

    models: ModelParams = field(default_factory=ModelParams)
    _patch: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    _slide: dict[tuple[str, str], Any] = field(default_factory=dict)
    _registry: Any = None

    @property
    def registry(self) -> Any:
        """Patch encoders: built-ins + installed entry points + this run's plugin files (loaded once)."""
        if self._registry is None:
            from ..encoders import encoder_registry

            self._registry = encoder_registry(tuple(self.models.plugins))
        return self._registry

    def patch_encoder(self, name: str, device: str, precision: str) -> Any:
        """The loaded encoder, or the exception its loading raised (kept for the next slides)."""
        key = (name, device, precision)
        if key not in self._patch:
            from ..encoders import Encoder

            try:
                self._patch[key] = Encoder.load(
                    name,
                    device=device,
                    precision=precision,
                    weights=self.models.encoder_weights or None,
                    weights_dir=self.models.weights_dir or None,
                    registry=self.registry,
                )
            except Exception as e:  # missing weights / code: this encoder fails, the others go on
                self._patch[key] = e
        return self._patch[key]

    def slide_encoder(self, name: str, device: str) -> Any:
        key = (name, device)
        if key not in self._slide:
            from ..slide_encoders import SlideEncoder

            try:
                self._slide[key] = SlideEncoder.load(
                    name,
                    device=device,
                    weights=self.models.slide_encoder_weights or None,
                    weights_dir=self.models.weights_dir or None,
                    random_weights=self.models.random_slide_weights,
                )
            except Exception as e:
                self._slide[key] = e
        return self._slide[key]
