"""Built-in parameter-free slide encoders: mean and max pooling over any patch encoder's features."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def build_pooling(spec, device: torch.device, dtype: torch.dtype, weights) -> nn.Module | None:
    return None  # nothing to build


def mean_forward(model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
    # accumulate in float64: a sum over 100k patches keeps full float32 accuracy
    return features.to(torch.float64).mean(dim=0).to(torch.float32)


def max_forward(model: nn.Module | None, features: Tensor, coords: Tensor, patch_size_level0: int) -> Tensor:
    return features.amax(dim=0).to(torch.float32)
