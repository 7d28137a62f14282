"""Dynamic KV cache: per-layer K/V grown by concatenation, GQA heads stored unexpanded. The reference."""

from __future__ import annotations

import torch

from qwen3_vl.optim.plan import Optimization


class DynamicCache:
    """K/V per layer as [B, Hkv, L, d] after q/k-norm and RoPE, plus the key padding mask."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None  # [B, L] bool; None while nothing is padding
        self.seen_tokens = 0  # tokens already written (the next step's first cache index)
        self._pending = 0

    def start_step(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        """Register the padding mask of the ``num_new`` tokens about to be written."""
        if new_mask is not None or self.key_valid is not None:
            batch = (new_mask if new_mask is not None else self.key_valid).shape[0]
            device = (new_mask if new_mask is not None else self.key_valid).device
            old = self.key_valid
            if old is None:
                old = torch.ones(batch, self.seen_tokens, dtype=torch.bool, device=device)
            new = torch.ones(batch, num_new, dtype=torch.bool, device=device) if new_mask is None else new_mask.bool()
            self.key_valid = torch.cat([old, new.to(old.device)], dim=1)
        self._pending = num_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer], self.key_valid

    def end_step(self) -> None:
        self.seen_tokens += self._pending
        self._pending = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class DynamicCacheFactory:
    name = "dynamic"

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def new(self, batch: int, max_tokens: int) -> DynamicCache:
        return DynamicCache(self.num_layers)


OPTION = Optimization(
    name="dynamic",
    axis="kv_cache",
    exact=True,
    reference=True,
    summary="Reference KV cache: grows by concatenation every step.",
    build=lambda model, target: DynamicCacheFactory(model.config.text.num_hidden_layers),
)
