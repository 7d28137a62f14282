"""KIVI-style int4 KV cache (two codes per byte): keys per channel, values per token, a recent full-precision window."""

from __future__ import annotations

from qwen3_vl.optim.kv_cache.common import KVShape
from qwen3_vl.optim.kv_cache.kivi import QuantizedCacheFactory
from qwen3_vl.optim.plan import Optimization

OPTION = Optimization(
    name="quant_int4",
    axis="kv_cache",
    exact=False,
    summary="KV quantized to int4 (KIVI: keys per channel over token blocks, values per token); "
    "the last `residual` tokens stay in full precision.",
    build=lambda model, target, group=32, residual=128: QuantizedCacheFactory(
        "quant_int4", KVShape.of(model), 4, group, residual
    ),
    error_budget={"logits_rel": 0.2, "kl": 0.01, "top1_agreement": 0.85},
    defaults={"group": 32, "residual": 128},
    variants=({"group": 32, "residual": 128}, {"group": 32, "residual": 0}),
)
