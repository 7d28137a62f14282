"""Our Triton one-row product (the compiled GPU decode step's GEMV): against float64 math on the same
weights over shapes and dtypes (on the CPU through Triton's interpreter; skipped where Triton is not
installed, as on the CI machines, whose fingerprint would change with it); the tile rule; bad arguments
refused with the problem named."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_vl.kernels import triton_gemv

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
@given(n=st.integers(1, 70), k16=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_the_product_is_the_stored_weights_product(n, k16, dtype, seed):
    """Any row count (the last program's rows masked), K any multiple of 16 (tiles of its largest power of
    two): fp32 sums of the same products, so float reassociation in fp32 and one rounding in bf16 (within one
    bf16 unit: Triton's CPU interpreter truncates where the GPU rounds to nearest)."""
    gen = torch.Generator().manual_seed(seed)
    k = 16 * k16
    x = torch.randn(1, 1, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    exact = x.double() @ w.double().T
    y = triton_gemv.gemv(x, w)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    err = ((y.double() - exact).abs().max() / exact.abs().max()).item()
    assert err <= (1e-6 if dtype == torch.float32 else 2**-7)


@needs_triton
def test_bad_arguments_are_refused_with_the_problem_named():
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one contiguous row of 32"):
        triton_gemv.gemv(torch.randn(2, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight's dtype"):
        triton_gemv.gemv(torch.randn(1, 32, device=DEVICE, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_gemv.gemv(torch.randn(1, 24, device=DEVICE), torch.randn(8, 24, device=DEVICE))
