"""Building blocks: fp16/bf16 storage with fp32 compute casts large weights a block at a time."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_vl.model import layers
from qwen3_vl.model.layers import Linear


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 64), tokens=st.integers(1, 5),
       block=st.integers(1, 4096), bias=st.booleans(), storage=st.sampled_from([torch.float16, torch.bfloat16]))
def test_block_cast_equals_the_whole_cast(rows, cols, tokens, block, bias, storage):
    """Any block size gives the products of the whole-matrix cast (each output is the same dot product)."""
    generator = torch.Generator().manual_seed(rows * 1000 + cols)
    linear = Linear(cols, rows, bias=bias).to(storage)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, cols, generator=generator))
    x = torch.randn(2, tokens, cols, generator=generator)
    whole = torch.nn.functional.linear(x, linear.weight.float(), None if linear.bias is None else linear.bias.float())
    saved = layers.CAST_BLOCK_BYTES
    layers.CAST_BLOCK_BYTES = block
    try:
        out = linear(x)
    finally:
        layers.CAST_BLOCK_BYTES = saved
    assert out.shape == whole.shape and out.dtype == torch.float32
    assert ((out - whole).abs().max() / whole.abs().max().clamp_min(1e-30)).item() <= 1e-6


def test_a_large_weight_is_cast_in_blocks(monkeypatch):
    """The transient fp32 copy stays within the block: no cast of more rows than fit in it."""
    casts = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.dtype == torch.float32 and self.dtype == torch.float16:
            casts.append(out.numel() * 4)
        return out

    monkeypatch.setattr(layers, "CAST_BLOCK_BYTES", 64 * 4 * 10)  # ten rows of 64 fp32 values
    monkeypatch.setattr(torch.Tensor, "to", spy)
    linear = Linear(64, 95, bias=False).to(torch.float16)
    linear(torch.randn(1, 64))
    assert len(casts) == 10 and max(casts) <= layers.CAST_BLOCK_BYTES
