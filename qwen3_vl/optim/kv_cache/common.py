"""Pieces shared by the KV-cache options (no option of its own): padding masks, shapes, bytes.

Cached keys are stored after q/k-norm and RoPE, so a cached key carries its position with it.
Every key already in the cache precedes the queries of the current step, so all of them are
visible to every query of the step (``AttentionMask``: key ``j`` is visible to query ``i`` when
``j <= i + Lk - Lq``). That is why eviction and merging options may return the cached keys of a
layer in any order, as long as the new keys come last and ``key_valid`` follows the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3_vl.model.positions import InputError


class CacheFullError(InputError):
    """A step would write past the capacity a cache was created with."""


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model) -> KVShape:
        t = model.config.text
        return cls(t.num_hidden_layers, t.num_key_value_heads, t.head_dim)


def extend_valid(old: torch.Tensor | None, old_len: int, new_mask: torch.Tensor | None, num_new: int):
    """Append the padding mask of ``num_new`` tokens to ``old`` ([B, old_len] or None = all real).

    Stays None while nothing is padding, like the reference cache.
    """
    if new_mask is None and old is None:
        return None
    ref = new_mask if new_mask is not None else old
    batch, device = ref.shape[0], ref.device
    if old is None:
        old = torch.ones(batch, old_len, dtype=torch.bool, device=device)
    new = torch.ones(batch, num_new, dtype=torch.bool, device=device) if new_mask is None else new_mask.bool()
    return torch.cat([old, new.to(old.device)], dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d], index [B, K] -> [B, H, K, d] (the same tokens for every head of a row)."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
