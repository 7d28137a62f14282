"""A quantized KV cache must keep its scales per key channel and per value token (KIVI's layout).

Runs under ``--suites numerics``, per combination. Why: trained models have a few key channels far
larger than the rest; a cache that shares one scale across the whole tensor (per-tensor instead of
per-channel) stays within its error budget on the tiny preset's random keys and ruins real ones. The
invariant is exact for per-channel key / per-token value quantization and for every cache that stores
what it is given (or a subset of it): the cache is driven as ``generate`` drives it (a prefill, then
one token per step, every layer) with random keys and values (the same in every layer, so caches that
compare layers decide alike both times), then again with every fifth key
channel and every fifth value token multiplied by 16 (a power of two, so the scaling is exact); what
it returns must be the first answer with exactly those channels and tokens scaled.
"""

from __future__ import annotations

import torch

from harness.results import Measurement

PART = "numerics"
FACTOR = 16.0
BOUND = 1e-4
PREFILL, STEPS = 40, 8  # crosses a 32-token quantization block


def _drive(cache, layers: int, keys: torch.Tensor, values: torch.Tensor):
    """Feed [L, B, H, T, d] keys/values as a prefill of PREFILL tokens and STEPS single-token steps;
    the last step's returned keys and values of every layer."""
    out = []
    bounds = [(0, PREFILL)] + [(PREFILL + i, PREFILL + i + 1) for i in range(STEPS)]
    for start, end in bounds:
        cache.start_step(None, end - start)
        out = [cache.update(layer, keys[layer, :, :, start:end], values[layer, :, :, start:end])[:2]
               for layer in range(layers)]
        cache.end_step()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


@torch.inference_mode()
def track_kv_scale_equivariance(bench):
    """Scaled key channels and value tokens come back scaled exactly, every other entry unchanged."""
    model = bench.model
    if bench.is_reference:
        return []
    probe = model.new_cache(1, PREFILL + STEPS)
    if getattr(probe, "observes_queries", False):  # its eviction depends on attention scores: not driven here
        return []
    text = model.config.text
    layers, heads, dim = text.num_hidden_layers, text.num_key_value_heads, text.head_dim
    gen = torch.Generator().manual_seed(0)
    # The same keys and values in every layer: a cache that decides what to share or drop by comparing
    # layers (cross-layer sharing) then decides the same way with and without the scaling.
    shape = (1, 1, heads, PREFILL + STEPS, dim)
    dtype = model.compute_dtype
    keys = torch.randn(shape, generator=gen).to(model.device, dtype).expand(layers, -1, -1, -1, -1)
    values = torch.randn(shape, generator=gen).to(model.device, dtype).expand(layers, -1, -1, -1, -1)
    channel = torch.ones(dim, device=model.device, dtype=dtype)
    channel[2::5] = FACTOR
    token = torch.ones(PREFILL + STEPS, device=model.device, dtype=dtype)
    token[2::5] = FACTOR
    plain = _drive(probe, layers, keys, values)
    scaled = _drive(model.new_cache(1, PREFILL + STEPS), layers, keys * channel, values * token[:, None])
    worst, where = 0.0, ""
    for layer, ((k, v), (k2, v2)) in enumerate(zip(plain, scaled, strict=True)):
        checks = [("keys", _rel(k2, k * channel))]
        if v.shape[2] == token.numel():  # an evicting cache returns a subset of tokens: keys only
            checks.append(("values", _rel(v2, v * token[:, None])))
        for name, value in checks:
            if value > worst or not where:
                worst, where = value, f"layer {layer} {name}"
    bound = max(BOUND, 4 * torch.finfo(dtype).eps)
    ok = worst <= bound
    error = "" if ok else (f"{where}: scaling some key channels / value tokens by {FACTOR:g} changed the others "
                           f"(relative {worst:.3g} > {bound:.3g}): the cache's scales are not per key channel and "
                           "per value token")
    return [("kv_scale_equivariance", Measurement("rel_error", worst, "ratio", status="ok" if ok else "failed",
                                                  error=error, bound=bound, better="lower"))]
