"""Generated attention inputs and the checks every attention option must pass against eager.

Inputs are made on the CPU (seeded) and moved to ``QWEN3VL_TEST_DEVICE`` (default cpu), so the same
contracts run on a GPU: ``QWEN3VL_TEST_DEVICE=cuda python -m pytest tests/optim/attention``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from qwen3_vl.hardware.device import target_for
from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim.attention.eager import EagerAttention

EXACT_FP32 = 1e-5
EAGER = EagerAttention()
DEVICE = os.environ.get("QWEN3VL_TEST_DEVICE", "cpu")
TARGET = target_for(DEVICE)  # fp32; the real compute capability on a GPU


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@dataclass
class TextCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: AttentionMask
    scale: float

    def __repr__(self) -> str:
        kv = None if self.mask.key_valid is None else self.mask.key_valid.int().tolist()
        return (f"TextCase(q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, causal={self.mask.causal}, "
                f"key_valid={kv})")

    def to(self, dtype: torch.dtype) -> TextCase:
        return TextCase(self.q.to(dtype), self.k.to(dtype), self.v.to(dtype), self.mask, self.scale)


@st.composite
def text_cases(draw, head_dims=(16, 64, 72, 128), max_len: int = 70) -> TextCase:
    """GQA ratios 1-8, q_len < kv_len (a cache), decode, padding anywhere (incl. rows that see nothing)."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    d = draw(st.sampled_from(head_dims))
    lk = draw(st.integers(1, max_len))
    lq = draw(st.sampled_from(["prefill", "decode", "chunk"]))
    lq = {"prefill": lk, "decode": 1}.get(lq) or draw(st.integers(1, lk))
    causal = draw(st.booleans()) if lq == lk else True
    padding = draw(st.sampled_from(["none", "left", "random"]))
    key_valid = None
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if padding == "left":
        pads = [draw(st.integers(0, lk - 1)) for _ in range(batch)]
        key_valid = torch.arange(lk)[None, :] >= torch.tensor(pads)[:, None]
    elif padding == "random":
        key_valid = torch.rand(batch, lk, generator=gen) > 0.3
    shape = lambda h, n: (batch, h, n, d)
    # Scores of a real model are peaky; scale up so softmax is far from uniform.
    spread = draw(st.sampled_from([1.0, 4.0]))
    q = torch.randn(shape(kv_heads * groups, lq), generator=gen) * spread
    k = torch.randn(shape(kv_heads, lk), generator=gen)
    v = torch.randn(shape(kv_heads, lk), generator=gen)
    # Real calls pass q/k/v as transposed views of [B, L, H, d] projections: keep that layout.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE) for t in (q, k, v))
    key_valid = None if key_valid is None else key_valid.to(DEVICE)
    return TextCase(q, k, v, AttentionMask(key_valid, causal), d**-0.5)


@dataclass
class VisionCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    scale: float

    def __repr__(self) -> str:
        return f"VisionCase(q={tuple(self.q.shape)}, cu_seqlens={self.cu_seqlens.tolist()})"


@st.composite
def vision_cases(draw, head_dims=(16, 64, 72)) -> VisionCase:
    """Ragged image segments (and runs of equal ones, like video frames)."""
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    if draw(st.booleans()):
        lengths = lengths[:1] * len(lengths)
    heads = draw(st.integers(1, 4))
    d = draw(st.sampled_from(head_dims))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = sum(lengths)
    qkv = torch.randn(s, 3, heads, d, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(1)  # strided views, as the ViT's qkv projection gives them
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return VisionCase(q * 2, k, v, cu, d**-0.5)


def text_error(attention, case: TextCase) -> float:
    """fp32 relative error of ``attention.text`` against eager on every query row."""
    out = attention.text(case.q, case.k, case.v, case.mask, case.scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert torch.isfinite(out).all()
    return rel_error(out, EAGER.text(case.q, case.k, case.v, case.mask, case.scale))


def vision_error(attention, case: VisionCase) -> float:
    out = attention.vision(case.q, case.k, case.v, case.cu_seqlens, case.scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    return rel_error(out, EAGER.vision(case.q, case.k, case.v, case.cu_seqlens, case.scale))


def low_precision_ok(attention, case: TextCase, dtype: torch.dtype) -> tuple[float, float]:
    """The FlashAttention rule: error vs an fp32 reference at most 2x eager's own in ``dtype``
    (plus a small floor for near-zero reference errors). fp32, not fp64: eager's fp64 masked rows
    overflow to -inf in its fp32 softmax."""
    ref = EAGER.text(case.q.float(), case.k.float(), case.v.float(), case.mask, case.scale)
    low = case.to(dtype)
    ours = rel_error(attention.text(low.q, low.k, low.v, low.mask, low.scale), ref)
    eager = rel_error(EAGER.text(low.q, low.k, low.v, low.mask, low.scale), ref)
    return ours, eager
