"""Test-only options with planted faults (and honest ones to compare against).

Each is a small change a real bug could make: a softmax scale off by 5%, a mask that lets queries see
the future, a result that depends on the batch size, a KV cache that swaps its last two key slots.
"""

from __future__ import annotations

import torch

from qwen3_vl.model.positions import InputError
from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim.attention.eager import EagerAttention
from qwen3_vl.optim.kv_cache.dynamic import DynamicCache, DynamicCacheFactory
from qwen3_vl.optim.plan import Optimization, Requirements


class ScaledAttention(EagerAttention):
    """Eager attention with the softmax scale multiplied by ``factor`` (1.0: exactly the reference)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def text(self, q, k, v, mask, scale):
        return super().text(q, k, v, mask, scale * self.factor)


class NonCausalAttention(EagerAttention):
    def text(self, q, k, v, mask, scale):
        return super().text(q, k, v, AttentionMask(mask.key_valid, causal=False), scale)


class BatchDependentAttention(EagerAttention):
    """Correct for one sequence; the scale drifts with the batch size (a per-batch statistic)."""

    def text(self, q, k, v, mask, scale):
        return super().text(q, k, v, mask, scale * (1 + 0.05 * (q.shape[0] - 1)))


class SingleRowAttention(EagerAttention):
    """Correct, but declines batches of more than one row (a declared limitation, not a fault)."""

    def text(self, q, k, v, mask, scale):
        if q.shape[0] > 1:
            raise InputError("single_row attention does not support batches; run the rows separately")
        return super().text(q, k, v, mask, scale)


class SwappedCache(DynamicCache):
    """Decode steps write the new key one slot early: the last two key slots trade places."""

    def update(self, layer, k, v):
        fresh = self.keys[layer] is None
        keys, values, valid = super().update(layer, k, v)
        if not fresh and k.shape[2] == 1:
            keys = torch.cat([keys[:, :, :-2], keys[:, :, -1:], keys[:, :, -2:-1]], dim=2)
        return keys, values, valid


class SwappedCacheFactory(DynamicCacheFactory):
    def new(self, batch, max_tokens):
        return SwappedCache(self.num_layers)


def attention(name: str, runtime) -> Optimization:
    return Optimization(name=name, axis="attention", exact=True, summary=f"test-only: {name}",
                        build=lambda model, target: runtime())


def scaled(name: str, factor: float, exact: bool = True, budget=None) -> Optimization:
    return Optimization(name=name, axis="attention", exact=exact, summary="test-only: scaled softmax",
                        build=lambda model, target: ScaledAttention(factor), error_budget=budget or {})


WRONG_SCALE = scaled("wrong_scale", 1.05)
HONEST_COPY = scaled("honest_copy", 1.0)
NON_CAUSAL = attention("non_causal", NonCausalAttention)
BATCH_DEPENDENT = attention("batch_dependent", BatchDependentAttention)
SINGLE_ROW = attention("single_row", SingleRowAttention)
SWAPPED_CACHE = Optimization(name="swapped", axis="kv_cache", exact=True, summary="test-only: swapped key slots",
                             build=lambda model, target: SwappedCacheFactory(model.config.text.num_hidden_layers))
GPU_ONLY = Optimization(name="gpu_only", axis="attention", exact=True, summary="test-only: needs CUDA",
                        build=lambda model, target: EagerAttention(), requires=Requirements(devices=("cuda",)))
