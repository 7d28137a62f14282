"""Our Triton decode attention (the compiled GPU decode step's, ``compile``'s attend): against the eager ops it
replaces (``reference``) and float64 over shapes, cache positions, padding and dtypes, the cache rows it writes
and those it must leave alone, and bad arguments refused with the problem named (on the CPU through Triton's
interpreter; skipped where Triton is not installed, as on the CI machines, whose fingerprint would change with it)."""

from __future__ import annotations

import functools
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen3_vl.kernels import triton_decode_attention as kernel
from qwen3_vl.kernels.triton_gemv import unavailable_reason

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first built

needs_triton = pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Half precision: fp16 everywhere; bf16 only on a GPU, since Triton's CPU interpreter truncates a bf16 cast (it has
# no numpy type) where the GPU rounds to nearest, and biased truncations at four places compound past any bound
# that would still catch a wrong rounding point.
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def step_inputs(batch, heads, kv_heads, d, cache_len, position, dtype, seed, padded):
    """One decode step's inputs: the fused q/k/v row (q, k, v as views of it, as the layer has them), norm
    weights, this position's cos/sin, caches holding random rows, the validity mask (own position marked;
    with ``padded``, random earlier positions invalid, as a padded prompt leaves them)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)

    qkv = draw(batch, 1, (heads + 2 * kv_heads) * d, scale=3.0)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    angles = torch.rand(batch, 1, d // 2, generator=gen) * 100
    angles = torch.cat([angles, angles], dim=-1)
    valid = torch.zeros(batch, cache_len, dtype=torch.bool)
    valid[:, : position + 1] = True
    if padded:
        valid[:, :position] &= torch.rand(batch, position, generator=gen) > 0.3
    return dict(q=q, k=k, v=v, q_norm=(1 + 0.5 * torch.randn(d, generator=gen)).to(DEVICE, dtype),
                k_norm=(1 + 0.5 * torch.randn(d, generator=gen)).to(DEVICE, dtype), eps=1e-6,
                cos=angles.cos().to(DEVICE, dtype), sin=angles.sin().to(DEVICE, dtype),
                keys=draw(batch, kv_heads, cache_len, d), values=draw(batch, kv_heads, cache_len, d),
                position=torch.tensor([position], device=DEVICE), valid=valid.to(DEVICE), scale=d**-0.5,
                heads=heads, kv_heads=kv_heads)


def run(fn, inputs, dtype=None):
    """``fn`` on copies of the caches (optionally every float cast to ``dtype``): (output, keys, values)."""
    cast = {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone())
            if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
    return fn(**cast), cast["keys"], cast["values"]


def error(x, exact):
    return ((x.double() - exact).abs().max() / exact.abs().max()).item()


@needs_triton
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([16, 32]), cache_len=st.integers(1, 150), where=st.floats(0, 1), padded=st.booleans(),
       dtype=st.sampled_from([torch.float32, *HALF]), seed=st.integers(0, 2**16),
       block=st.sampled_from([16, kernel.BLOCK_T]), max_splits=st.sampled_from([1, 2, kernel.MAX_SPLITS]),
       grouped=st.booleans())
@example(batch=1, kv_heads=2, groups=2, d=32, cache_len=150, where=0.95, padded=True, dtype=torch.float32, seed=3,
         block=16, max_splits=4, grouped=False)  # nine tiles in four slices of three: every part of the split and
@example(batch=1, kv_heads=2, groups=4, d=32, cache_len=150, where=0.95, padded=True, dtype=torch.float32, seed=3,
         block=16, max_splits=4, grouped=True)  # the combine, in both forms
def test_the_step_is_the_eager_attention_step(batch, kv_heads, groups, d, cache_len, where, padded, dtype, seed,
                                              block, max_splits, grouped):
    """Output and the written cache row against the eager ops: in fp32 float reassociation (<= 1e-5 relative);
    in half precision against float64, within twice the eager half-precision ops' own error plus four units
    (the kernel rounds at other places than eager: fewer of them). Rows other than the step's position are
    left as they were. Small tiles make many slices at these lengths; fewer slices allowed than tiles make
    slices of several tiles; one slice leaves the combine nothing to rescale. Both forms: a program per query head,
    and ``grouped``'s per KV head."""
    position = min(int(where * cache_len), cache_len - 1)
    inputs = step_inputs(batch, kv_heads * groups, kv_heads, d, cache_len, position, dtype, seed, padded)
    with mock.patch.object(kernel, "BLOCK_T", block), mock.patch.object(kernel, "MAX_SPLITS", max_splits):
        out, keys, values = run(functools.partial(kernel.decode_attention, grouped=grouped), inputs)
    ref, ref_keys, ref_values = run(kernel.reference, inputs)
    assert out.shape == ref.shape == (batch, 1, kv_heads * groups * d) and out.dtype == dtype
    others = torch.arange(cache_len, device=DEVICE) != position
    assert torch.equal(keys[:, :, others], inputs["keys"][:, :, others])
    assert torch.equal(values[:, :, others], inputs["values"][:, :, others])
    assert torch.equal(values[:, :, position], ref_values[:, :, position])
    if dtype == torch.float32:
        assert error(out, ref) <= 1e-5
        assert error(keys[:, :, position], ref_keys[:, :, position]) <= 1e-5
    else:
        exact, exact_keys, _ = run(kernel.reference, inputs, torch.float64)
        units = 4 * torch.finfo(dtype).eps
        assert error(out, exact) <= 2 * error(ref, exact) + units
        assert error(keys[:, :, position], exact_keys[:, :, position]) <= 2 * error(
            ref_keys[:, :, position], exact_keys[:, :, position]) + units


def test_splits_cover_the_cache_once():
    """Every tile of the cache in exactly one program's slice, at most MAX_SPLITS programs, one tile each below."""
    for cache_len in [1, 63, 64, 65, 390, 4096, 4097, 40000]:
        count, tiles = kernel.splits(cache_len)
        needed = -(-cache_len // kernel.BLOCK_T)
        assert count <= kernel.MAX_SPLITS and (count - 1) * tiles < needed <= count * tiles
        assert tiles == 1 or needed > kernel.MAX_SPLITS


@needs_triton
def test_the_mask_and_the_new_row_matter():
    """The test above can fail: the eager step with the padding mask dropped, or with this step's key and value
    written one position later (attending a stale row instead), is far past its bound from the kernel's output."""
    inputs = step_inputs(2, 4, 2, 32, 40, 30, torch.float32, 7, padded=True)
    out, _, _ = run(kernel.decode_attention, inputs)
    unmasked, _, _ = run(kernel.reference, {**inputs, "valid": torch.ones_like(inputs["valid"])})
    assert error(out, unmasked) > 1e-2
    shifted = inputs["valid"].clone()
    shifted[:, 31] = True
    stale, _, _ = run(kernel.reference, {**inputs, "position": inputs["position"] + 1, "valid": shifted})
    assert error(out, stale) > 1e-2


@needs_triton
def test_bad_arguments_are_refused_with_the_problem_named():
    inputs = step_inputs(1, 4, 2, 16, 8, 3, torch.float32, 0, padded=False)
    with pytest.raises(ValueError, match="power-of-two head size"):
        kernel.decode_attention(**{**inputs, "keys": inputs["keys"][..., :12], "values": inputs["values"][..., :12]})
    with pytest.raises(ValueError, match="one row of 64 per batch entry"):
        kernel.decode_attention(**{**inputs, "q": torch.randn(1, 2, 64, device=DEVICE)})
    with pytest.raises(ValueError, match="bool validity mask"):
        kernel.decode_attention(**{**inputs, "valid": inputs["valid"].long()})
    with pytest.raises(ValueError, match="one dtype"):
        kernel.decode_attention(**{**inputs, "v": inputs["v"].double()})


def prompt_qk(batch, n, heads, kv_heads, d, dtype, seed):
    """A prompt's q and k rows (views of one fused product, as the layer has them), norm weights, cos/sin."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(batch, n, (heads + 2 * kv_heads) * d, generator=gen)).to(DEVICE, dtype)
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    angles = torch.rand(batch, 1, n, d // 2, generator=gen) * 100
    angles = torch.cat([angles, angles], dim=-1)
    return dict(q=q, k=k, q_norm=(1 + 0.5 * torch.randn(d, generator=gen)).to(DEVICE, dtype),
                k_norm=(1 + 0.5 * torch.randn(d, generator=gen)).to(DEVICE, dtype), eps=1e-6,
                cos=angles.cos().to(DEVICE, dtype), sin=angles.sin().to(DEVICE, dtype), heads=heads, kv_heads=kv_heads)


@needs_triton
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), n=st.integers(1, 40), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float32, *HALF]), seed=st.integers(0, 2**16))
def test_the_prompts_q_k_norm_and_rotary_are_the_eager_ones(batch, n, kv_heads, groups, d, dtype, seed):
    """``qk_norm_rotary`` against ``qk_reference`` (the layer's ops): fp32 within 1e-5; half precision against
    float64 within twice the eager ops' own error plus two units (it rounds the rotary once, eager three times)."""
    inputs = prompt_qk(batch, n, kv_heads * groups, kv_heads, d, dtype, seed)
    assert kernel.qk_fits(inputs["q"], inputs["k"], inputs["cos"], inputs["sin"], d)
    q, k = kernel.qk_norm_rotary(**inputs)
    ref_q, ref_k = kernel.qk_reference(**inputs)
    assert q.shape == ref_q.shape == (batch, kv_heads * groups, n, d) and k.shape == ref_k.shape
    assert q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype == dtype
    if dtype == torch.float32:
        assert error(q, ref_q) <= 1e-5 and error(k, ref_k) <= 1e-5
    else:
        exact = {name: t.double() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
        exact_q, exact_k = kernel.qk_reference(**exact)
        units = 2 * torch.finfo(dtype).eps
        assert error(q, exact_q) <= 2 * error(ref_q, exact_q) + units
        assert error(k, exact_k) <= 2 * error(ref_k, exact_k) + units


@needs_triton
def test_the_prompt_kernel_catches_a_wrong_position_and_refuses_bad_rows():
    """The test above can fail: the eager ops with the cos/sin of the next row, or with the query's and key's
    norm weights swapped, are far past its bound; rows without a contiguous last dimension are refused."""
    inputs = prompt_qk(1, 12, 4, 2, 32, torch.float32, 3)
    q, k = kernel.qk_norm_rotary(**inputs)
    rolled = {**inputs, "cos": inputs["cos"].roll(1, dims=2), "sin": inputs["sin"].roll(1, dims=2)}
    assert error(q, kernel.qk_reference(**rolled)[0]) > 1e-2
    swapped = {**inputs, "q_norm": inputs["k_norm"], "k_norm": inputs["q_norm"]}
    assert error(k, kernel.qk_reference(**swapped)[1]) > 1e-2
    assert not kernel.qk_fits(inputs["q"][..., ::2], inputs["k"], inputs["cos"], inputs["sin"], 32)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kernel.qk_norm_rotary(**{**inputs, "q": torch.randn(1, 12, 256, device=DEVICE)[..., ::2]})


def patch_qk(s, heads, d, dtype, seed):
    """A ViT layer's q and k (views of its qkv product) and the 2D rotary's fp32 cos/sin [s, 1, d]."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(s, 3, heads, d, generator=gen)).to(DEVICE, dtype)
    q, k, _ = qkv.unbind(1)
    angles = torch.rand(s, 1, d // 2, generator=gen) * 50
    angles = torch.cat([angles, angles], dim=-1).to(DEVICE)
    return dict(q=q, k=k, cos=angles.cos(), sin=angles.sin())


@needs_triton
@settings(max_examples=20, deadline=None)
@given(s=st.integers(1, 40), heads=st.integers(1, 4), d=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, *HALF]), seed=st.integers(0, 2**16))
def test_the_vit_rotary_is_the_eager_one(s, heads, d, dtype, seed):
    """``vision_rotary`` against ``vision_reference`` (the ViT's ops, fp32 then one rounding): fp32 within 1e-6;
    half precision within one unit of the eager result (both round the same fp32 value, up to contraction)."""
    inputs = patch_qk(s, heads, d, dtype, seed)
    assert kernel.vision_fits(**inputs)
    q, k = kernel.vision_rotary(**inputs)
    ref_q, ref_k = kernel.vision_reference(**inputs)
    assert q.shape == ref_q.shape == (s, heads, d) and q.is_contiguous() and q.dtype == k.dtype == dtype
    bound = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert error(q, ref_q.double()) <= bound and error(k, ref_k.double()) <= bound


@needs_triton
def test_the_vit_kernel_catches_a_wrong_patch_and_refuses_bad_layouts():
    """The test above can fail: the eager rotary with the next patch's angles is far past its bound; a q whose
    heads are not contiguous is refused."""
    inputs = patch_qk(12, 2, 32, torch.float32, 4)
    q, _ = kernel.vision_rotary(**inputs)
    rolled = {**inputs, "cos": inputs["cos"].roll(1, dims=0), "sin": inputs["sin"].roll(1, dims=0)}
    assert error(q, kernel.vision_reference(**rolled)[0].double()) > 1e-2
    transposed = inputs["q"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not kernel.vision_fits(transposed, inputs["k"], inputs["cos"], inputs["sin"])
    with pytest.raises(ValueError, match="contiguous heads"):
        kernel.vision_rotary(transposed, inputs["k"], inputs["cos"], inputs["sin"])


@needs_triton
@pytest.mark.parametrize("grouped_from", [None, 0])
def test_a_tiny_model_with_the_kernel_decodes_the_reference_tokens(tiny_checkpoint, ours_tiny, grouped_from):
    """``compile``'s attention layers (attend and prefill_qk, the defaults) with the real kernels, on a padded batch
    with an image: fp32 greedy tokens identical to the reference, step logits within 1e-5. Both forms of the decode
    kernel: the split form below the default ``attend_grouped_from`` (the tiny cache is short), the grouped form
    from 0 rows."""
    import qwen3_vl
    from harness.workload import PromptSpec, RowSpec, build_prompt, generate
    from qwen3_vl.optim.execution import compile as compile_option
    from qwen3_vl.optim.execution.compile import KernelAttention, use_decode_attention
    from qwen3_vl.optim.execution.cuda_graph import CudaGraphExecution
    from qwen3_vl.optim.plan import Target

    from ..model.prompts import relative_error

    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan="attention=eager")
    model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, bucket=16)
    kwargs = {} if grouped_from is None else {"grouped_from": grouped_from}
    assert use_decode_attention(model, prefill_qk=True, **kwargs) == len(model.language_model.layers)
    assert all(isinstance(layer.self_attn, KernelAttention) and layer.self_attn.grouped_from == (
        compile_option.GROUPED_FROM if grouped_from is None else grouped_from) for layer in model.language_model.layers)
    prompt = build_prompt(ours_tiny.config, PromptSpec((RowSpec(3, (4, 4), 2), RowSpec(4)), seed=5))
    tokens, logits, _ = generate(model, prompt, 6)
    ref_tokens, ref_logits, _ = generate(ours_tiny, prompt, 6)
    assert torch.equal(tokens, ref_tokens)
    assert relative_error(logits, ref_logits) <= 1e-5
