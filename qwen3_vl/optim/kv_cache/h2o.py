"""Heavy-hitter oracle (H2O, arXiv 2306.14048): evict to a token budget by accumulated attention.

Fused attention kernels do not return probabilities, so the cache computes them itself: the
decoder calls ``cache.observe(layer, q, mask)`` right after ``update`` (the one hook in
``qwen3_vl/model/text.py``, taken only by caches with ``observes_queries = True``), and the cache
adds ``softmax(q k^T / sqrt(d))`` summed over query heads and queries to each key's score. After
the step (``end_step``) every layer keeps the last ``recent`` tokens and the ``budget - recent``
older tokens with the highest accumulated score.

Deviation from the paper: one selection per layer shared by all KV heads (the cache protocol has
one padding mask per layer), scored by the sum over heads; the paper selects per head.
"""

from __future__ import annotations

import torch

from qwen3_vl.optim.kv_cache.common import KVShape, extend_valid, gather_tokens, tensor_bytes
from qwen3_vl.optim.plan import Optimization

_QUERY_CHUNK = 256  # bounds the [B, Hq, chunk, Lk] score tensor during a long prefill


def attention_mass(q: torch.Tensor, k: torch.Tensor, mask) -> torch.Tensor:
    """Column sums of the attention probabilities: [B, Lk], summed over query heads and queries."""
    b, hq, lq, d = q.shape
    lk, groups = k.shape[2], hq // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)
    total = torch.zeros(b, lk, dtype=torch.float32, device=q.device)
    everything_visible = mask.key_valid is None and (not mask.causal or lq == 1)
    allowed = None if everything_visible else mask.allowed(lq, lk, q.device)  # [B or 1, 1, lq, lk]
    for start in range(0, lq, _QUERY_CHUNK):
        qc = q[:, :, start : start + _QUERY_CHUNK].float()
        scores = torch.matmul(qc, kf.transpose(-1, -2)) * d**-0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, :, start : start + _QUERY_CHUNK], float("-inf"))
        total += torch.softmax(scores, dim=-1).nan_to_num_(0.0).sum(dim=(1, 2))
    return total


class H2OCache:
    observes_queries = True

    def __init__(self, shape: KVShape, budget: int, recent: int) -> None:
        self.budget, self.recent = budget, recent
        n = shape.num_layers
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.scores: list[torch.Tensor | None] = [None] * n  # [B, cached + new] accumulated mass
        self.valid: list[torch.Tensor | None] = [None] * n  # per layer: selections differ by layer
        self._new_mask: torch.Tensor | None = None
        self.length = 0
        self.seen_tokens = 0
        self._pending = 0

    def start_step(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        self._new_mask, self._pending = new_mask, num_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.valid[layer] = extend_valid(self.valid[layer], self.length, self._new_mask, self._pending)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v, self.valid[layer]

    def observe(self, layer: int, q: torch.Tensor, mask) -> None:
        mass = attention_mass(q, self.keys[layer], mask)
        old = self.scores[layer]
        if old is not None:
            mass[:, : old.shape[1]] += old
        self.scores[layer] = mass

    def end_step(self) -> None:
        self.seen_tokens += self._pending
        self.length += self._pending
        self._pending = 0
        if self.length <= self.budget:
            return
        for layer, k in enumerate(self.keys):
            if k is None:
                continue
            index = self._select(layer, k.shape[0], k.device)
            self.keys[layer] = gather_tokens(k, index)
            self.values[layer] = gather_tokens(self.values[layer], index)
            self.scores[layer] = torch.gather(self.scores[layer], 1, index)
            if self.valid[layer] is not None:
                self.valid[layer] = torch.gather(self.valid[layer], 1, index)
        self.length = self.budget

    def _select(self, layer: int, batch: int, device) -> torch.Tensor:
        """[B, budget] slots to keep: the top-scored older tokens (in slot order), then the recent ones."""
        old = self.length - self.recent
        scores = self.scores[layer]
        if scores is None:  # observe was never called (no hook): keep the most recent tokens
            scores = torch.zeros(batch, self.length, device=device)
        older = scores[:, :old].clone()
        if self.valid[layer] is not None:
            older = older.masked_fill(~self.valid[layer][:, :old], float("-inf"))  # evict padding first
        heavy = older.topk(self.budget - self.recent, dim=1).indices.sort(dim=1).values
        recent = torch.arange(old, self.length, device=device).expand(batch, self.recent)
        return torch.cat([heavy, recent], dim=1)

    def nbytes(self) -> int:
        return tensor_bytes(*self.keys, *self.values, *self.scores, *self.valid)


class H2OFactory:
    name = "h2o"

    def __init__(self, shape: KVShape, budget: int, recent: int) -> None:
        if not 0 <= recent <= budget or budget < 1:
            raise ValueError(f"h2o needs 0 <= recent <= budget and budget >= 1, got budget={budget}, recent={recent}")
        self.shape, self.budget, self.recent = shape, budget, recent

    def new(self, batch: int, max_tokens: int) -> H2OCache:
        return H2OCache(self.shape, self.budget, self.recent)


OPTION = Optimization(
    name="h2o",
    axis="kv_cache",
    exact=False,
    summary="H2O: keep `recent` newest tokens plus the heaviest older tokens by accumulated attention, "
    "`budget` tokens per layer.",
    build=lambda model, target, budget=1024, recent=512: H2OFactory(KVShape.of(model), budget, recent),
    # Exact until the sequence outgrows the budget; the budget holds while >= 85% of the tokens are
    # kept (measured as for sink_window, on random weights: the worst case for eviction).
    error_budget={"kl": 0.02, "top1_agreement": 0.8, "logits_rel": 0.5},
    defaults={"budget": 1024, "recent": 512},
    variants=({"budget": 1024, "recent": 512}, {"budget": 256, "recent": 128}),
)
