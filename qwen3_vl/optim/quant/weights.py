"""Weight-only quantized linear layers and embeddings, swapped in at load (gpt-fast style).

Shared by ``int8_weight`` and ``int4_weight`` (no option of its own). Quantization is symmetric:
int8 per output channel (``w ~ q * scale[n]``), int4 per group of ``group`` input channels
(``w ~ (q - 8) * scale[n, g]``, two codes per byte). The output matrix is quantized too, and a
tied input embedding shares its quantized storage (looked up row by row), so the tied matrix is
held once, in int8/int4.

How a quantized matmul runs is a *kernel*, picked per target by measurement (see the option
modules): every kernel computes the same quantized weights; they differ in activation precision
(fp32, bf16, or dynamically int8-quantized activations) and therefore in error and speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3_vl.model.layers import Linear

# Decode multiplies one row per sequence; prefill many. Kernels that quantize or round the
# activations are used only up to this many rows; bigger inputs are compute-bound anyway and
# take the exact-activation dequantizing path.
SMALL_BATCH_ROWS = 8


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> int8 [N, K] and fp32 scales [N] with w ~ q * scale (symmetric, per row)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> packed uint8 [N, K/2], fp32 scale and zero [N, K/group]; w ~ (q - 8) * scale + zero.

    Asymmetric min/max codes q in [0, 15] per group of ``group`` input channels (gpt-fast's
    convention, which ``torch._weight_int4pack_mm*`` also use); the even input channel of a byte
    sits in the low nibble.
    """
    n, k = w.shape
    w = w.float().view(n, k // group, group)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = lo + 8 * scale
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] codes in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def linear_in_row_blocks(x: torch.Tensor, rows: int, block: int, weight_rows) -> torch.Tensor:
    """``x @ W.T`` for a ``rows``-row weight that ``weight_rows(start, end)`` materializes ``block`` output
    rows at a time (dequantized into a temporary that stays small, or in cache on a CPU)."""
    out = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    for start in range(0, rows, block):
        end = min(rows, start + block)
        out[:, start:end] = F.linear(x, weight_rows(start, end))
    return out


def dequantize_int4(packed, scale, zero, group: int, dtype: torch.dtype) -> torch.Tensor:
    n = packed.shape[0]
    q = unpack_int4(packed).view(n, -1, group).to(dtype)
    return ((q - 8) * scale[..., None].to(dtype) + zero[..., None].to(dtype)).view(n, -1)


class QuantLinear(nn.Module):
    """A weight-only quantized ``Linear``; ``kernel`` names how the product is computed."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, kernel) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.kernel(self, x.reshape(-1, shape[-1]))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={getattr(self.kernel, '__name__', '?')}"


class QuantEmbedding(nn.Module):
    """Row lookup into a quantized matrix (shared with the tied output layer when there is one)."""

    def __init__(self, table: QuantLinear, dequantize_rows, shared: bool) -> None:
        super().__init__()
        if shared:
            self._shared = [table]  # held in a list so the output layer's storage is not registered twice
        else:
            self.table = table
        self.dequantize_rows = dequantize_rows
        self.embedding_dim = table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._shared[0] if hasattr(self, "_shared") else self.table
        return self.dequantize_rows(table, ids.reshape(-1)).view(*ids.shape, self.embedding_dim)


def quantizable_linears(model, include_vision: bool) -> list[tuple[nn.Module, str, Linear]]:
    """(parent, attribute, Linear) for every linear to quantize: text layers, output, optionally the ViT."""
    found = []
    for name, module in model.named_modules():
        if not include_vision and name.startswith("visual"):
            continue
        for child_name, child in module.named_children():
            if isinstance(child, Linear):
                found.append((module, child_name, child))
    return found


def swap_in(model, make_linear, dequantize_rows, include_vision: bool) -> dict:
    """Replace every quantizable Linear by ``make_linear(linear)``, and the input embedding by a
    lookup into the quantized output matrix when the two are tied (else quantize it on its own).
    Returns byte counts before and after."""
    before = _weight_bytes(model)
    tied = model.config.tie_word_embeddings
    embed = model.language_model.embed_tokens
    for parent, attr, linear in quantizable_linears(model, include_vision):
        setattr(parent, attr, make_linear(linear))
    if tied:
        model.language_model.embed_tokens = QuantEmbedding(model.lm_head, dequantize_rows, shared=True)
    else:
        table = Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
        table.weight = embed.weight
        model.language_model.embed_tokens = QuantEmbedding(make_linear(table), dequantize_rows, shared=False)
    return {"weight_bytes_before": before, "weight_bytes": _weight_bytes(model)}


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def linear_fallback(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)
