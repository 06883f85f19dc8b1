"""Memory-safe self-attention with a 2-D ALiBi bias (TITAN, MOOZY).

Both models add ``slope_h * distance(token_i, token_j)`` to the attention logits. Their reference
code materializes that bias as a dense (heads, N, N) tensor (TITAN even builds the distances as an
N×N float64 numpy array first: ~20 GB of distances plus ~40 GB of coordinate differences at 50k
patches). Here the bias is built one block of query rows at a time and attention runs on that
block against all keys, so no N×N tensor ever exists; peak extra memory is about
``max_elements`` floats per temporary. The result equals the dense computation up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_MAX_ELEMENTS = 1 << 25  # per (heads, rows, keys) temporary: 128 MiB in float32


def alibi_slopes(num_heads: int) -> list[float]:
    """Positive ALiBi slopes (Press et al.), as TITAN's and MOOZY's code compute them."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    nearest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(nearest) + power_of_2(2 * nearest)[0::2][: num_heads - nearest]


def chunk_rows(num_heads: int, num_tokens: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """Query rows per block so that one (heads, rows, tokens) temporary holds at most ``max_elements``."""
    return max(1, int(max_elements) // max(1, num_heads * num_tokens))


def alibi_bias_rows(
    points: Tensor, start: int, stop: int, slopes: Tensor, n_prefix: int, *, out: Tensor | None = None
) -> Tensor:
    """Bias rows ``[start, stop)``: (heads, rows, tokens) = ``slopes[h] * |p_i - p_j|``.

    ``points`` (tokens, 2) float32 are the token positions; the first ``n_prefix`` tokens (CLS,
    registers) get zero bias in their rows and columns. ``slopes`` carry their sign (negative
    slopes penalize distance). ``out`` (heads, >= rows, tokens) is reused when given.
    """
    x, y = points[:, 0], points[:, 1]
    dist = (x[start:stop, None] - x[None, :]).square_()
    dist += (y[start:stop, None] - y[None, :]).square_()
    dist.sqrt_()
    rows = stop - start
    if out is None:
        bias = slopes.view(-1, 1, 1) * dist.unsqueeze(0)
    else:
        bias = out[:, :rows]
        torch.mul(dist.unsqueeze(0), slopes.view(-1, 1, 1).to(out.dtype), out=bias)
    if n_prefix:
        bias[:, :, :n_prefix] = 0
        if start < n_prefix:
            bias[:, : n_prefix - start] = 0
    return bias


def alibi_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    points: Tensor,
    slopes: Tensor,
    *,
    n_prefix: int = 1,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """``softmax(q k^T / sqrt(d) + alibi) v`` for q, k, v of shape (1, heads, tokens, head_dim).

    The bias is never materialized for all tokens at once: each block of query rows builds its own
    (heads, rows, tokens) bias from ``points`` (see :func:`alibi_bias_rows`) into one reused buffer.
    """
    if q.shape[0] != 1:
        raise ValueError(f"alibi_attention handles one slide at a time, got batch {q.shape[0]}")
    heads, tokens = q.shape[1], q.shape[2]
    points = points.to(device=q.device, dtype=torch.float32)
    slopes = slopes.to(device=q.device, dtype=torch.float32).reshape(heads)
    rows = min(tokens, chunk_rows(heads, tokens, max_elements))
    buf = torch.empty((heads, rows, tokens), device=q.device, dtype=q.dtype)  # reused: no page faults per block
    out = torch.empty_like(q)
    for start in range(0, tokens, rows):
        stop = min(tokens, start + rows)
        bias = alibi_bias_rows(points, start, stop, slopes, n_prefix, out=buf)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=bias.unsqueeze(0))
    return out
