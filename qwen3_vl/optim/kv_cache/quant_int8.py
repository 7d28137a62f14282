"""KIVI-style int8 KV cache: keys per channel, values per token, a recent window in full precision."""

from __future__ import annotations

from qwen3_vl.optim.kv_cache.common import KVShape
from qwen3_vl.optim.kv_cache.kivi import QuantizedCacheFactory
from qwen3_vl.optim.plan import Optimization

OPTION = Optimization(
    name="quant_int8",
    axis="kv_cache",
    exact=False,
    summary="KV quantized to int8 (KIVI: keys per channel over token blocks, values per token); "
    "the last `residual` tokens stay in full precision.",
    build=lambda model, target, group=32, residual=128: QuantizedCacheFactory(
        "quant_int8", KVShape.of(model), 8, group, residual
    ),
    error_budget={"logits_rel": 0.02, "kl": 1e-3, "top1_agreement": 0.95},
    defaults={"group": 32, "residual": 128},
    variants=({"group": 32, "residual": 128}, {"group": 32, "residual": 0}),
)
