"""Slide-encoder specification (:class:`SlideEncoderSpec`) and a loaded :class:`SlideEncoder`.

A slide encoder maps the patch features of one slide, (N, D) float32 with their level-0 (x, y)
coordinates, to one (D_out,) float32 vector. Each entry states the patch geometry it was trained
on (patch encoder, patch size, magnification); :meth:`SlideEncoderSpec.check_compatible` rejects
anything else before any work starts. Weights are resolved offline by the patch encoders'
:func:`~atlaspatch_assets.core.encoders.resolve_weights` (never downloaded).
"""

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
from torch import Tensor, nn

from ..encoders.base import PRECISIONS
from ..encoders.errors import EncoderUnavailableError, WeightsNotFoundError
from ..encoders.weights import ResolvedWeights, WeightsArg, resolve_weights, weights_sha256
from .errors import SlideEncoderError, SlideEncoderMismatchError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# (spec, device, dtype, weights or None for random init) -> model (None for parameter-free poolings)
BuildFn = Callable[["SlideEncoderSpec", torch.device, torch.dtype, "ResolvedWeights | None"], "nn.Module | None"]
# (model, features (N, D) float, coords (N, 2) int64 level-0, patch_size_level0) -> (D_out,)
ForwardFn = Callable[["nn.Module | None", Tensor, Tensor, int], Tensor]
# (model, [(features, coords, patch_size_level0) per slide of one case]) -> (D_out,)
CaseForwardFn = Callable[["nn.Module | None", list[tuple[Tensor, Tensor, int]]], Tensor]


def format_mag(mag: float | None) -> str:
    """20.0 -> '20x', 2.5 -> '2.5x'."""
    return "any magnification" if mag is None else f"{float(mag):g}x"


def same_mag(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(a)))


@dataclass(frozen=True)
class SlideEncoderSpec:
    """Everything needed to build one slide encoder; one registry row.

    ``patch_encoder``/``patch_size``/``target_magnification`` = None means "any" (mean/max pooling).
    ``dim`` None means the output has the patch features' dimension. ``input_dim`` is the feature
    dimension the model expects (None: any). ``unavailable`` says why the architecture cannot be
    built here (its code is not installable offline).
    """

    name: str
    dim: int | None
    patch_encoder: str | None
    patch_size: int | None
    target_magnification: float | None
    needs_coords: bool
    library: str  # where the architecture comes from: "builtin", a PyPI package, or "remote-code"
    build_fn: BuildFn | None = None
    forward_fn: ForwardFn | None = None
    case_forward_fn: CaseForwardFn | None = None  # models with their own patient/case-level aggregator
    case_aggregation: str = "mean of slide embeddings"
    input_dim: int | None = None
    model_id: str | None = None  # Hugging Face repo (or a description) of the published weights
    weight_files: tuple[str, ...] = ()
    needs_weights: bool = True
    requires: tuple[str, ...] = ()  # importable modules the architecture needs
    install_hint: str = ""  # how to get those modules (pip command)
    unavailable: str | None = None
    url: str = ""
    notes: str = ""
    # fields read by the patch encoders' resolve_weights (weights are never shipped in a package)
    packaged_weights: Callable[[], Path | None] | None = None
    weights_package: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"slide encoder name {self.name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        for attr in ("dim", "patch_size", "input_dim"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"slide encoder {self.name!r}: {attr} must be a positive int or None")
        if self.target_magnification is not None and not float(self.target_magnification) > 0:
            raise ValueError(f"slide encoder {self.name!r}: target_magnification must be positive")
        if self.unavailable is None and (self.build_fn is None or self.forward_fn is None):
            raise ValueError(f"slide encoder {self.name!r}: build_fn/forward_fn are required (or set `unavailable`)")

    # ---------------------------------------------------------------- geometry

    @property
    def geometry(self) -> tuple[int, float] | None:
        """(patch size, magnification) the encoder needs; None when any geometry works."""
        if self.patch_size is None or self.target_magnification is None:
            return None
        return (self.patch_size, float(self.target_magnification))

    def requirement(self) -> str:
        """'features/conch_v15 from 512 px patches at 20x' (or 'features of any patch encoder')."""
        if self.patch_encoder is None and self.geometry is None:
            return "features of any patch encoder at any patch size and magnification"
        enc = f"features/{self.patch_encoder}" if self.patch_encoder else "features of any patch encoder"
        size = f"{self.patch_size} px patches" if self.patch_size else "patches of any size"
        return f"{enc} from {size} at {format_mag(self.target_magnification)}"

    def check_compatible(self, patch_encoder: str, patch_size: int, target_magnification: float) -> None:
        """Raise :class:`SlideEncoderMismatchError` unless the patch features fit this encoder."""
        problems = []
        if self.patch_encoder is not None and patch_encoder != self.patch_encoder:
            problems.append(f"patch encoder {self.patch_encoder!r} (given {patch_encoder!r})")
        if self.patch_size is not None and int(patch_size) != self.patch_size:
            problems.append(f"patch size {self.patch_size} px (given {patch_size} px)")
        if self.target_magnification is not None and not same_mag(target_magnification, self.target_magnification):
            problems.append(
                f"magnification {format_mag(self.target_magnification)} (given {format_mag(target_magnification)})"
            )
        if not problems:
            return
        fix = []
        if self.patch_size is not None:
            fix.append(f"--patch-size {self.patch_size}")
        if self.target_magnification is not None:
            fix.append(f"--target-mag {float(self.target_magnification):g}")
        raise SlideEncoderMismatchError(
            f"Slide encoder {self.name!r} requires {self.requirement()}; it needs {'; '.join(problems)}. "
            f"Run it with {' '.join(fix) or 'matching features'} (its patch encoder is chosen for you). "
            "Slide encoders whose patch geometry differs cannot share one run (e.g. titan needs 512 px "
            "patches at 20x, prism and moozy 224 px at 20x): run them separately."
        )

    # ---------------------------------------------------------------- building

    def describe(self) -> dict[str, Any]:
        """JSON-serializable recipe of the entry (no weights): for code versions and storage attrs."""
        return {
            "encoder": self.name,
            "dim": self.dim or 0,
            "required_patch_encoder": self.patch_encoder or "",
            "required_patch_size": self.patch_size or 0,
            "required_target_magnification": float(self.target_magnification or 0.0),
            "needs_coords": self.needs_coords,
            "library": self.library,
            "model_id": self.model_id or "",
        }

    def expected_weights(self) -> str:
        """Human-readable description of the expected weights (repo and file names)."""
        files = " or ".join(self.weight_files) or "a state-dict file"
        return f"{self.model_id}: {files}" if self.model_id else files

    def check_available(self) -> None:
        """Raise :class:`EncoderUnavailableError` when the architecture code is missing."""
        if self.unavailable:
            raise EncoderUnavailableError(f"Slide encoder {self.name!r} cannot be built here: {self.unavailable}")
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                hint = f" Install it: {self.install_hint}" if self.install_hint else ""
                raise EncoderUnavailableError(
                    f"Slide encoder {self.name!r} needs the Python module {module!r}, which is not installed.{hint}"
                )

    def resolve(
        self,
        weights: WeightsArg = None,
        weights_dir: str | os.PathLike | None = None,
        *,
        hf_cache_dir: str | os.PathLike | None = None,
    ) -> ResolvedWeights:
        """Find the weights offline (explicit path → weights dir → Hugging Face cache), never downloading."""
        try:
            return resolve_weights(self, weights, weights_dir, hf_cache_dir=hf_cache_dir)  # type: ignore[arg-type]
        except WeightsNotFoundError as exc:
            raise WeightsNotFoundError(str(exc).replace("patch encoder", "slide encoder")) from exc

    def build(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: ResolvedWeights | None = None,
    ) -> nn.Module | None:
        """The model in eval mode on ``device``/``dtype``; ``weights`` None = random init (tests, benchmarks)."""
        self.check_available()
        assert self.build_fn is not None
        try:
            model = self.build_fn(self, torch.device("cpu"), torch.float32, weights)
        except ImportError as exc:
            raise EncoderUnavailableError(
                f"Slide encoder {self.name!r}: building the architecture failed on a missing import ({exc})."
                + (f" Install: {self.install_hint}" if self.install_hint else "")
            ) from exc
        if model is None:
            return None
        model.eval().requires_grad_(False)
        return model.to(device=torch.device(device), dtype=dtype)

    def forward(self, model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
        """(N, D) features + (N, 2) level-0 coords -> (D_out,) slide embedding."""
        assert self.forward_fn is not None
        out = self.forward_fn(model, features, coords, int(patch_size_level0))
        if not isinstance(out, Tensor):
            raise SlideEncoderError(f"Slide encoder {self.name!r}: forward returned {type(out).__name__}")
        return out.reshape(-1)


def library_versions(spec: SlideEncoderSpec) -> dict[str, str]:
    """Installed versions of torch and of the packages holding the architecture."""
    out: dict[str, str] = {}
    dists = {"torch", "numpy", *(m.replace("_", "-") for m in spec.requires)}
    if spec.library == "remote-code":
        dists.add("transformers")
    for dist in sorted(dists):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError, ValueError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _as_features(features: Any) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise SlideEncoderError(f"patch features must be (N, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise SlideEncoderError(f"patch features must be floating point, got {arr.dtype}")
    return arr


class SlideEncoder:
    """A loaded slide encoder: (N, D) patch features + (N, 2) level-0 coords in, float32 (D_out,) out."""

    def __init__(
        self,
        spec: SlideEncoderSpec,
        model: nn.Module | None,
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        weights: ResolvedWeights | None = None,
        sha256: str | None = None,
        random_weights: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of float32, float16, bfloat16; got {precision!r}")
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        self.precision = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[self.dtype]
        self.weights = weights
        self.weights_sha256 = sha256
        self.random_weights = random_weights
        self._autocast = self.dtype != torch.float32 and self.device.type == "cpu"
        if model is not None:
            model = model.eval().requires_grad_(False).to(self.device)
            if self.dtype != torch.float32 and not self._autocast:
                model = model.to(self.dtype)
        self.model = model
        self.library_versions = library_versions(spec)

    @classmethod
    def load(
        cls,
        encoder: str | SlideEncoderSpec,
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        weights: WeightsArg = None,
        weights_dir: str | os.PathLike | None = None,
        hf_cache_dir: str | os.PathLike | None = None,
        random_weights: bool = False,
        registry: Mapping[str, SlideEncoderSpec] | None = None,
    ) -> SlideEncoder:
        """Resolve (offline) and load a slide encoder by name or spec.

        ``random_weights=True`` builds the authors' architecture with random initialization (tests,
        memory benchmarks); its embeddings are meaningless and its attrs say so.
        """
        if isinstance(encoder, SlideEncoderSpec):
            spec = encoder
        else:
            from .registry import get_slide_encoder_spec

            spec = get_slide_encoder_spec(encoder, registry)
        spec.check_available()
        resolved = None
        if spec.needs_weights and not random_weights:
            resolved = spec.resolve(weights, weights_dir, hf_cache_dir=hf_cache_dir)
        sha = weights_sha256(resolved) if resolved is not None else None
        model = spec.build("cpu", torch.float32, weights=resolved)
        return cls(
            spec, model, device=device, precision=precision, weights=resolved, sha256=sha, random_weights=random_weights
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def check_compatible(self, patch_encoder: str, patch_size: int, target_magnification: float) -> None:
        """See :meth:`SlideEncoderSpec.check_compatible`."""
        self.spec.check_compatible(patch_encoder, patch_size, target_magnification)

    def output_dim(self, input_dim: int) -> int:
        return self.spec.dim or int(input_dim)

    @torch.inference_mode()
    def encode(self, features: Any, coords: Any = None, patch_size_level0: int | None = None) -> np.ndarray:
        """Slide embedding (D_out,) float32 of one slide's patch features."""
        x, coords_t, psl0 = self._inputs(features, coords, patch_size_level0)
        with self._precision_context():
            out = self.spec.forward(self.model, self._cast(x), coords_t, psl0)
        return self._output(out, x.shape[1])

    @property
    def has_case_model(self) -> bool:
        """True when the model aggregates a patient's slides itself (e.g. MOOZY's case transformer)."""
        return self.spec.case_forward_fn is not None

    @torch.inference_mode()
    def encode_case(self, slides: list[tuple[Any, Any, int | None]]) -> np.ndarray:
        """Patient embedding (D_out,) from the (features, coords, patch_size_level0) of each slide of a case.

        The model's own case-level aggregator when it has one, else the mean of the slide embeddings.
        """
        if not slides:
            raise SlideEncoderError("a case needs at least one slide")
        if self.spec.case_forward_fn is None:
            return np.mean([self.encode(*s) for s in slides], axis=0).astype(np.float32)
        inputs = [self._inputs(*s) for s in slides]
        with self._precision_context():
            out = self.spec.case_forward_fn(self.model, [(self._cast(x), c, p) for x, c, p in inputs])
        return self._output(out, inputs[0][0].shape[1])

    def _inputs(self, features: Any, coords: Any, patch_size_level0: int | None) -> tuple[Tensor, Tensor, int]:
        """Validated float32 features and int64 coords on the device, and the level-0 patch size."""
        feats = _as_features(features)
        n = feats.shape[0]
        if n == 0:
            raise SlideEncoderError(
                f"slide has 0 patches: slide encoder {self.name!r} needs at least one patch feature "
                "(check the tissue mask and --min-tissue-fraction)"
            )
        if self.spec.input_dim is not None and feats.shape[1] != self.spec.input_dim:
            raise SlideEncoderMismatchError(
                f"Slide encoder {self.name!r} expects {self.spec.input_dim}-dim features from "
                f"{self.spec.patch_encoder!r}, got {feats.shape[1]}-dim features; compute "
                f"features/{self.spec.patch_encoder} first."
            )
        if self.spec.needs_coords:
            if coords is None or patch_size_level0 is None:
                raise SlideEncoderError(f"slide encoder {self.name!r} needs the patch coords and patch_size_level0")
            xy = np.asarray(coords)
            if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != n:
                raise SlideEncoderError(f"coords must be ({n}, 2) level-0 (x, y), got shape {xy.shape}")
            if int(patch_size_level0) <= 0:
                raise SlideEncoderError(f"patch_size_level0 must be positive, got {patch_size_level0}")
            coords_t = torch.from_numpy(np.ascontiguousarray(xy[:, :2], dtype=np.int64))
        else:
            coords_t = torch.zeros((n, 2), dtype=torch.int64)
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise SlideEncoderError(f"patch features for {self.name!r} contain NaN or inf")
        return x.to(self.device), coords_t.to(self.device), int(patch_size_level0 or 0)

    def _precision_context(self) -> Any:
        if self._autocast:
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _cast(self, x: Tensor) -> Tensor:
        if not self._autocast and self.model is not None and self.dtype != torch.float32:
            return x.to(self.dtype)
        return x

    def _output(self, out: Tensor, input_dim: int) -> np.ndarray:
        emb = out.float().cpu().numpy().astype(np.float32, copy=False)
        expected = self.output_dim(input_dim)
        if emb.shape != (expected,):
            raise SlideEncoderError(
                f"Slide encoder {self.name!r} produced shape {emb.shape}, expected ({expected},); "
                "the weights/config do not match the registry entry."
            )
        return emb

    def attrs(self, source_patch_encoder: str | None = None) -> dict[str, Any]:
        """Provenance for storage attributes (JSON-serializable)."""
        if self.random_weights:
            source = "random"
        elif self.weights is not None:
            source = self.weights.source
        else:
            source = ""
        return {
            **self.spec.describe(),
            "source_patch_encoder": source_patch_encoder or self.spec.patch_encoder or "",
            "weights_sha256": self.weights_sha256 or "",
            "weights_source": source,
            "weights_file": self.weights.path.name if self.weights else "",
            "precision": self.precision,
            "library_versions": self.library_versions,
        }

    def __repr__(self) -> str:
        sha = "random" if self.random_weights else (self.weights_sha256 or "none")[:12]
        return f"SlideEncoder({self.name!r}, {self.device}, {self.precision}, sha256={sha})"


__all__ = ["SlideEncoder", "SlideEncoderSpec", "format_mag"]
