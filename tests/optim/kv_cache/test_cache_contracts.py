"""Cache-level contracts of every KV option, driven with random keys/values (no model): property tests
over step sizes, batch sizes and padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim.kv_cache import cross_layer, h2o, hierarchical_kv, kivi, sink_window, static
from qwen3_vl.optim.kv_cache.common import CacheFullError, KVShape
from qwen3_vl.optim.kv_cache.dynamic import DynamicCache

SHAPE = KVShape(num_layers=4, kv_heads=2, head_dim=16)
QUERY_HEADS = 4


def steps_strategy():
    return st.tuples(
        st.integers(1, 3),  # batch
        st.lists(st.integers(1, 9), min_size=1, max_size=6),  # tokens per step (the first is the prefill)
        st.integers(0, 4),  # left padding of row 0 in the prefill
        st.integers(0, 2**31 - 1),
    )


def drive(cache, batch: int, steps: list[int], pad: int, seed: int):
    """Feed random K/V (and queries, for caches that observe them); yield what every update returns."""
    gen = torch.Generator().manual_seed(seed)
    for i, n in enumerate(steps):
        mask = None
        if i == 0 and pad and batch > 1:
            mask = torch.ones(batch, n, dtype=torch.bool)
            mask[0, : min(pad, n - 1)] = False
        cache.start_step(mask, n)
        for layer in range(SHAPE.num_layers):
            k = torch.randn(batch, SHAPE.kv_heads, n, SHAPE.head_dim, generator=gen)
            v = torch.randn(batch, SHAPE.kv_heads, n, SHAPE.head_dim, generator=gen)
            q = torch.randn(batch, QUERY_HEADS, n, SHAPE.head_dim, generator=gen)  # drawn for every cache alike
            out = cache.update(layer, k, v)
            if getattr(cache, "observes_queries", False):
                cache.observe(layer, q, AttentionMask(out[2], causal=True))
            yield i, layer, out
        cache.end_step()


def assert_same(ours, ref):
    for a, b in zip(ours[:2], ref[:2], strict=True):
        assert torch.equal(a, b)
    if ref[2] is None:
        assert ours[2] is None or bool(ours[2].all())
    else:
        assert torch.equal(ours[2], ref[2])


# Every option configured so that nothing is compressed or evicted: it must equal the reference.
UNCOMPRESSED = {
    "static": lambda b: static.StaticCacheFactory(SHAPE).new(b, 64),
    "quant_int8": lambda b: kivi.QuantizedCacheFactory("q8", SHAPE, 8, 8, 64).new(b, 64),
    "quant_int4": lambda b: kivi.QuantizedCacheFactory("q4", SHAPE, 4, 8, 64).new(b, 64),
    "sink_window": lambda b: sink_window.SinkWindowFactory(SHAPE, 4, 60).new(b, 64),
    "h2o": lambda b: h2o.H2OFactory(SHAPE, 64, 8).new(b, 64),
    "cross_layer": lambda b: cross_layer.CrossLayerFactory(SHAPE, 2, retain_below=2.0).new(b, 64),
    "hierarchical_kv": lambda b: hierarchical_kv.HierarchicalCacheFactory(SHAPE, 64, 8, 8, "").new(b, 64),
}


@pytest.mark.parametrize("name", sorted(UNCOMPRESSED))
@settings(max_examples=8, deadline=None)
@given(case=steps_strategy())
def test_equals_the_reference_cache_while_nothing_is_compressed(name, case):
    batch, steps, pad, seed = case
    ours = drive(UNCOMPRESSED[name](batch), batch, steps, pad, seed)
    ref = drive(DynamicCache(SHAPE.num_layers), batch, steps, pad, seed)
    for (_, _, a), (_, _, b) in zip(ours, ref, strict=True):
        assert_same(a, b)


def test_static_cache_refuses_to_overflow_and_allocates_once():
    cache = static.StaticCacheFactory(SHAPE).new(1, 10)
    list(drive(cache, 1, [6, 4], 0, 0))
    ptrs = [t.data_ptr() for t in cache.keys]
    assert cache.seen_tokens == 10 and [t.data_ptr() for t in cache.keys] == ptrs
    with pytest.raises(CacheFullError, match="holds 10 tokens; this step would need 11"):
        cache.start_step(None, 1)


# ---------------------------------------------------------------------------------------------
# Quantized caches: every value within half a quantization step of the truth, the window exact.


def quantization_bound(x: torch.Tensor, bits: int, group: int, keys: bool) -> torch.Tensor:
    """Per-element bound: half a step of the slice's range, plus fp16 rounding of scale and zero."""
    b, h, t, d = x.shape
    if keys:
        blocks = x.view(b, h, t // group, group, d)
        lo, hi = blocks.amin(3, keepdim=True), blocks.amax(3, keepdim=True)
    else:
        vg = min(group, d)
        blocks = x.view(b, h, t, d // vg, vg)
        lo, hi = blocks.amin(4, keepdim=True), blocks.amax(4, keepdim=True)
    bound = (hi - lo) / (2**bits - 1) * 0.5 * 1.01 + 2e-3 * lo.abs() + 1e-4
    return bound.expand_as(blocks).reshape(b, h, t, d)


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=15, deadline=None)
@given(steps=st.lists(st.integers(1, 12), min_size=1, max_size=6), residual=st.integers(0, 10),
       seed=st.integers(0, 2**31 - 1))
def test_quantized_cache_error_is_within_half_a_step(bits, steps, residual, seed):
    group = 4
    cache = kivi.QuantizedCacheFactory("q", SHAPE, bits, group, residual).new(1, 80)
    ref = DynamicCache(SHAPE.num_layers)
    for (_, _, (k, v, _)), (_, _, (rk, rv, _)) in zip(drive(cache, 1, steps, 0, seed),
                                                     drive(ref, 1, steps, 0, seed), strict=True):
        quantized = cache.quantized_tokens
        assert torch.equal(k[:, :, quantized:], rk[:, :, quantized:])  # window and new tokens: exact
        assert torch.equal(v[:, :, quantized:], rv[:, :, quantized:])
        if quantized:
            old_k, old_v = rk[:, :, :quantized], rv[:, :, :quantized]
            assert bool(((k[:, :, :quantized] - old_k).abs() <= quantization_bound(old_k, bits, group, True)).all())
            assert bool(((v[:, :, :quantized] - old_v).abs() <= quantization_bound(old_v, bits, group, False)).all())
    total = sum(steps)
    assert cache.quantized_tokens == max(0, (total - residual) // group * group)


def test_the_error_bound_check_catches_a_planted_fault(monkeypatch):
    """Quantize with one bit fewer than the codes claim: the bound of the test above must fail."""
    real = kivi.quantize
    monkeypatch.setattr(kivi, "quantize", lambda x, bits, dim, valid=None: real(x, bits - 1, dim, valid))
    with pytest.raises(AssertionError):
        test_quantized_cache_error_is_within_half_a_step.hypothesis.inner_test(bits=8, steps=[12, 5], residual=0,
                                                                               seed=1)


def test_int4_codes_are_packed_two_per_byte():
    cache = kivi.QuantizedCacheFactory("q", SHAPE, 4, 8, 0).new(1, 64)
    list(drive(cache, 1, [32], 0, 0))
    store = cache.layers[0].store
    assert store.buffers[0].shape[-1] == SHAPE.head_dim // 2
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    assert torch.equal(kivi.unpack4(kivi.pack4(codes)), codes)


def test_padding_does_not_widen_a_key_block_range():
    """A pad token with a huge key must not spoil the quantization of the real tokens of its block."""
    cache = kivi.QuantizedCacheFactory("q", SHAPE, 8, 4, 0).new(2, 16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 0] = False
    k = torch.randn(2, SHAPE.kv_heads, 4, SHAPE.head_dim)
    k[0, :, 0] = 1e4  # the pad slot
    cache.start_step(mask, 4)
    for layer in range(SHAPE.num_layers):
        cache.update(layer, k, k)
    cache.end_step()
    cache.start_step(None, 1)
    out, _, valid = cache.update(0, k[:, :, :1], k[:, :, :1])
    real = k[0, :, 1:4]
    assert (out[0, :, 1:4] - real).abs().max() <= (real.amax() - real.amin()) / 255
    assert valid[0, 0].item() is False


# ---------------------------------------------------------------------------------------------
# Eviction caches


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(st.integers(1, 9), min_size=1, max_size=8), sinks=st.integers(0, 3),
       window=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_sink_window_keeps_the_first_and_the_last_tokens(steps, sinks, window, seed):
    cache = sink_window.SinkWindowFactory(SHAPE, sinks, window).new(1, 0)
    ref = DynamicCache(SHAPE.num_layers)
    seen = 0
    for (i, layer, (k, v, _)), (_, _, (rk, rv, _)) in zip(drive(cache, 1, steps, 0, seed),
                                                         drive(ref, 1, steps, 0, seed), strict=True):
        total = seen + steps[i]
        trimmed = seen > sinks + window  # the cache was trimmed after the previous step
        keep = list(range(sinks)) + list(range(seen - window, total)) if trimmed else list(range(total))
        assert torch.equal(k, rk[:, :, keep]) and torch.equal(v, rv[:, :, keep])
        if layer == SHAPE.num_layers - 1:
            seen = total
            assert cache.length <= max(sinks + window, 0) or cache.length == total
    assert cache.nbytes() <= 2 * SHAPE.num_layers * SHAPE.kv_heads * (sinks + window) * SHAPE.head_dim * 4


def test_sink_window_keeps_each_rows_first_real_tokens_under_padding():
    cache = sink_window.SinkWindowFactory(SHAPE, 2, 3).new(2, 0)
    list(drive(cache, 2, [8, 1], 3, 5))
    # row 0 had 3 pad slots: its sinks are its first real tokens (slots 3, 4), not pads
    assert cache.valid is None or bool(cache.valid.all())
    assert cache.length == 5


def eager_column_mass(q, k, valid):
    """Reference: softmax(q k^T / sqrt(d)) with the causal + padding mask, summed over heads and queries."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    allowed = AttentionMask(valid, causal=True).allowed(q.shape[2], k.shape[2], q.device)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs.sum(dim=(1, 2))


@settings(max_examples=20, deadline=None)
@given(steps=st.lists(st.integers(1, 6), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_h2o_scores_are_accumulated_attention(steps, seed):
    cache = h2o.H2OFactory(SHAPE, 10_000, 0).new(2, 0)  # never evicts
    gen = torch.Generator().manual_seed(seed)
    expected = None
    for n in steps:
        cache.start_step(None, n)
        k = torch.randn(2, SHAPE.kv_heads, n, SHAPE.head_dim, generator=gen)
        q = torch.randn(2, QUERY_HEADS, n, SHAPE.head_dim, generator=gen)
        k_all, _, valid = cache.update(0, k, k)
        cache.observe(0, q, AttentionMask(valid, causal=True))
        mass = eager_column_mass(q, k_all, valid)
        if expected is not None:
            mass[:, : expected.shape[1]] += expected
        expected = mass
        cache.end_step()
        torch.testing.assert_close(cache.scores[0], expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(prefill=st.integers(5, 20), budget=st.integers(3, 8), seed=st.integers(0, 2**31 - 1))
def test_h2o_evicts_to_the_budget_keeping_heavy_and_recent_tokens(prefill, budget, seed):
    recent = budget // 2
    cache = h2o.H2OFactory(SHAPE, budget, recent).new(1, 0)
    gen = torch.Generator().manual_seed(seed)
    cache.start_step(None, prefill)
    k = torch.randn(1, SHAPE.kv_heads, prefill, SHAPE.head_dim, generator=gen)
    _, _, valid = cache.update(0, k, k)
    cache.observe(0, torch.randn(1, QUERY_HEADS, prefill, SHAPE.head_dim, generator=gen), AttentionMask(valid))
    scores = cache.scores[0].clone()
    cache.end_step()
    if prefill <= budget:
        assert torch.equal(cache.keys[0], k)
        return
    older = prefill - recent
    heavy = scores[0, :older].topk(budget - recent).indices.sort().values.tolist()
    keep = heavy + list(range(older, prefill))
    assert torch.equal(cache.keys[0], k[:, :, keep])
    assert cache.keys[0].shape[2] == budget and cache.length == budget


# ---------------------------------------------------------------------------------------------
# Cross-layer merging


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_merge_rebuilds_parallel_layers_exactly(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 2, 5, 16, generator=gen)
    direction, norms, cos = cross_layer.merge_pair(a, a * scale)
    torch.testing.assert_close(direction * norms[..., :1], a)
    torch.testing.assert_close(direction * norms[..., 1:], a * scale)
    assert bool((cos > 0.999).all())


def test_cross_layer_merges_the_deep_half_and_retains_disagreeing_tokens():
    pure = cross_layer.CrossLayerFactory(SHAPE, -1, retain_below=-1.0).new(1, 0)
    keep = cross_layer.CrossLayerFactory(SHAPE, -1, retain_below=2.0).new(1, 0)
    exact = DynamicCache(SHAPE.num_layers)
    for cache in (pure, keep, exact):
        list(drive(cache, 1, [20, 1, 1], 0, 3))
    assert pure.merged_layers == {2, 3}
    # merged: one direction + two norms per token and head instead of two full vectors
    assert pure.nbytes() < 0.8 * exact.nbytes()
    assert keep.pairs[0].direction[0].shape[2] == 0  # everything retained exactly
    assert keep.pairs[0].retained[0].shape[2] == 22


# ---------------------------------------------------------------------------------------------
# Tiers


def test_hierarchical_tiers_hold_exactly_what_the_int8_cache_holds(tmp_path):
    """hot window on the 'device', warm in host buffers, cold in a file: same values as quant_int8."""
    tiered = hierarchical_kv.HierarchicalCacheFactory(SHAPE, 4, 8, 4, str(tmp_path)).new(1, 64)
    flat = kivi.QuantizedCacheFactory("q8", SHAPE, 8, 4, 4).new(1, 64)
    for (_, _, a), (_, _, b) in zip(drive(tiered, 1, [20, 3, 1, 9, 1], 0, 4), drive(flat, 1, [20, 3, 1, 9, 1], 0, 4),
                                    strict=True):
        assert_same(a, b)
    store = tiered.layers[0].store
    assert store.cold.blocks > 0 and store.warm.blocks > 0  # both tiers in use
    files = list(tmp_path.glob("qwen3vl-kv-*/layer*.kv"))
    assert len(files) == SHAPE.num_layers
    assert store.bytes_read > 0
    del tiered, store
    import gc

    gc.collect()
    assert not list(tmp_path.glob("qwen3vl-kv-*"))  # the cold files go with the cache
