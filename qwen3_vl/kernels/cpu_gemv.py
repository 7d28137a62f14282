"""Our own matrix-vector kernel for CPU decode on AVX2 machines (``gemv_avx2.cpp``).

Why: a batch-1 decode step reads every text weight once, so its floor is bytes / memory bandwidth.
On AVX2 CPUs without AVX-512 (the i5-10210U class) PyTorch's fp32 GEMV paths read 13-17 GB/s of
the 27 GB/s the 2-core CI machine measures, and its int8 weight-only kernel (``int8pack``) rounds
activations to bf16. Both kernels keep fp32 activations and accumulation for fp32, fp16, bf16 and
int8 weights (int8 with one scale per output row) and thread through ATen's OpenMP pool (so
``torch.set_num_threads`` applies): ``gemv`` reads the usual row-major ``[N, K]`` weight (best for
fp32), ``gemv_packed8`` a copy made by ``pack8`` with eight rows interleaved (best for the 1- and
2-byte types; the measurements are in ``gemv_avx2.cpp``).

Built on first use with the machine's C++ compiler through ``torch.utils.cpp_extension`` (needs
ninja and g++/clang; about 12 s on the CI machine, then cached under ``TORCH_EXTENSIONS_DIR``).
Unavailable (no AVX2/FMA/F16C, not x86, no compiler, build error): ``unavailable_reason()`` says
why and the options that use it fall back to PyTorch's kernels.
"""

from __future__ import annotations

import functools
import os
import platform
import types

import torch

from qwen3_vl.hardware.detect import detect_machine

SOURCE = os.path.join(os.path.dirname(__file__), "gemv_avx2.cpp")
_NEEDS = ("avx2", "fma", "f16c")


@functools.cache
def _load() -> tuple[object | None, str | None]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the AVX2 GEMV kernel is x86-only; this CPU is {platform.machine()}"
    missing = [f for f in _NEEDS if f not in detect_machine().cpu_flags]
    if missing:
        return None, f"the AVX2 GEMV kernel needs {', '.join(missing)}, which this CPU lacks"
    if os.environ.get("QWEN3_VL_NO_CPU_KERNELS"):
        return None, "QWEN3_VL_NO_CPU_KERNELS is set"
    try:
        from torch.utils.cpp_extension import load

        load(name="qwen3_vl_cpu_gemv", sources=[SOURCE], is_python_module=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"building the AVX2 GEMV kernel failed ({type(e).__name__}: {first[:200]})"
    ns = torch.ops.qwen3_vl_cpu  # resolved once: each attribute lookup on torch.ops costs microseconds
    ops = types.SimpleNamespace(**{name: getattr(ns, name) for name in ("gemv", "gemv_packed8", "unpack8_float",
                                                                       "rms_norm", "qk_norm_rope", "silu_mul",
                                                                       "causal_attention", "gemv_int4",
                                                                       "unpack_int4_float")})
    return ops, None


def unavailable_reason() -> str | None:
    """None when ``gemv`` runs here, else why not (building it on the first call)."""
    return _load()[1]


def _ops():
    ops, reason = _load()
    if ops is None:
        raise RuntimeError(reason)
    return ops


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [B, K] fp32 @ (weight [N, K] * scale[:, None]).T -> [B, N] fp32``; weight fp32, fp16, bf16
    or int8 (int8 with ``scale``, one fp32 per row). Meant for small B (decode): each weight row
    is read from memory once and reused from cache for the other rows of ``x``."""
    return _ops().gemv(x, weight, scale)


def gemv_packed8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``gemv`` on a weight laid out by ``pack8``."""
    return _ops().gemv_packed8(x, packed, scale)


def pack8(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/8, K, 8]: eight consecutive rows interleaved (N must be a multiple of 8)."""
    n, k = weight.shape
    if n % 8:
        raise ValueError(f"pack8 needs a multiple of 8 rows, got {n}")
    return weight.view(n // 8, 8, k).transpose(1, 2).contiguous()


def unpack8_float(packed: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows ``start:end`` (multiples of 8) of the [N, K] matrix ``pack8`` interleaved, as fp32, in one
    vectorized pass (prefill's GEMM input)."""
    return _ops().unpack8_float(packed, start, packed.shape[0] * 8 if end is None else end)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` for contiguous fp32 ``x``, one thread: for the few
    rows of a decode step, where PyTorch's composite op costs more in dispatch than in work."""
    return _ops().rms_norm(x, weight, eps)


def qk_norm_rope(qkv: torch.Tensor, q_norm, k_norm, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                 kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a fused q/k/v projection ``[R, (heads + 2 kv_heads) * d]`` -> q ``[R, heads, d]``
    and k ``[R, kv_heads, d]`` RMS-normed per head (``q_norm``/``k_norm`` modules) and rotated by
    ``cos``/``sin`` ``[R, d]``, and v ``[R, kv_heads, d]``; fp32, contiguous."""
    return _ops().qk_norm_rope(qkv, q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps, cos, sin, heads, kv_heads)


def pack8_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``quantize_int4``'s codes ``[N, K/2]`` (two per byte) and fp32 ``scale``/``zero`` ``[N, K/group]``
    -> the layout ``gemv_int4`` reads: codes ``[N/8, K/2, 8]`` (eight rows interleaved, each byte
    still two columns of one row), scale and offset ``[N/8, K/group, 8]`` with weight = q * scale +
    offset (offset = zero - 8 scale, folded once here instead of per weight)."""
    return pack8(packed), pack8(scale.float()), pack8(zero.float() - 8 * scale.float())


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
              group: int) -> torch.Tensor:
    """``x [B, K] fp32`` times the int4 matrix ``pack8_int4`` laid out, transposed: ``[B, N]``."""
    return _ops().gemv_int4(x, packed, scale, offset, group)


def unpack_int4_float(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int, start: int = 0,
                      end: int | None = None) -> torch.Tensor:
    """Rows ``start:end`` (multiples of 8) of the int4 matrix ``pack8_int4`` laid out, dequantized to
    row-major fp32 in one vectorized pass (prefill's GEMM input)."""
    return _ops().unpack_int4_float(packed, scale, offset, group, start, packed.shape[0] * 8 if end is None else end)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection ``[..., 2 I]`` (gate first) -> ``[..., I]``; fp32,
    contiguous, one thread (decode rows). ``exp`` is Cephes' polynomial (within 2 ulp)."""
    return _ops().silu_mul(gate_up)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Softmax attention of the last ``L`` positions, ``q [B, Hq, L, d]``, over the cached ``k``/``v``
    ``[B, Hkv, T, d]`` (grouped heads; strided views with a contiguous last dimension, as the static
    cache returns them), causal (query ``l`` sees keys ``0 .. T - L + l``), keys with ``valid [B, T]``
    False skipped; a row that sees no key gets the mean of all values (eager's answer). fp32 on CPU.
    Each row's sums run in an order fixed by its key count alone, so a row gives the same bits in a
    prefill as in a decode step."""
    return _ops().causal_attention(q, k, v, valid, scale)


def packed8_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the matrix ``pack8`` interleaved: [len(ids), K]."""
    return packed[ids // 8, :, ids % 8]
