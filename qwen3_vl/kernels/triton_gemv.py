"""A one-row matrix product (``y = x @ W.T`` for one token) in Triton, for the compiled GPU decode step.

Why: a batch-1 decode step reads every text weight once, so each product's floor is its weight's bytes
over the memory bandwidth. On an H200 cuBLAS's one-row kernels read the 2b matrices at 1.4-3.3 TB/s and
the 8b ones at 2.6-4.1 of the 4.25 TB/s a copy reaches; this kernel, each program reading one or two
whole rows in 2048-element tiles, 2.1-3.7 and 3.5-4.3 TB/s (``scripts/gpu_gemv_forms.py``, 2026-12-04:
2b 2048x2048 6.0 -> 4.0 us, 8b 4096x4096 13.0 -> 9.7 us, 8b output matrix 297 -> 274 us).
Splitting the reduction over K across programs was measured too (the script's first version) and lost:
the partial sums' extra kernel costs more than the extra parallelism gains.

Products and the sum are fp32 whatever the weight's dtype (as cuBLAS accumulates) and the result is
rounded once to the input's dtype: the same numbers up to float reassociation. A decoder layer's small
kernels can ride along (``compile[fold=true]``): an RMSNorm of the row before the product (each program
recomputes the row's sum of squares), SiLU-and-gate of a [gate | up] row before it, a residual added after,
each rounded where the eager layer rounds (``reference`` spells the contract out in PyTorch ops).

``gemv`` is a ``torch.library.triton_op``, so torch.compile sees into it and CUDA graphs capture it.
Needs Triton (a CUDA GPU of compute capability 7.0+); with ``TRITON_INTERPRET=1`` set before the first
call it runs on the CPU (how the tests check it). ``unavailable_reason()`` says why it cannot run.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from qwen3_vl.model.layers import rms_norm


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
    def gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, n, k, stride_w, eps, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr):
        # The folded prologues and epilogue round where the eager layer rounds (to the input's dtype after the
        # normalisation, after the norm weight, after SiLU, after the gate product, before the residual add):
        # the same numbers as the unfolded ops up to float reassociation.
        dtype = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        if NORM:  # every program recomputes the row's statistics: K values, read from L2
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, k, BLOCK_K):
                x = tl.load(x_ptr + start + tl.arange(0, BLOCK_K)).to(tl.float32)
                squares += x * x
            # eps in fp32 whatever the launcher typed it: Inductor passes Python floats as fp64 scalars
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / k + tl.cast(eps, tl.float32))
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols).to(tl.float32)
            if GATED:  # x holds [gate | up]: silu(gate) * up
                up = tl.load(x_ptr + k + cols).to(tl.float32)
                x = (x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32)
                x = (x * up).to(dtype).to(tl.float32)
            if NORM:
                x = (x * rstd).to(dtype).to(tl.float32)
                x = (tl.load(norm_ptr + cols).to(dtype).to(tl.float32) * x).to(dtype).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if RESIDUAL:
            y = y.to(dtype).to(tl.float32) + tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


def _check(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None, gated: bool,
           residual: torch.Tensor | None) -> None:
    n, k = weight.shape
    width = 2 * k if gated else k
    if x.numel() != width or weight.stride(1) != 1 or not x.is_contiguous() or weight.dtype != x.dtype:
        raise ValueError(f"gemv needs one contiguous row of {width}{' ([gate | up])' if gated else ''} in the "
                         f"weight's dtype and a row-major weight; got x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype} strides {weight.stride()}")
    if norm is not None and norm.shape != (k,):
        raise ValueError(f"gemv's folded RMSNorm needs a weight of {k}; got {tuple(norm.shape)}")
    if residual is not None and (residual.numel() != n or residual.dtype != x.dtype or not residual.is_contiguous()):
        raise ValueError(f"gemv's folded residual needs one contiguous row of {n} in {x.dtype}; got "
                         f"{tuple(residual.shape)} {residual.dtype}")


def gemv_tiled(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, warps: int,
               norm: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``gemv`` with a tile of the caller's choice (``block_k`` must divide K): what ``tile()`` picks from,
    and what ``scripts/gpu_gemv_forms.py`` sweeps."""
    _check(x, weight, norm, gated, residual)
    n, k = weight.shape
    if k % block_k:
        raise ValueError(f"a tile of {block_k} columns does not divide K = {k}")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    grid = ((n + block_n - 1) // block_n,)
    # Pointers the flags leave unread still need a tensor: x stands in.
    wrap_triton(_kernel())[grid](x, weight, out, x if norm is None else norm, x if residual is None else residual,
                                 n, k, weight.stride(0), eps, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None,
                                 GATED=gated, RESIDUAL=residual is not None, num_warps=warps)
    return out


def reference(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
              gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """What ``gemv`` computes, in the eager layer's PyTorch ops (its contract, and its tests' oracle):
    ``residual + linear(rmsnorm(x) or silu(gate) * up, weight)``."""
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm is not None:
        x = rms_norm(x, norm, eps)
    y = F.linear(x, weight)
    return y if residual is None else residual.view_as(y) + y


if unavailable_reason() is None:  # registered only with Triton (torch looks for the op's kernels at registration)

    @triton_op("qwen3_vl::gemv", mutates_args={})
    def gemv(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
             gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T`` for one row: ``x`` [..., K] holding one row in all, ``weight`` [N, K] row-major in
        ``x``'s dtype, tiled by ``tile()``; the result is shaped like ``F.linear``'s. Optionally folded in
        (``reference`` spells it out): an RMSNorm of ``x`` with weight ``norm`` [K] before the product;
        ``gated``: ``x`` is [..., 2K] holding [gate | up] and the product's input is ``silu(gate) * up``;
        ``residual`` [..., N] added to the result."""
        config = tile(*weight.shape)
        if config is None:
            raise ValueError(f"gemv is not used for a {weight.shape[0]}x{weight.shape[1]} weight: it needs K to be a "
                             "multiple of 16 and a side under 4096 (see tile())")
        return gemv_tiled(x, weight, *config, norm=norm, eps=eps, gated=gated, residual=residual)

else:

    def gemv(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
             gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError(f"the Triton GEMV cannot run: {unavailable_reason()}")
