"""A one-row matrix product (``y = x @ W.T`` for one token) in Triton, for the compiled GPU decode step.

Why: a batch-1 decode step reads every text weight once, so each product's floor is its weight's bytes
over the memory bandwidth. On an H200 cuBLAS's one-row kernels read the 2b matrices at 1.4-3.3 TB/s and
the 8b ones at 2.6-4.1 of the 4.25 TB/s a copy reaches; this kernel, each program reading one or two
whole rows in 2048-element tiles, 2.1-3.7 and 3.5-4.3 TB/s (``scripts/gpu_gemv_forms.py``, 2026-12-04:
2b 2048x2048 6.0 -> 4.0 us, 8b 4096x4096 13.0 -> 9.7 us, 8b output matrix 297 -> 274 us).
Splitting the reduction over K across programs was measured too (the script's first version) and lost:
the partial sums' extra kernel costs more than the extra parallelism gains.

Products and the sum are fp32 whatever the weight's dtype (as cuBLAS accumulates) and the result is
rounded once to the input's dtype: the same numbers up to float reassociation.

``gemv`` is a ``torch.library.triton_op``, so torch.compile sees into it and CUDA graphs capture it.
Needs Triton (a CUDA GPU of compute capability 7.0+); with ``TRITON_INTERPRET=1`` set before the first
call it runs on the CPU (how the tests check it). ``unavailable_reason()`` says why it cannot run.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch.library import triton_op, wrap_triton


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def tile(n: int, k: int) -> tuple[int, int, int] | None:
    """(rows per program, tile columns, warps) for a [n, k] weight, or None where this kernel is not used:
    k not a multiple of 16, or a matrix of the 8b class (both sides at least 4096). There, alone, one row of
    2048 on eight warps beat cuBLAS for every shape (4096x4096 13.0 -> 9.7 us), but inside the compiled 8b
    step it lost (5.32 against 5.05 ms/token, H200 2026-12-04), so cuBLAS keeps those. Else two rows of
    1024 (the best for every 2b matrix); a smaller k takes the largest power of two dividing it."""
    if min(n, k) >= 4096:
        return None
    block_k = 1024
    while k % block_k:
        block_k //= 2
    return None if block_k < 16 else (2, block_k, 4)


@functools.cache
def _kernel():
    # Built on first use: Triton reads TRITON_INTERPRET when a kernel is defined.
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, out_ptr, n, k, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    k = weight.shape[1]
    if x.numel() != k or weight.stride(1) != 1 or not x.is_contiguous() or weight.dtype != x.dtype:
        raise ValueError(f"gemv needs one contiguous row of {k} in the weight's dtype and a row-major weight; got "
                         f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype} "
                         f"strides {weight.stride()}")


def gemv_tiled(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    """``gemv`` with a tile of the caller's choice (``block_k`` must divide K): what ``tile()`` picks from,
    and what ``scripts/gpu_gemv_forms.py`` sweeps."""
    _check(x, weight)
    n, k = weight.shape
    if k % block_k:
        raise ValueError(f"a tile of {block_k} columns does not divide K = {k}")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    grid = ((n + block_n - 1) // block_n,)
    wrap_triton(_kernel())[grid](x, weight, out, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                 num_warps=warps)
    return out


if unavailable_reason() is None:  # registered only with Triton (torch looks for the op's kernels at registration)

    @triton_op("qwen3_vl::gemv", mutates_args={})
    def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` for one row: ``x`` [..., K] holding one row in all, ``weight`` [N, K] row-major in
        ``x``'s dtype, tiled by ``tile()``; the result is shaped like ``F.linear``'s."""
        config = tile(*weight.shape)
        if config is None:
            raise ValueError(f"gemv is not used for a {weight.shape[0]}x{weight.shape[1]} weight: it needs K to be a "
                             "multiple of 16 and a side under 4096 (see tile())")
        return gemv_tiled(x, weight, *config)

else:

    def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"the Triton GEMV cannot run: {unavailable_reason()}")
