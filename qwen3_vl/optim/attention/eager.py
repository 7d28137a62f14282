"""Eager attention: explicit scores, fp32 softmax, GQA by repeating KV heads. The reference."""

from __future__ import annotations

import itertools

import torch

from qwen3_vl.optim.plan import Optimization


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, d] -> [B, Hkv * groups, L, d], each KV head repeated for its query group."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def softmax_attention(q, k, v, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with the softmax in fp32, as transformers' eager path."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def grouped_softmax_attention(q, k, v, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``softmax_attention`` of [B, Hq, Lq, d] queries over [B, Hkv, Lk, d] keys without repeating the KV
    heads: each KV head's query group as the rows of one product (the same dot products and softmax; no
    copy of K and V per call, which for a decode step over a long cache is most of its attention bytes).
    ``allowed``: [B or 1, 1, Lq, Lk] or None."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    if allowed is not None:  # a query head's rows keep their query's mask
        allowed = allowed[:, :, None].expand(-1, -1, groups, -1, -1).reshape(allowed.shape[0], 1, groups * lq, -1)
    return softmax_attention(q.reshape(b, hkv, groups * lq, d), k, v, allowed, scale).view(b, hq, lq, d)


class EagerAttention:
    name = "eager"

    def text(self, q, k, v, mask, scale: float) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        lq, lk = q.shape[2], k.shape[2]
        everything_visible = mask.key_valid is None and (not mask.causal or lq == 1)
        allowed = None if everything_visible else mask.allowed(lq, lk, q.device)
        return softmax_attention(q, k, v, allowed, scale)

    def vision(self, q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
        bounds = cu_seqlens.tolist()
        outs = []
        for start, end in itertools.pairwise(bounds):
            seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, n, d]
            outs.append(softmax_attention(*seg, None, scale).transpose(0, 1))
        return torch.cat(outs, dim=0)


OPTION = Optimization(
    name="eager",
    axis="attention",
    exact=True,
    reference=True,
    summary="Reference attention: explicit score matrix, fp32 softmax, per-image loop in the ViT.",
    build=lambda model, target: EagerAttention(),
)
