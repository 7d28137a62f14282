"""Static KV cache: one K and one V buffer per layer, preallocated to the maximum length, filled in place.

Exact: ``update`` writes the step's keys at ``[seen, seen + n)`` and returns views of the filled
prefix, so attention sees the same values as with the reference cache. Nothing is allocated per
step after the first ``update`` (the fixed addresses are also what CUDA graphs need).
"""

from __future__ import annotations

import torch

from qwen3_vl.optim.kv_cache.common import CacheFullError, KVShape, tensor_bytes
from qwen3_vl.optim.plan import Optimization


class StaticCache:
    def __init__(self, shape: KVShape, batch: int, max_tokens: int) -> None:
        self.shape, self.batch, self.max_tokens = shape, batch, max_tokens
        # One [B, Hkv, max_tokens, d] buffer per layer, allocated on first update. Not slices of one
        # [layers, ...] tensor: torch.compile functionalises an in-place write into a slice of a shared buffer
        # into a rewrite of the whole buffer (H200, 2b decode step: seven 29 MB rewrites per K and V, about
        # 0.5 of 2.58 ms), while a write into a buffer of its own stays a write of its rows.
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.valid: torch.Tensor | None = None  # [B, max_tokens] bool, allocated once padding is seen
        self.seen_tokens = 0
        self._pending = 0

    def start_step(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        end = self.seen_tokens + num_new
        if end > self.max_tokens:
            raise CacheFullError(
                f"static KV cache holds {self.max_tokens} tokens; this step would need {end} "
                f"({self.seen_tokens} cached + {num_new} new). Create the cache with a larger max_tokens."
            )
        if new_mask is not None and self.valid is None:
            self.valid = torch.ones(self.batch, self.max_tokens, dtype=torch.bool, device=new_mask.device)
        if self.valid is not None:
            self.valid[:, self.seen_tokens : end] = True if new_mask is None else new_mask.bool()
        self._pending = num_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys is None:
            s = self.shape
            size = (self.batch, s.kv_heads, self.max_tokens, s.head_dim)
            self.keys = [torch.zeros(size, dtype=k.dtype, device=k.device) for _ in range(s.num_layers)]
            self.values = [torch.zeros(size, dtype=v.dtype, device=v.device) for _ in range(s.num_layers)]
        start, end = self.seen_tokens, self.seen_tokens + self._pending
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        valid = None if self.valid is None else self.valid[:, :end]
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], valid

    def end_step(self) -> None:
        self.seen_tokens += self._pending
        self._pending = 0

    def nbytes(self) -> int:
        """Allocated bytes (the whole preallocated buffer, whatever is filled)."""
        return tensor_bytes(*(self.keys or ()), *(self.values or ()), self.valid)


class StaticCacheFactory:
    name = "static"

    def __init__(self, shape: KVShape) -> None:
        self.shape = shape

    def new(self, batch: int, max_tokens: int) -> StaticCache:
        return StaticCache(self.shape, batch, max_tokens)


OPTION = Optimization(
    name="static",
    axis="kv_cache",
    exact=True,
    summary="Preallocated KV buffers filled in place; views of the filled prefix, no per-step allocation.",
    build=lambda model, target: StaticCacheFactory(KVShape.of(model)),
)
