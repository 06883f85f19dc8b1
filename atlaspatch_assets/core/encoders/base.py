"""Patch-encoder specification (:class:`EncoderSpec`) and a loaded, ready-to-run :class:`Encoder`."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EncoderError, EncoderUnavailableError
from .weights import (
    ResolvedWeights,
    WeightsArg,
    explicit_for,
    load_into,
    load_state_dict_file,
    resolve_weights,
    snapshot_config,
    weights_sha256,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

LIBRARIES = ("torchvision", "timm", "transformers", "open_clip", "custom")
_LIBRARY_MODULE = {
    "torchvision": "torchvision",
    "timm": "timm",
    "transformers": "transformers",
    "open_clip": "open_clip",
}
_LIBRARY_DIST = {
    "torchvision": "torchvision",
    "timm": "timm",
    "transformers": "transformers",
    "open_clip": "open_clip_torch",
    "unicorn_baseline": "--no-deps unicorn-baseline==1.4.4",
    "einops_exts": "einops-exts",
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

ArchFn = Callable[[dict | None], nn.Module]  # architecture without weights (optional snapshot config)
ForwardFn = Callable[[nn.Module, Tensor], Tensor]  # (model, normalized NCHW batch) -> (B, D)
AdaptFn = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]  # checkpoint keys -> model keys


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build one patch encoder; one registry entry.

    ``arch(config)`` builds the architecture without weights (``config`` is the JSON found next to
    the weights in a Hugging Face snapshot, or None); it must work under ``torch.device("meta")``.
    ``forward(model, x)`` maps a normalized NCHW batch to (B, dim); default ``model(x)``.
    """

    name: str
    dim: int
    library: str
    arch: ArchFn | None = None
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    model_id: str | None = None  # Hugging Face repo, torchvision weights enum, or a description
    weight_files: tuple[str, ...] = ()  # expected file names, preferred first
    forward: ForwardFn | None = None
    adapt: AdaptFn | None = None
    ignore_unexpected: tuple[str, ...] = ()  # checkpoint keys that may be dropped (heads, text towers)
    ignore_missing: tuple[str, ...] = ()
    packaged_weights: Callable[[], Path | None] | None = None  # weights shipped in a Python package
    weights_package: str | None = None  # that package's distribution name
    requires: tuple[str, ...] = ()  # extra importable modules the architecture needs
    unavailable: str | None = None  # why the architecture cannot be built here (missing code)
    channels_last: bool = False  # convnets run faster in NHWC memory format
    needs_weights: bool = True  # False: arch() already returns a trained model (plugins)
    url: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        validate_spec(self)

    def describe(self) -> dict[str, Any]:
        """JSON-serializable recipe of the entry (no weights): for code versions and storage attrs."""
        return {
            "encoder": self.name,
            "dim": self.dim,
            "library": self.library,
            "model_id": self.model_id or "",
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def expected_weights(self) -> str:
        """Human-readable description of the expected weights (repo and file names)."""
        files = " or ".join(self.weight_files) or "a state-dict file"
        return f"{self.model_id}: {files}" if self.model_id else files

    def check_available(self) -> None:
        """Raise :class:`EncoderUnavailableError` when the architecture code is missing."""
        if self.unavailable:
            raise EncoderUnavailableError(f"Patch encoder {self.name!r} cannot be built here: {self.unavailable}")
        for module in (_LIBRARY_MODULE.get(self.library), *self.requires):
            if module and importlib.util.find_spec(module) is None:
                raise EncoderUnavailableError(
                    f"Patch encoder {self.name!r} needs the Python package {module!r}, which is not "
                    f"installed; install it (e.g. `pip install {_LIBRARY_DIST.get(module, module)}`)."
                )

    def create(self, config: dict | None = None) -> nn.Module:
        """The architecture without weights (use under ``torch.device('meta')`` for a free shape check)."""
        self.check_available()
        assert self.arch is not None  # guaranteed by validate_spec when not unavailable
        try:
            return self.arch(config)
        except ImportError as exc:
            raise EncoderUnavailableError(
                f"Patch encoder {self.name!r}: building the architecture failed on a missing import ({exc})."
            ) from exc

    def run(self, model: nn.Module, x: Tensor) -> Tensor:
        """Forward a normalized NCHW batch to (B, dim) features."""
        out = self.forward(model, x) if self.forward is not None else model(x)
        if not isinstance(out, Tensor):
            raise EncoderError(f"Patch encoder {self.name!r}: forward returned {type(out).__name__}, not a tensor")
        return out

    def build(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: WeightsArg | ResolvedWeights = None,
        weights_dir: str | os.PathLike | None = None,
        *,
        hf_cache_dir: str | os.PathLike | None = None,
    ) -> nn.Module:
        """Build the model with its weights (resolved offline), in eval mode on ``device``/``dtype``."""
        self.check_available()
        if isinstance(weights, ResolvedWeights):
            resolved: ResolvedWeights | None = weights
        elif self.needs_weights or explicit_for(weights, self.name) is not None:
            resolved = resolve_weights(self, weights, weights_dir, hf_cache_dir=hf_cache_dir)
        else:
            resolved = None
        config = snapshot_config(resolved)
        if resolved is None:
            model = self.create(config)
        else:
            state = load_state_dict_file(resolved)  # read first: a bad file fails before any allocation
            with torch.device("meta"):  # fast path: no random init, parameters take the loaded tensors
                model = self.create(config)
            state = self.adapt(state, model) if self.adapt is not None else state
            kw = dict(ignore_unexpected=self.ignore_unexpected, ignore_missing=self.ignore_missing)
            load_into(model, state, encoder=self.name, source=resolved.path, assign=True, **kw)
            if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                model = self.create(config)  # non-persistent buffers (e.g. RoPE tables) need a real build
                load_into(model, state, encoder=self.name, source=resolved.path, **kw)
        model.eval().requires_grad_(False)
        return model.to(device=device, dtype=dtype)


def validate_spec(spec: Any) -> None:
    """Check a registry entry; raises TypeError/ValueError naming the bad field."""
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"expected an EncoderSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise ValueError(f"encoder name {spec.name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
    for attr in ("dim", "input_size"):
        value = getattr(spec, attr)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"encoder {spec.name!r}: {attr} must be a positive int, got {value!r}")
    if spec.library not in LIBRARIES:
        raise ValueError(f"encoder {spec.name!r}: library must be one of {LIBRARIES}, got {spec.library!r}")
    if spec.interpolation not in INTERPOLATIONS:
        raise ValueError(f"encoder {spec.name!r}: interpolation must be one of {INTERPOLATIONS}")
    for attr in ("mean", "std"):
        value = getattr(spec, attr)
        if len(value) != 3 or not all(isinstance(v, int | float) for v in value):
            raise ValueError(f"encoder {spec.name!r}: {attr} must be 3 numbers, got {value!r}")
    if any(v <= 0 for v in spec.std):
        raise ValueError(f"encoder {spec.name!r}: std must be positive")
    if spec.unavailable is None and not callable(spec.arch):
        raise ValueError(f"encoder {spec.name!r}: arch must be callable (or set `unavailable` with a reason)")
    if spec.forward is not None and not callable(spec.forward):
        raise ValueError(f"encoder {spec.name!r}: forward must be callable")


def library_versions(spec: EncoderSpec) -> dict[str, str]:
    """Installed versions of torch, the encoder's library and its weights package."""
    out: dict[str, str] = {}
    for dist in ("torch", _LIBRARY_DIST.get(spec.library), spec.weights_package):
        if dist:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[dist] = importlib.metadata.version(dist)
    return out


def _as_nchw_float(batch: Any, device: torch.device) -> Tensor:
    """uint8 NHWC/HWC (or NCHW) pixels or float NCHW in [0, 1] -> float32 NCHW on ``device``."""
    if isinstance(batch, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(batch))
    elif isinstance(batch, Tensor):
        t = batch
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(batch).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"expected a batch of images (B,H,W,3) or (B,3,H,W), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        if t.shape[-1] == 3:
            t = t.permute(0, 3, 1, 2)
        elif t.shape[1] != 3:
            raise ValueError(f"uint8 batch must be NHWC or NCHW RGB, got shape {tuple(t.shape)}")
        return t.to(device, non_blocking=True).float().div_(255.0)
    if not t.is_floating_point():
        raise TypeError(f"unsupported pixel dtype {t.dtype} (use uint8 or float in [0, 1])")
    if t.shape[1] != 3:
        raise ValueError(f"float batch must be NCHW RGB in [0, 1], got shape {tuple(t.shape)}")
    return t.to(device, torch.float32, non_blocking=True)


class Encoder:
    """A loaded patch encoder: pixels in, float32 (B, D) features out.

    Resizing to the input size and normalization run on the torch side (on ``device``). Precision
    ``float16``/``bfloat16`` uses autocast on CPU and half-precision weights on accelerators.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        weights: ResolvedWeights | None = None,
        sha256: str | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of float32, float16, bfloat16; got {precision!r}")
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        self.precision = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[self.dtype]
        self.weights = weights
        self.weights_sha256 = sha256
        self._autocast = self.dtype != torch.float32 and self.device.type == "cpu"
        model = model.eval().requires_grad_(False).to(self.device)
        if self.dtype != torch.float32 and not self._autocast:
            model = model.to(self.dtype)
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        self._checked = False

    @classmethod
    def load(
        cls,
        encoder: str | EncoderSpec,
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        weights: WeightsArg = None,
        weights_dir: str | os.PathLike | None = None,
        registry: Mapping[str, EncoderSpec] | None = None,
        hf_cache_dir: str | os.PathLike | None = None,
    ) -> Encoder:
        """Resolve (offline) and load an encoder by name or spec; weights are found before building."""
        if isinstance(encoder, EncoderSpec):
            spec = encoder
        else:
            from .registry import get_encoder_spec

            spec = get_encoder_spec(encoder, registry)
        spec.check_available()
        resolved = None
        if spec.needs_weights or explicit_for(weights, spec.name) is not None:
            resolved = resolve_weights(spec, weights, weights_dir, hf_cache_dir=hf_cache_dir)
        sha = weights_sha256(resolved) if resolved is not None else None
        model = spec.build("cpu", torch.float32, weights=resolved)
        return cls(spec, model, device=device, precision=precision, weights=resolved, sha256=sha)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def model_id(self) -> str | None:
        return self.spec.model_id

    @property
    def library_versions(self) -> dict[str, str]:
        return library_versions(self.spec)

    def preprocess(self, batch: Any) -> Tensor:
        """Pixels -> normalized float32 NCHW at the encoder's input size, on the encoder's device."""
        x = _as_nchw_float(batch, self.device)
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            mode = self.spec.interpolation
            smooth = mode in ("bilinear", "bicubic")
            x = F.interpolate(
                x,
                size=(size, size),
                mode=mode,
                align_corners=False if smooth else None,
                antialias=smooth and (x.shape[-1] > size or x.shape[-2] > size),
            )
            if mode == "bicubic":
                x = x.clamp_(0.0, 1.0)  # as resizing uint8 images does
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def forward_tensor(self, x: Tensor) -> Tensor:
        """Run the model on a preprocessed batch; returns (B, D) float32 on the encoder's device."""
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._autocast:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                out = self.spec.run(self.model, x)
        else:
            out = self.spec.run(self.model, x.to(self.dtype))
        if out.ndim != 2 or out.shape[1] != self.spec.dim:
            raise EncoderError(
                f"Patch encoder {self.name!r} produced features of shape {tuple(out.shape)}, expected "
                f"(B, {self.spec.dim}); the weights/config do not match the registry entry."
            )
        return out.float()

    def __call__(self, batch: Any) -> np.ndarray:
        """Features of a batch of uint8 NHWC pixels (or float NCHW in [0, 1]) as float32 (B, D)."""
        if len(batch) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        with torch.inference_mode():
            x = self.preprocess(batch)
        return np.ascontiguousarray(self.forward_tensor(x).cpu().numpy(), dtype=np.float32)

    def attrs(self) -> dict[str, Any]:
        """Provenance for storage attributes (JSON-serializable)."""
        return {
            **self.spec.describe(),
            "weights_sha256": self.weights_sha256 or "",
            "weights_source": self.weights.source if self.weights else "",
            "weights_file": self.weights.path.name if self.weights else "",
            "precision": self.precision,
            "library_versions": self.library_versions,
        }

    def __repr__(self) -> str:
        sha = (self.weights_sha256 or "none")[:12]
        return f"Encoder({self.name!r}, dim={self.dim}, {self.device}, {self.precision}, sha256={sha})"
