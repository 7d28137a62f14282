"""Our Triton one-row product (the compiled GPU decode step's GEMV): against float64 math on the same
weights over shapes and dtypes, its folded prologues and epilogue against the eager ops they replace, and a
folded tiny model's greedy decode against the reference (on the CPU through Triton's interpreter; skipped
where Triton is not installed, as on the CI machines, whose fingerprint would change with it); the tile rule;
bad arguments refused with the problem named."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen3_vl.kernels import triton_gemv

from ..model.prompts import relative_error

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first built

needs_triton = pytest.mark.skipif(triton_gemv.unavailable_reason() is not None,
                                  reason=f"{triton_gemv.unavailable_reason()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_tiles_follow_the_measured_rule():
    assert triton_gemv.tile(2048, 2048) == (2, 1024, 4)  # 2b shapes
    assert triton_gemv.tile(2048, 6144) == (2, 1024, 4)
    assert triton_gemv.tile(151936, 2048) == (2, 1024, 4)
    assert triton_gemv.tile(4096, 12288) is None  # 8b shapes: cuBLAS was faster inside the step
    assert triton_gemv.tile(151936, 4096) is None
    assert triton_gemv.tile(96, 96) == (2, 32, 4)  # the tiny preset: largest power of two dividing K
    assert triton_gemv.tile(64, 24) is None


@needs_triton
@settings(max_examples=20, deadline=None)
@example(n=1, k16=1, dtype=torch.float32, seed=17856)  # products that cancel: 1.2e-6 of the row's value
@given(n=st.integers(1, 70), k16=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_the_product_is_the_stored_weights_product(n, k16, dtype, seed):
    """Any row count (the last program's rows masked), K any multiple of 16 (tiles of its largest power of
    two): fp32 sums of the same products, so each output within fp32 reassociation's bound (K units of 2^-24 of
    the sum of the products' magnitudes: a row whose products cancel may lose more than 1e-6 of its own value)
    plus, in bf16, one rounding (within one bf16 unit: Triton's CPU interpreter truncates where the GPU rounds
    to nearest)."""
    gen = torch.Generator().manual_seed(seed)
    k = 16 * k16
    x = torch.randn(1, 1, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    exact = x.double() @ w.double().T
    y = triton_gemv.gemv(x, w)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    reassociation = k * 2**-24 * (x.double().abs() @ w.double().abs().T)
    rounding = 0.0 if dtype == torch.float32 else 2**-7 * (exact.abs() + reassociation)  # a unit of the result
    assert ((y.double() - exact).abs() <= reassociation + rounding).all()


@needs_triton
def test_bad_arguments_are_refused_with_the_problem_named():
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one contiguous row of 32"):
        triton_gemv.gemv(torch.randn(2, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight's dtype"):
        triton_gemv.gemv(torch.randn(1, 32, device=DEVICE, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_gemv.gemv(torch.randn(1, 24, device=DEVICE), torch.randn(8, 24, device=DEVICE))


@needs_triton
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), k16=st.integers(1, 8), fold=st.sampled_from(["norm", "gated", "residual", "norm+residual",
                                                                          "gated+residual"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_the_folded_forms_are_the_eager_ops(n, k16, fold, dtype, seed):
    """RMSNorm before the product, SiLU-and-gate before it, the residual after: the eager layer's ops
    (``reference``) up to reassociation in fp32; in bf16 within two units of the summed terms' size (the
    interpreter truncates each of the intermediate roundings where the GPU rounds to nearest)."""
    gen = torch.Generator().manual_seed(seed)
    k = 16 * k16
    kwargs = {}
    if "norm" in fold:
        kwargs.update(norm=(1 + torch.randn(k, generator=gen)).to(DEVICE, dtype), eps=1e-6)
    if "gated" in fold:
        kwargs["gated"] = True
    if "residual" in fold:
        kwargs["residual"] = torch.randn(1, 1, n, generator=gen).to(DEVICE, dtype)
    x = (3 * torch.randn(1, 1, 2 * k if "gated" in fold else k, generator=gen)).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    y, expected = triton_gemv.gemv(x, w, **kwargs), triton_gemv.reference(x, w, **kwargs)
    assert y.shape == expected.shape == (1, 1, n) and y.dtype == dtype
    # Relative to the size of the summed terms (sum |w| |input| and the residual), which bounds a dot product's
    # rounding however much its terms cancel; the identity matrix reads the prologue's output back.
    prologue = triton_gemv.reference(x, torch.eye(k, device=DEVICE, dtype=dtype), **{**kwargs, "residual": None})
    scale = (prologue.double().abs() @ w.double().abs().T).max().item()
    scale += kwargs["residual"].double().abs().max().item() if "residual" in kwargs else 0.0
    err = (y.double() - expected.double()).abs().max().item() / scale
    assert err <= (1e-6 if dtype == torch.float32 else 2**-6)


@needs_triton
def test_folded_arguments_are_checked():
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"one contiguous row of 64 \(\[gate \| up\]\)"):
        triton_gemv.gemv(torch.randn(1, 32, device=DEVICE), w, gated=True)
    with pytest.raises(ValueError, match="RMSNorm needs a weight of 32"):
        triton_gemv.gemv(torch.randn(1, 32, device=DEVICE), w, torch.ones(16, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual needs one contiguous row of 8"):
        triton_gemv.gemv(torch.randn(1, 32, device=DEVICE), w, residual=torch.randn(1, 4, device=DEVICE))


@needs_triton
def test_a_folded_tiny_model_decodes_the_reference_tokens(tiny_checkpoint, ours_tiny):
    """``compile[fold=true]``'s layers with the real kernel (the output matrix left to ``F.linear``: its
    151936 rows take minutes in the interpreter): fp32 greedy tokens identical, step logits within 1e-5."""
    import qwen3_vl
    from harness.workload import PromptSpec, RowSpec, build_prompt, generate
    from qwen3_vl.model.layers import Linear
    from qwen3_vl.optim.execution.compile import GemvDecoderLayer, use_gemv
    from qwen3_vl.optim.execution.cuda_graph import CudaGraphExecution
    from qwen3_vl.optim.plan import Target

    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan="attention=eager")
    model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, bucket=16)
    use_gemv(model, fold=True)
    model.lm_head.__class__ = Linear
    assert all(type(layer) is GemvDecoderLayer for layer in model.language_model.layers)
    prompt = build_prompt(ours_tiny.config, PromptSpec((RowSpec(3, (4, 4), 2),), seed=5))
    tokens, logits, _ = generate(model, prompt, 6)
    ref_tokens, ref_logits, _ = generate(ours_tiny, prompt, 6)
    assert torch.equal(tokens, ref_tokens)
    assert relative_error(logits, ref_logits) <= 1e-5
