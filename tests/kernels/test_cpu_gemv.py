"""Our AVX2 GEMV kernels: the product of fp32 activations with fp32/fp16/bf16/int8 weights in both
layouts, against float64 math on the same stored weights (properties over shapes, batch rows and
dtypes); bad arguments refused with the problem named; a CPU without the ISA gets a reason."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_vl.hardware.detect import Machine
from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.model.layers import RMSNorm, apply_rotary
from qwen3_vl.optim.quant.weights import dequantize_int4, quantize_int4

pytestmark = pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None,
                                reason=f"AVX2 GEMV kernel unavailable: {cpu_gemv.unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def case(n: int, k: int, b: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, generator=gen)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) / 127
    else:
        w, scale = torch.randn(n, k, generator=gen).to(dtype), None
    dense = w.double() * (1 if scale is None else scale.double()[:, None])
    return x, w, scale, x.double() @ dense.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@settings(max_examples=40, deadline=None)
@given(n8=st.integers(1, 40), k=st.integers(1, 300), b=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_both_layouts_compute_the_product_of_the_stored_weights(n8, k, b, dtype, seed):
    """Any K (the 8-wide main loop and its scalar tail), any row count, up to 5 input rows: fp32
    accumulation of the same products, so float-reassociation error only."""
    x, w, scale, exact = case(8 * n8, k, b, dtype, seed)
    assert rel(cpu_gemv.gemv(x, w, scale), exact) <= 1e-5
    assert rel(cpu_gemv.gemv_packed8(x, cpu_gemv.pack8(w), scale), exact) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(n8=st.integers(1, 12), k=st.integers(1, 200), b=st.integers(2, 11), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_a_row_gives_the_same_bits_alone_as_among_other_rows_in_every_layout(n8, k, b, dtype, seed):
    """Batch invariance: the product of each input row alone equals, bit for bit, its row of the product of
    all rows together (input rows go three at a time through shared weight loads, then two, then one)."""
    x, w, scale, _ = case(8 * n8, k, b, dtype, seed)
    for product, weight in ((cpu_gemv.gemv, w), (cpu_gemv.gemv_packed8, cpu_gemv.pack8(w))):
        together = product(x, weight, scale)
        assert all(torch.equal(product(x[i:i + 1], weight, scale)[0], together[i]) for i in range(b))
    if k % 8 == 0 and dtype == torch.float32:
        _, (codes, s4, offset), _ = int4_case(8 * n8, k, 8, 1, seed)
        together = cpu_gemv.gemv_int4(x, codes, s4, offset, 8)
        assert all(torch.equal(cpu_gemv.gemv_int4(x[i:i + 1], codes, s4, offset, 8)[0], together[i]) for i in range(b))


@given(n=st.integers(1, 37), k=st.integers(1, 50))
def test_row_major_handles_row_counts_that_are_not_multiples_of_four(n, k):
    x, w, scale, exact = case(n, k, 1, torch.float32, 0)
    assert rel(cpu_gemv.gemv(x, w, scale), exact) <= 1e-5


@given(n8=st.integers(1, 20), k=st.integers(1, 40), seed=st.integers(0, 100))
def test_pack8_round_trips_and_reads_rows_back(n8, k, seed):
    w = torch.randn(8 * n8, k, generator=torch.Generator().manual_seed(seed))
    packed = cpu_gemv.pack8(w)
    assert torch.equal(cpu_gemv.unpack8_float(packed), w)
    assert torch.equal(cpu_gemv.unpack8_float(packed, 8, 8 * n8), w[8:])
    ids = torch.randint(0, 8 * n8, (7,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(cpu_gemv.packed8_rows(packed, ids), w[ids])


@given(n8=st.integers(1, 12), k=st.integers(1, 70), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 100))
def test_unpack8_float_converts_any_row_range_exactly(n8, k, dtype, seed):
    w = case(8 * n8, k, 1, dtype, seed)[1]
    packed = cpu_gemv.pack8(w)
    assert torch.equal(cpu_gemv.unpack8_float(packed), w.float())
    start, end = sorted((8 * torch.randint(0, n8 + 1, (2,), generator=torch.Generator().manual_seed(seed))).tolist())
    assert torch.equal(cpu_gemv.unpack8_float(packed, start, end), w[start:end].float())
    with pytest.raises(RuntimeError, match="multiples of 8"):
        cpu_gemv.unpack8_float(packed, 3, 8)


@given(rows=st.integers(1, 20), h=st.integers(1, 300), eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 100))
def test_rms_norm_matches_the_float64_formula(rows, h, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, h, generator=gen) * 3, torch.randn(h, generator=gen)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w.double()
    assert rel(cpu_gemv.rms_norm(x, w, eps), exact) <= 1e-6
    with pytest.raises(RuntimeError, match="last dimension"):
        cpu_gemv.rms_norm(x, torch.ones(h + 1), eps)


@given(rows=st.integers(1, 4), hk=st.integers(1, 4), groups=st.integers(1, 3), half=st.integers(1, 40),
       seed=st.integers(0, 100))
def test_qk_norm_rope_is_the_reference_norms_and_rotary(rows, hk, groups, half, seed):
    d, hq = 2 * half, hk * groups
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (hq + 2 * hk) * d, generator=gen) * 2
    q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-5)
    with torch.no_grad():
        q_norm.weight.copy_(torch.randn(d, generator=gen))
        k_norm.weight.copy_(torch.randn(d, generator=gen))
    angle = torch.rand(rows, d, generator=gen) * 100
    cos, sin = angle.cos(), angle.sin()
    q, k, v = cpu_gemv.qk_norm_rope(qkv, q_norm, k_norm, cos, sin, hq, hk)
    parts = qkv.double().split([hq * d, hk * d, hk * d], dim=-1)
    c, s = cos.double()[:, None], sin.double()[:, None]
    q_ref = apply_rotary(copy.deepcopy(q_norm).double()(parts[0].view(rows, hq, d)), c, s)
    k_ref = apply_rotary(copy.deepcopy(k_norm).double()(parts[1].view(rows, hk, d)), c, s)
    assert rel(q, q_ref) <= 1e-6 and rel(k, k_ref) <= 1e-6
    assert torch.equal(v, qkv[:, (hq + hk) * d :].view(rows, hk, d))
    with pytest.raises(RuntimeError, match="qkv must be"):
        cpu_gemv.qk_norm_rope(qkv[:, :-2].contiguous(), q_norm, k_norm, cos, sin, hq, hk)


def int4_case(n: int, k: int, group: int, b: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    packed, scale, zero = quantize_int4(w, group)
    dense = dequantize_int4(packed, scale, zero, group, torch.float64)
    x = torch.randn(b, k, generator=gen)
    return x, cpu_gemv.pack8_int4(packed, scale, zero), dense


def int4_terms(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int, k: int):
    """The weights [n, k] as gemv_int4's two terms, in float64: scale * q (what meets the rounded inputs) and the
    offset (what meets their exact sum)."""
    n = codes.shape[0] * 8
    q = torch.stack((codes & 15, codes >> 4), dim=2).permute(0, 3, 1, 2).reshape(n, k).double()
    per_row = lambda t: t.permute(0, 2, 1).reshape(n, -1).double().repeat_interleave(group, dim=1)
    return q * per_row(scale), per_row(offset)


def int4_product(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 group: int) -> torch.Tensor:
    """What gemv_int4 computes, in float64, from its own layout: per group scale * dot(x16 * dx, q) +
    offset * sum(x), the inputs rounded to int16 per group (dx = max|x| / 32767, in fp32 as the kernel)."""
    b, k = x.shape
    scaled, offsets = int4_terms(codes, scale, offset, group, k)
    xg = x.view(b, k // group, group)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    rounded = (torch.round(xg * inv).double() * (amax / 32767.0).double()).view(b, k)
    return rounded @ scaled.T + x.double() @ offsets.T


@settings(max_examples=40, deadline=None)
@given(n8=st.integers(1, 24), groups=st.integers(1, 6), group=st.sampled_from([8, 16, 32, 128]), b=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_int4_gemv_and_unpack_compute_the_dequantized_weights(n8, groups, group, b, seed):
    """Any row count in blocks of eight, any number of groups of any supported size, 1-5 input rows:
    the product with quantize_int4's weights of the inputs rounded to int16 per group, and the
    weights themselves back."""
    x, (codes, scale, offset), dense = int4_case(8 * n8, groups * group, group, b, seed)
    out = cpu_gemv.gemv_int4(x, codes, scale, offset, group)
    assert rel(out, int4_product(x, codes, scale, offset, group)) <= 1e-5  # integer dot products: exact
    # What rounding the inputs to int16 costs: at most half a step (its group's amax / 32767) per input, times the
    # scale * q it meets, summed; bounded per output, since outputs that cancel are small beside their terms.
    scaled, _ = int4_terms(codes, scale, offset, group, groups * group)
    steps = x.view(b, groups, group).abs().amax(-1).repeat_interleave(group, dim=1).double() / 32767
    budget = (0.5 * steps) @ scaled.abs().T + 1e-6 * (x.double().abs() @ dense.double().abs().T)
    assert ((out.double() - x.double() @ dense.double().T).abs() <= budget).all()
    assert rel(cpu_gemv.unpack_int4_float(codes, scale, offset, group), dense) <= 1e-6
    start, end = 8 * (n8 // 3), 8 * n8
    assert rel(cpu_gemv.unpack_int4_float(codes, scale, offset, group, start, end), dense[start:end]) <= 1e-6


def test_int4_a_flipped_nibble_moves_its_own_output_only():
    """Planted fault: the high nibble of one byte (row 8+5, column 2*7+1) changed after packing."""
    x, (codes, scale, offset), dense = int4_case(32, 64, 32, 1, 4)
    exact = int4_product(x, codes, scale, offset, 32)
    codes[1, 7, 5] ^= 0x30
    out = cpu_gemv.gemv_int4(x, codes, scale, offset, 32).double()
    assert ((out - exact).abs() > 1e-5 * exact.abs().max()).nonzero()[:, 1].tolist() == [13]
    assert (cpu_gemv.unpack_int4_float(codes, scale, offset, 32).double() - dense).abs().gt(1e-5).nonzero().tolist() \
        == [[13, 15]]


def test_int4_bad_arguments_name_the_problem():
    _, (codes, scale, offset), _ = int4_case(16, 64, 16, 1, 0)
    with pytest.raises(RuntimeError, match="must be a multiple of 8 dividing K = 64"):
        cpu_gemv.gemv_int4(torch.randn(1, 64), codes, scale, offset, 12)
    with pytest.raises(RuntimeError, match=r"scale and offset must be contiguous fp32 \[2, 4, 8\]"):
        cpu_gemv.gemv_int4(torch.randn(1, 64), codes, scale[:, :2].contiguous(), offset, 16)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous fp32 CPU \[B, 64\]"):
        cpu_gemv.gemv_int4(torch.randn(1, 63), codes, scale, offset, 16)
    with pytest.raises(RuntimeError, match="uint8"):
        cpu_gemv.gemv_int4(torch.randn(1, 64), codes.to(torch.int8), scale, offset, 16)


@given(rows=st.integers(1, 3), i=st.integers(1, 70), scale=st.sampled_from([1.0, 10.0, 60.0]), seed=st.integers(0, 100))
def test_silu_mul_is_the_mlp_activation(rows, i, scale, seed):
    """Any width (the 8-wide loop and its tail), inputs far into both tails of the sigmoid."""
    gate_up = torch.randn(rows, 2 * i, generator=torch.Generator().manual_seed(seed)) * scale
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert rel(cpu_gemv.silu_mul(gate_up), torch.nn.functional.silu(gate) * up) <= 1e-6


def attention_reference(q, k, v, valid, scale):
    """Float64 causal softmax attention of the last L positions with grouped heads; a row that sees no
    valid key gets the mean of all the values."""
    groups, lq, lk = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # [L, T] causal
    seen = seen[None, None] & (True if valid is None else valid[:, None, None, :])
    scores = torch.where(seen.any(-1, keepdim=True), scores.masked_fill(~seen, float("-inf")), 0.0)
    return scores.softmax(-1) @ v


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), hk=st.integers(1, 3), groups=st.integers(1, 3), t=st.integers(1, 40),
       queries=st.integers(1, 6), d=st.sampled_from([4, 8, 12, 32, 64, 72]),
       masked=st.sampled_from(["none", "some", "a row with none"]), seed=st.integers(0, 1000))
def test_causal_attention_is_softmax_attention_over_the_cache(b, hk, groups, t, queries, d, masked, seed):
    """Grouped heads, any key count (eight-key blocks and the tail), one query (decode) or several
    (prefill, causal), head sizes on and off the vector width, strided cache views as the static
    cache returns them, padding masks including a sequence that sees nothing."""
    gen = torch.Generator().manual_seed(seed)
    lq = min(queries, t)
    q = torch.randn(b, hk * groups, lq, d, generator=gen)
    k = torch.randn(b, hk, t + 5, d, generator=gen)[:, :, :t]  # views into a longer cache
    v = torch.randn(b, hk, t + 5, d, generator=gen)[:, :, :t]
    valid = None
    if masked != "none":
        valid = (torch.rand(b, t + 5, generator=gen) > 0.4)[:, :t]
        valid[0, -1] = True
        if masked == "a row with none":
            valid[-1] = False
    out = cpu_gemv.causal_attention(q, k, v, valid, d**-0.5)
    assert out.shape == q.shape and rel(out, attention_reference(q, k, v, valid, d**-0.5)) <= 1e-5


@settings(max_examples=30, deadline=None)
@given(t=st.integers(2, 60), queries=st.integers(2, 12), d=st.sampled_from([8, 64, 72]), seed=st.integers(0, 1000))
def test_a_row_gives_the_same_bits_alone_as_among_other_rows(t, queries, d, seed):
    """Batch invariance: the last position attended as one query (a decode step) equals, bit for bit,
    the same row computed among the prefill's rows over the same cache."""
    gen = torch.Generator().manual_seed(seed)
    lq = min(queries, t)
    q, k, v = (torch.randn(1, 4, n, d, generator=gen) for n in (lq, t, t))
    k, v = k[:, :2], v[:, :2]
    together = cpu_gemv.causal_attention(q, k, v, None, d**-0.5)
    for row in range(lq):
        keys = t - lq + row + 1
        alone = cpu_gemv.causal_attention(q[:, :, row:row + 1], k[:, :, :keys], v[:, :, :keys], None, d**-0.5)
        assert torch.equal(alone, together[:, :, row:row + 1])


def test_causal_attention_over_a_long_cache_runs_in_parallel_and_agrees():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, 3, 64, generator=gen), torch.randn(1, 2, 3000, 64, generator=gen), \
        torch.randn(1, 2, 3000, 64, generator=gen)
    assert rel(cpu_gemv.causal_attention(q, k, v, None, 0.125), attention_reference(q, k, v, None, 0.125)) <= 1e-5


def test_causal_attention_catches_a_planted_stale_key():
    """Planted fault: one cached key changed; the heads that read it move, the others do not."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen), \
        torch.randn(1, 2, 9, 16, generator=gen)
    before = cpu_gemv.causal_attention(q, k, v, None, 0.25)
    k[0, 1, 4] += 1.0  # kv head 1 serves query heads 2 and 3
    moved = (cpu_gemv.causal_attention(q, k, v, None, 0.25) - before).abs().amax(dim=(2, 3))[0]
    assert moved[:2].max() == 0 and moved[2:].min() > 1e-4


def test_a_wrong_weight_is_caught():
    """Planted fault: one weight changed after packing moves that output and only that output."""
    x, w, scale, exact = case(64, 96, 1, torch.int8, 1)
    packed = cpu_gemv.pack8(w)
    packed[2, 5, 3] += 1  # row 2*8+3, column 5
    out = cpu_gemv.gemv_packed8(x, packed, scale).double()
    moved = ((out - exact).abs() > 1e-5 * exact.abs().max()).nonzero()[:, 1].tolist()
    assert moved == [19]


def test_bad_arguments_name_the_problem():
    w = torch.randn(16, 8)
    with pytest.raises(RuntimeError, match=r"x must be \[B, 8\]"):
        cpu_gemv.gemv(torch.randn(1, 9), w)
    with pytest.raises(RuntimeError, match="fp32 x"):
        cpu_gemv.gemv(torch.randn(1, 8, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="one value per output row"):
        cpu_gemv.gemv(torch.randn(1, 8), w.to(torch.int8), torch.ones(3))
    with pytest.raises(RuntimeError, match="fp32, fp16, bf16 or int8"):
        cpu_gemv.gemv(torch.randn(1, 8), w.double())
    with pytest.raises(RuntimeError, match=r"\[N/8, K, 8\]"):
        cpu_gemv.gemv_packed8(torch.randn(1, 8), w)
    with pytest.raises(ValueError, match="multiple of 8 rows"):
        cpu_gemv.pack8(torch.randn(12, 8))
    with pytest.raises(RuntimeError, match=r"\[\.\.\., 2 I\]"):
        cpu_gemv.silu_mul(torch.randn(2, 7))
    q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(RuntimeError, match="Hkv dividing 4"):
        cpu_gemv.causal_attention(q, kv, kv, None, 1.0)
    with pytest.raises(RuntimeError, match="6 queries must be the last of the 5 keys"):
        cpu_gemv.causal_attention(torch.randn(1, 4, 6, 8), kv[:, :2], kv[:, :2], None, 1.0)
    with pytest.raises(RuntimeError, match=r"valid must be a CPU bool \[1, 5\]"):
        cpu_gemv.causal_attention(q, kv[:, :2], kv[:, :2], torch.ones(1, 4, dtype=torch.bool), 1.0)


def test_a_cpu_without_avx2_gets_the_reason(monkeypatch):
    plain = Machine("old cpu", frozenset({"avx"}), 2, 2, 1 << 30, ())
    monkeypatch.setattr(cpu_gemv, "detect_machine", lambda: plain)
    cpu_gemv._load.cache_clear()
    try:
        assert "avx2, fma, f16c" in cpu_gemv.unavailable_reason()
        with pytest.raises(RuntimeError, match="lacks"):
            cpu_gemv.gemv(torch.randn(1, 8), torch.randn(8, 8))
    finally:
        cpu_gemv._load.cache_clear()
