"""Checks of a plan before any work: devices this machine has, weights of every encoder (all the
missing ones listed at once), local checkpoints, and lattices that would not fit in memory.
Each returns one-line problems; callers refuse the run with all of them (CLI exit code 2)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable
from typing import Any

from ..params import ref
from .compute import ModelParams
from .runner import StagePlan

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device_problem(device: str, what: str = "device") -> str | None:
    """Why `device` cannot be used on this machine (None: it can)."""
    if not device or device == "cpu":
        return None
    if not _DEVICE.match(device):
        return f"{what} {device!r} is not a device: use cpu, cuda, cuda:<index> or mps"
    if importlib.util.find_spec("torch") is None:
        return f"{what} {device!r} needs PyTorch (install the `features` extra); use cpu"
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"{what} {device!r}: this machine has no CUDA GPU (torch.cuda.is_available() is False); use cpu"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    if device == "mps" and not torch.backends.mps.is_available():
        return f"{what} 'mps' is not available on this machine; use cpu"
    return None


def weight_problems(encoders: Iterable[str], slide_encoders: Iterable[str], models: ModelParams) -> list[str]:
    """One line per encoder that cannot be loaded here (missing code or missing weights)."""
    from ..encoders import encoder_registry, resolve_weights
    from ..encoders.weights import explicit_for
    from ..slide_encoders import get_slide_encoder_spec

    problems: list[str] = []
    registry = encoder_registry(tuple(models.plugins))
    weights_dir = models.weights_dir or None
    for name in dict.fromkeys(encoders):
        spec = registry.spec(name)
        try:
            spec.check_available()
            if spec.needs_weights or explicit_for(models.encoder_weights or None, spec.name) is not None:
                resolve_weights(spec, models.encoder_weights or None, weights_dir)
        except Exception as e:
            problems.append(f"features/{name}: {' '.join(str(e).split())}")
    for name in dict.fromkeys(slide_encoders):
        spec = get_slide_encoder_spec(name)
        try:
            spec.check_available()
            if spec.needs_weights and not models.random_slide_weights:
                spec.resolve(models.slide_encoder_weights or None, weights_dir)
        except Exception as e:
            problems.append(f"slide_features/{name}: {' '.join(str(e).split())}")
    return problems


def plan_problems(plan: StagePlan, models: ModelParams) -> list[str]:
    """Everything wrong with a plan that can be known before opening a slide."""
    problems = []
    compute = plan.compute
    models_run = bool(plan.encoders or plan.targets)
    checks = [("device", plan.mask is not None or models_run), ("feature_device", models_run)]
    for field, used in checks:
        why = device_problem(getattr(compute, field), ref("compute", field)) if used else None
        if why:
            problems.append(why)
    mask = plan.mask
    if mask is not None and mask.method == "sam2":
        ckpt = mask.sam2_checkpoint
        if not ckpt:
            need = ref("tissue_mask", "sam2_checkpoint")
            problems.append(f"{ref('tissue_mask', 'method')} sam2 needs a local checkpoint: {need} (never downloaded)")
        elif not os.path.isfile(ckpt):
            problems.append(f"{ref('tissue_mask', 'sam2_checkpoint')}: no such file: {ckpt}")
    if plan.encoders or plan.targets:
        problems += weight_problems(plan.encoders, {t.slide_encoder for t in plan.targets}, models)
    return problems


def lattice_positions(info: Any, layout: Any) -> int:
    """Patch positions of the slide-global lattice at the run's geometry (before any filtering)."""
    from .coords import layout_geometry

    g = layout_geometry(info, layout)
    nx = max(0, (info.width - g.patch_size_level0) // g.step_size_level0 + 1)
    ny = max(0, (info.height - g.patch_size_level0) // g.step_size_level0 + 1)
    return int(nx) * int(ny)
