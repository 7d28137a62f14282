"""Cross-layer KV merging for the deeper half of the layers (MiniCache, arXiv 2405.14366).

Layers ``start, start+1``, ``start+2, start+3``, ... form pairs. For every cached token and KV
head, the two layers' key vectors are stored as one shared direction (SLERP at t = 1/2 of the
two unit vectors, which is the normalised sum) plus each layer's norm; values likewise. Each
layer is rebuilt as ``norm * direction``. A token whose two layers point apart (cosine below
``retain_below`` for any row, head, K or V) is retained: stored exactly for both layers, which
is MiniCache's retention of hard-to-merge tokens.

Approximate, and known to fail: an independent RULER check (xKV paper) saw Qwen2.5-14B drop
from 93.4 to 13.8 at only 1.3x compression. Never a default; the harness stores its measured
error next to its compression (``nbytes``). Merging happens in ``end_step`` (after the step's
attention), so a step always attends to its own exact new keys.

Stored order per layer: retained tokens, then merged tokens, then the step's new tokens; the
padding mask follows that order (see ``common.py`` for why any order of cached keys is fine).
"""

from __future__ import annotations

import torch

from qwen3_vl.optim.kv_cache.common import KVShape, extend_valid, tensor_bytes
from qwen3_vl.optim.plan import Optimization


def merge_pair(a: torch.Tensor, b: torch.Tensor):
    """a, b [B, H, n, d] -> shared unit direction [B, H, n, d], norms [B, H, n, 2], cosine [B, H, n]."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(dim=-1, keepdim=True), b32.norm(dim=-1, keepdim=True)
    ua, ub = a32 / na.clamp(min=1e-12), b32 / nb.clamp(min=1e-12)
    both = ua + ub
    direction = both / both.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return direction.to(a.dtype), torch.cat([na, nb], dim=-1), (ua * ub).sum(-1)


class PairStore:
    """The cached tokens of one layer pair: retained exactly, merged as direction + norms."""

    def __init__(self) -> None:
        self.retained: list[torch.Tensor | None] = [None] * 4  # k_a, v_a, k_b, v_b  [B, H, r, d]
        self.direction: list[torch.Tensor | None] = [None] * 2  # k, v  [B, H, m, d]
        self.norms: list[torch.Tensor | None] = [None] * 2  # k, v  [B, H, m, 2] fp32
        self.valid: torch.Tensor | None = None  # [B, r + m] in stored order (None: all real)

    def rebuild(self, which: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cached k, v of the pair's first (0) or second (1) layer, in stored order."""
        out = []
        for kind in (0, 1):
            parts = [t for t in (self.retained[2 * which + kind],) if t is not None]
            if self.direction[kind] is not None:
                d = self.direction[kind]
                parts.append(d * self.norms[kind][..., which : which + 1].to(d.dtype))
            out.append(torch.cat(parts, dim=2) if parts else None)
        return out[0], out[1]

    def add(self, ka, va, kb, vb, new_valid: torch.Tensor | None, retain_below: float) -> None:
        dk, nk, ck = merge_pair(ka, kb)
        dv, nv, cv = merge_pair(va, vb)
        # A token is kept exact when any row, head, K or V disagrees between the two layers.
        keep = (torch.minimum(ck, cv) < retain_below).flatten(0, 1).any(dim=0)  # [n]
        merge = ~keep
        batch, n = ka.shape[0], ka.shape[2]
        valid = torch.ones(batch, n, dtype=torch.bool, device=ka.device) if new_valid is None else new_valid
        old_r = 0 if self.retained[0] is None else self.retained[0].shape[2]
        old_valid = self.valid
        if old_valid is None and new_valid is not None:
            old_valid = torch.ones(batch, self.count(), dtype=torch.bool, device=ka.device)
        for i, t in enumerate((ka, va, kb, vb)):
            self.retained[i] = _append(self.retained[i], t[:, :, keep])
        for i, (d, nrm) in enumerate(((dk, nk), (dv, nv))):
            self.direction[i] = _append(self.direction[i], d[:, :, merge])
            self.norms[i] = _append(self.norms[i], nrm[:, :, merge])
        if old_valid is not None:
            self.valid = torch.cat([old_valid[:, :old_r], valid[:, keep], old_valid[:, old_r:], valid[:, merge]], 1)

    def count(self) -> int:
        return sum(t.shape[2] for t in (self.retained[0], self.direction[0]) if t is not None)

    def nbytes(self) -> int:
        return tensor_bytes(*self.retained, *self.direction, *self.norms, self.valid)


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=2)


class CrossLayerCache:
    def __init__(self, shape: KVShape, start: int, retain_below: float) -> None:
        n = shape.num_layers
        self.start, self.retain_below = start, retain_below
        self.pair_count = (n - start) // 2
        self.merged_layers = set(range(start, start + 2 * self.pair_count))
        self.keys: list[torch.Tensor | None] = [None] * n  # exact layers only
        self.values: list[torch.Tensor | None] = [None] * n
        self.pairs = [PairStore() for _ in range(self.pair_count)]
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this step's keys of merged layers
        self.valid: torch.Tensor | None = None  # exact layers, [B, seen + new]
        self._new_mask: torch.Tensor | None = None
        self.seen_tokens = 0
        self._pending = 0

    def start_step(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        self.valid = extend_valid(self.valid, self.seen_tokens, new_mask, num_new)
        self._new_mask, self._pending = new_mask, num_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.merged_layers:
            if self.keys[layer] is not None:
                k = torch.cat([self.keys[layer], k], dim=2)
                v = torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = k, v
            return k, v, self.valid
        self.new[layer] = (k, v)
        pair = self.pairs[(layer - self.start) // 2]
        ck, cv = pair.rebuild((layer - self.start) % 2)
        valid = extend_valid(pair.valid, pair.count(), self._new_mask, self._pending)
        if ck is None:
            return k, v, valid
        return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), valid

    def end_step(self) -> None:
        for index, pair in enumerate(self.pairs):
            a = self.start + 2 * index
            if a in self.new and a + 1 in self.new:
                (ka, va), (kb, vb) = self.new[a], self.new[a + 1]
                new_valid = None if self._new_mask is None else self._new_mask.bool()
                pair.add(ka, va, kb, vb, new_valid, self.retain_below)
        self.new.clear()
        self.seen_tokens += self._pending
        self._pending = 0

    def nbytes(self) -> int:
        return tensor_bytes(*self.keys, *self.values, self.valid) + sum(p.nbytes() for p in self.pairs)


class CrossLayerFactory:
    name = "cross_layer"

    def __init__(self, shape: KVShape, start: int, retain_below: float) -> None:
        start = shape.num_layers // 2 if start < 0 else start
        if not 0 <= start < shape.num_layers:
            raise ValueError(f"cross_layer start {start} is outside the {shape.num_layers} layers")
        self.shape, self.start, self.retain_below = shape, start, retain_below

    def new(self, batch: int, max_tokens: int) -> CrossLayerCache:
        return CrossLayerCache(self.shape, self.start, self.retain_below)


OPTION = Optimization(
    name="cross_layer",
    axis="kv_cache",
    exact=False,
    summary="MiniCache: adjacent deep layers share one KV direction per token (+ per-layer norms); "
    "hard-to-merge tokens kept exact. Known to collapse on Qwen-class models; never a default.",
    build=lambda model, target, start=-1, retain_below=0.5: CrossLayerFactory(KVShape.of(model), start, retain_below),
    # Loose on purpose: this option is kept to *measure* how badly merging fails (pure merging on the
    # tiny preset: KL ~0.12, top-1 agreement ~15%); the harness stores the numbers.
    error_budget={"kl": 0.25, "top1_agreement": 0.1, "logits_rel": 1.0},
    defaults={"start": -1, "retain_below": 0.5},
    variants=({"start": -1, "retain_below": 0.5}, {"start": -1, "retain_below": -1.0}),
)
