"""Weight quantization: round-trip bounds (properties), kernels against the dequantized weights, the
swap (output matrix and tied embedding share storage), and the model's measured error vs its budget."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen3_vl
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim import registry
from qwen3_vl.optim.plan import Target
from qwen3_vl.optim.quant import int4_weight, int8_weight, weights
from qwen3_vl.optim.quant.weights import SMALL_BATCH_ROWS, dequantize_int4, quantize_int4, quantize_int8

from ..kv_cache.drive import compare, conversation, prompt, reference, within_budget


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.sampled_from([8, 64, 256]), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_int8_round_trip_is_within_half_a_step(rows, cols, scale, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (rows,)
    assert bool(((q.float() * s[:, None] - w).abs() <= s[:, None] * 0.5001 + 1e-30).all())


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 4), group=st.sampled_from([8, 32, 128]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_int4_round_trip_is_within_half_a_step(rows, groups, group, scale, seed):
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    packed, s, z = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, groups * group // 2)  # two codes per byte
    back = dequantize_int4(packed, s, z, group, torch.float32)
    bound = s.repeat_interleave(group, dim=1) * 0.5001 + 1e-6 * scale
    assert bool(((back - w).abs() <= bound).all())


def test_a_nibble_order_fault_is_caught(monkeypatch):
    monkeypatch.setattr(weights, "unpack_int4",
                        lambda p: torch.stack((p >> 4, p & 15), dim=-1).view(p.shape[0], -1))
    with pytest.raises(AssertionError):
        test_int4_round_trip_is_within_half_a_step.hypothesis.inner_test(rows=4, groups=1, group=8, scale=1.0, seed=0)


def linear_case(out_features=256, in_features=256, rows=1, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    return linear, torch.randn(rows, in_features, generator=gen)


# kernel -> relative error allowed against fp32 math on the same quantized weights
INT8_KERNELS = {"dequant": 1e-5, "avx2": 1e-5, "int8pack": 1e-2, "fbgemm": 4e-2}  # bf16 / 7-bit activations


@pytest.mark.parametrize("kernel", int8_weight.available_kernels("cpu"))
@pytest.mark.parametrize("rows", [1, SMALL_BATCH_ROWS + 3])
def test_int8_kernels_compute_the_quantized_product(kernel, rows):
    linear, x = linear_case(rows=rows, bias=True)
    mod = int8_weight.make_linear(linear, kernel)
    codes = int8_weight.codes_as(mod, torch.float64)  # [N, K] whatever layout the kernel keeps
    exact = x.double() @ (codes * mod.scale.double()[:, None]).T + linear.bias.double()
    err = ((mod(x).double() - exact).abs().max() / exact.abs().max()).item()
    assert err <= (INT8_KERNELS[kernel] if rows <= SMALL_BATCH_ROWS else 1e-5)  # prefill: exact activations


INT4_KERNELS = {"dequant": 1e-5, "avx2": 2e-4, "int4pack": 1e-2}  # int16 / bf16 activations


@pytest.mark.parametrize("kernel", int4_weight.available_kernels("cpu"))
@pytest.mark.parametrize("rows", [1, SMALL_BATCH_ROWS + 3])
def test_int4_kernels_compute_the_quantized_product(kernel, rows):
    linear, x = linear_case(out_features=128, in_features=512, rows=rows)
    mod = int4_weight.make_linear(linear, kernel, 128)
    w = dequantize_int4(*quantize_int4(linear.weight.detach(), 128), 128, torch.float64)  # any kernel's layout
    exact = x.double() @ w.T
    err = ((mod(x).double() - exact).abs().max() / exact.abs().max()).item()
    assert err <= (INT4_KERNELS[kernel] if rows <= SMALL_BATCH_ROWS else 1e-5)  # prefill: exact activations


@pytest.mark.parametrize("kernel", int4_weight.available_kernels("cpu"))
def test_int4_embedding_rows_are_the_output_matrix_rows(kernel):
    """The tied embedding looks its rows up in the output matrix whatever layout the kernel keeps
    (avx2: eight rows interleaved, offsets folded); the same values as dequantizing the codes."""
    model = qwen3_vl.from_pretrained("tiny", plan=f"quant=int4_weight[kernel={kernel}]")
    head = model.lm_head
    ids = torch.tensor([0, 5, 9, 151935])
    rows = int4_weight.dequantize_rows(head, ids)
    ref = qwen3_vl.from_pretrained("tiny")
    expected = dequantize_int4(*quantize_int4(ref.lm_head.weight.detach()[ids], head.group), head.group,
                               torch.float32)
    assert torch.allclose(rows, expected, rtol=0, atol=1e-6 * expected.abs().max())
    assert torch.equal(model.language_model.embed_tokens(ids[None])[0], rows)


def test_tied_embedding_and_output_share_one_quantized_matrix():
    model = qwen3_vl.from_pretrained("tiny", plan="quant=int8_weight[kernel=dequant]")
    embed, head = model.language_model.embed_tokens, model.lm_head
    assert embed._shared[0] is head
    ids = torch.tensor([[0, 5, 151935]])
    expected = head.weight[ids[0]].float() * head.scale[ids[0], None]
    assert torch.equal(embed(ids)[0], expected)
    info = model.quant.describe()
    # the fp32 matrix (4 bytes) became int8 (1 byte) plus one fp32 scale per row, held once
    assert info["weight_bytes"] < 0.3 * info["weight_bytes_before"]
    state = model.state_dict()
    assert sum(t.dtype == torch.int8 for t in state.values()) > 0


def test_an_untied_model_quantizes_its_embedding_separately():
    config = qwen3_vl.config.preset("tiny").replace(tie_word_embeddings=False)
    model = qwen3_vl.build(config, plan="quant=int4_weight[kernel=dequant]")
    embed = model.language_model.embed_tokens
    assert embed.table is not model.lm_head and embed.table.weight.dtype == torch.uint8
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 6)


def test_unknown_or_unavailable_kernels_are_refused():
    model = qwen3_vl.from_pretrained("tiny")
    with pytest.raises(ValueError, match="kernel 'nope' unknown"):
        int8_weight.Int8Weights(model, Target("cpu"), kernel="nope")
    with pytest.raises(ValueError, match="not available on cuda"):
        int4_weight.Int4Weights(model, Target("cuda:0"), kernel="int4pack")


# ---------------------------------------------------------------------------------------------
# The model's error against the reference: a seeded multimodal conversation, 64 greedy steps and
# a second turn, teacher-forced with the reference's tokens.

@functools.cache
def run(plan: str):
    model = qwen3_vl.from_pretrained("tiny", seed=0, plan=plan)
    logits, _, _ = conversation(model, prompt("single"), tokens=reference("single")[1])
    return logits


@pytest.mark.parametrize("plan", ["quant=int8_weight", "quant=int8_weight[kernel=dequant]", "quant=int4_weight"])
def test_measured_error_is_within_the_declared_budget(plan):
    metrics = compare(run(plan), reference("single")[0])
    option = registry.get("quant", qwen3_vl.Plan.parse(plan)["quant"].name)
    print(f"{plan}: {metrics}")
    assert not within_budget(metrics, option.error_budget), within_budget(metrics, option.error_budget)
    assert metrics["kl"] > 0
