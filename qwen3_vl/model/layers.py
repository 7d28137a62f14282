"""Small building blocks shared by the vision and text towers.

Weights may be stored in a narrower dtype than the activations ("fp16 storage, fp32 compute",
what a Pascal GPU needs), so every layer casts its weight to the activation dtype at use; when
the dtypes already match the cast is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CAST_BLOCK_BYTES = 64 << 20  # most bytes of a weight cast to the compute dtype at once


class Linear(nn.Linear):
    """nn.Linear that computes in the input's dtype whatever the weight's storage dtype.

    A weight stored narrower than the input is cast at use; one larger than ``CAST_BLOCK_BYTES`` once
    cast is cast and multiplied a block of output rows at a time, so the transient copy stays small
    (the fp32 copy of an 8b output matrix alone is 2.3 GiB: more than a 2 GiB card holds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if w.dtype == x.dtype:
            return F.linear(x, w, b)
        rows = max(1, CAST_BLOCK_BYTES // (w.shape[1] * x.element_size()))
        if w.shape[0] <= rows:
            return F.linear(x, w.to(x.dtype), b)
        return torch.cat([F.linear(x, w[i : i + rows].to(x.dtype), None if b is None else b[i : i + rows])
                          for i in range(0, w.shape[0], rows)], dim=-1)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * cast_back(x / sqrt(mean(x^2) + eps)), statistics in fp32 (Qwen3, weight is not 1+w)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dtype) * x32.to(dtype)


class RMSNorm(nn.Module):
    """``rms_norm`` with its weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x*cos + rotate_half(x)*sin (halves split at d/2); cos/sin broadcast against x."""
    return x * cos + rotate_half(x) * sin
