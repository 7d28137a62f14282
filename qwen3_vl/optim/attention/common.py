"""Pieces shared by the attention options (not an option itself; not registered).

- ``visible_mask``: the dense boolean mask a text call needs, or None when every key is visible.
- ``mean_value_rows``: what eager gives a query row that may see no key at all (a padding query):
  the softmax of a constant row is uniform, so the output is the mean of all values. Every option
  reproduces that so that logits agree with the reference at padded positions too.
- ``by_segment_length``: the vision encoder's block-diagonal attention without a Python loop per
  segment: segments are grouped by length and each group runs as one batch (images of one size
  and the frames of a video form a single call; no padding, no mask).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def visible_mask(mask, lq: int, lk: int, device: torch.device) -> torch.Tensor | None:
    """[B or 1, 1, lq, lk] bool, True where query may see key; None when everything is visible."""
    if mask.key_valid is None and (not mask.causal or lq == 1):
        return None
    return mask.allowed(lq, lk, device)


def empty_rows(allowed: torch.Tensor) -> torch.Tensor:
    """[B or 1, 1, lq, 1] bool: rows that see no key."""
    return ~allowed.any(dim=-1, keepdim=True)


def mean_value_rows(v: torch.Tensor, groups: int) -> torch.Tensor:
    """Eager's output for a row that sees nothing: the mean of all values, [B, Hq, 1, d]."""
    mean = v.float().mean(dim=2, keepdim=True)  # [B, Hkv, 1, d]
    b, h, _, d = mean.shape
    return mean[:, :, None].expand(b, h, groups, 1, d).reshape(b, h * groups, 1, d)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, L, d] -> [B, Hkv, G, L, d]: the query heads that share one KV head, side by side."""
    b, hq, n, d = q.shape
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, n, d)


def by_segment_length(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Block-diagonal attention over ``cu_seqlens`` for ``[S, H, d]`` inputs.

    ``attend(q, k, v)`` takes ``[n, H, L, d]`` (n segments of one length L) and returns the same
    shape; it is called once per distinct segment length.
    """
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in itertools.pairwise(bounds)]
    if len(set(lengths)) == 1:  # one image, or images/frames all of one size: a plain reshape
        n, length = len(lengths), lengths[0]
        s, h, d = q.shape
        split = [t.reshape(n, length, h, d).transpose(1, 2) for t in (q, k, v)]
        return attend(*split).transpose(1, 2).reshape(s, h, d)
    out = torch.empty_like(q)
    starts = torch.tensor(bounds[:-1], device=q.device)
    length_of = torch.tensor(lengths, device=q.device)
    for length in sorted(set(lengths)):
        rows = (starts[length_of == length][:, None] + torch.arange(length, device=q.device)).reshape(-1)
        n = rows.numel() // length
        split = [t.index_select(0, rows).view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
        out.index_copy_(0, rows, attend(*split).transpose(1, 2).reshape(rows.numel(), *q.shape[1:]))
    return out
