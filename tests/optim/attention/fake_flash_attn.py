"""A stand-in for the flash-attn package with its documented semantics, computed with eager math.

It checks what the real kernels require of their inputs (last dimension contiguous, equal dtypes,
int32 ``cu_seqlens``, query heads a multiple of KV heads) and follows their conventions: tensors
``[B, L, H, d]`` (varlen: ``[total, H, d]``), causal masks aligned to the bottom-right corner,
GQA by head groups. It accepts fp32 as well as fp16/bf16 so that outputs can be compared to the
fp32 reference exactly; the real package's dtype limit is the option's declared requirement.
"""

from __future__ import annotations

import itertools

import torch

from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim.attention.eager import EagerAttention

_EAGER = EagerAttention()
calls: list[str] = []


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1, f"{name} must have contiguous last dimension"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must have the same dtype"
    assert q.shape[-2] % k.shape[-2] == 0, "number of query heads must be a multiple of KV heads"


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    _check(q, k, v)
    calls.append("flash_attn_func")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = _EAGER.text(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), AttentionMask(None, causal), scale)
    return out.transpose(1, 2).contiguous()


def flash_attn_with_kvcache(q, k_cache, v_cache, softmax_scale=None, causal=False, **_):
    calls.append("flash_attn_with_kvcache")
    return flash_attn_func(q, k_cache, v_cache, softmax_scale=softmax_scale, causal=causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, **_):
    _check(q, k, v)
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert cu_seqlens_q.device == q.device, "cu_seqlens must be on q's device"
    bounds = cu_seqlens_q.tolist()
    assert max_seqlen_q == max(b - a for a, b in itertools.pairwise(bounds))
    calls.append("flash_attn_varlen_func")
    return _EAGER.vision(q, k, v, cu_seqlens_q, softmax_scale)
