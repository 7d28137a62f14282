"""int4 weights, group-wise (``group`` input channels per scale and zero point, default 128),
packed two per byte, for every linear layer, the output matrix and the (tied) embedding.

Kernels (``kernel`` parameter; ``auto`` picks per device):

- ``avx2`` (CPU, where our kernels build; ``auto`` there): our GEMV over the codes with eight rows
  interleaved (``qwen3_vl/kernels``): per group an integer dot product of the codes with the inputs
  rounded to int16 (at most 1.5e-5 of the group's largest input), then scale and offset once per
  group and row. 31 G weights/s over mini's output matrix on the AVX2 CI machine against 14.8 with
  the codes converted to floats (compute-bound) and int8's 19.4 (read-bound). Prefill dequantizes
  512 rows at a time from the same layout into a cache-sized block and multiplies in fp32. Layers
  whose rows or group are not a multiple of 8 (small presets) take ``dequant``.
- ``dequant``: unpack + dequantize (row-chunked) then ``linear``: exact activations; the GPU path
  on Pascal (``torch._weight_int4pack_mm`` needs sm80 tensor cores).
- ``int4pack``: ``torch._weight_int4pack_mm_for_cpu`` on bf16 activations for decode-sized
  inputs (the weights are also kept in that kernel's blocked layout, so on CPU a tied output
  matrix is held twice: plain packed codes for embedding lookups, blocked codes for the head;
  1 byte per parameter for that matrix instead of 0.5).

Prefill-sized inputs (more than ``SMALL_BATCH_ROWS`` rows) always take ``dequant``.
"""

from __future__ import annotations

import torch

from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.optim.plan import Optimization
from qwen3_vl.optim.quant.weights import (
    SMALL_BATCH_ROWS,
    QuantLinear,
    dequantize_int4,
    linear_in_row_blocks,
    quantize_int4,
    swap_in,
    unpack_int4,
)

_CHUNK_ROWS = 8192
_AVX2_CHUNK_ROWS = 512  # prefill: rows dequantized at a time (2 MiB of fp32 at K = 1024), as int8's


def dequant_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return linear_in_row_blocks(x, mod.out_features, _CHUNK_ROWS, lambda s, e: dequantize_int4(
        mod.weight[s:e], mod.scale[s:e], mod.zero[s:e], mod.group, x.dtype))


def int4pack_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > SMALL_BATCH_ROWS:
        return dequant_kernel(mod, x)
    out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), mod.blocked, mod.group, mod.scale_zero_bf16)
    return out.to(x.dtype)


def avx2_gemv(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Every row through our GEMV (each row's inputs rounded to int16 on their own, so a row's result
    does not depend on the row count)."""
    return cpu_gemv.gemv_int4(x.float().contiguous(), mod.weight, mod.scale, mod.offset, mod.group).to(x.dtype)


def avx2_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SMALL_BATCH_ROWS:
        return avx2_gemv(mod, x)
    return linear_in_row_blocks(x, mod.out_features, _AVX2_CHUNK_ROWS, lambda s, e: cpu_gemv.unpack_int4_float(
        mod.weight, mod.scale, mod.offset, mod.group, s, e).to(x.dtype))


# per-output-row buffers that concatenate exactly along rows (blocks of eight rows), so fusion.py can
# fuse q/k/v and gate/up
avx2_kernel.row_buffers = ("weight", "scale", "offset")
avx2_kernel.all_rows = avx2_gemv  # execution=cpu_packed[batch_invariant] runs prefill rows through it too

KERNELS = {"avx2": avx2_kernel, "dequant": dequant_kernel, "int4pack": int4pack_kernel}


def dequantize_rows(mod: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
    if mod.kernel is avx2_kernel:  # rows out of the interleaved layout: block ids // 8, lane ids % 8
        q = unpack_int4(cpu_gemv.packed8_rows(mod.weight, ids)).view(len(ids), -1, mod.group).float()
        scale, offset = cpu_gemv.packed8_rows(mod.scale, ids), cpu_gemv.packed8_rows(mod.offset, ids)
        return (q * scale[..., None] + offset[..., None]).view(len(ids), -1)
    return dequantize_int4(mod.weight[ids], mod.scale[ids], mod.zero[ids], mod.group, torch.float32)


def make_linear(linear, kernel: str, group: int) -> QuantLinear:
    if linear.in_features % group:
        # layers narrower than the group (small presets): the largest group that divides them
        group = next(g for g in (64, 32, 16, 8, 2) if linear.in_features % g == 0)
    packed, scale, zero = quantize_int4(linear.weight.detach(), group)
    if kernel == "avx2" and (linear.out_features % 8 or group % 8):
        kernel = "dequant"  # the interleaved layout needs whole blocks of eight rows and of eight columns
    mod = QuantLinear(linear.in_features, linear.out_features, linear.bias, KERNELS[kernel])
    mod.group = group
    if kernel == "avx2":
        for name, t in zip(("weight", "scale", "offset"), cpu_gemv.pack8_int4(packed, scale, zero), strict=True):
            mod.register_buffer(name, t)
        return mod
    mod.register_buffer("weight", packed)
    mod.register_buffer("scale", scale)
    mod.register_buffer("zero", zero)
    if kernel == "int4pack":
        if linear.out_features % 16 or group < 32:
            mod.kernel = dequant_kernel  # the blocked CPU layout needs N % 16 == 0 and groups >= 32
        else:
            mod.register_buffer("blocked", torch._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).int(), 1))
            sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/group, N, 2]
            mod.register_buffer("scale_zero_bf16", sz.to(torch.bfloat16))
    return mod


def available_kernels(device_type: str) -> list[str]:
    """Fastest measured first (mini on the AVX2 CI machine: see the README's CPU table)."""
    found = []
    if device_type == "cpu" and cpu_gemv.unavailable_reason() is None:
        found.append("avx2")
    if device_type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        found.append("int4pack")
    return [*found, "dequant"]


class Int4Weights:
    name = "int4_weight"

    def __init__(self, model, target, kernel: str = "auto", group: int = 128, vision: bool = True) -> None:
        choices = available_kernels(target.device_type)
        if kernel == "auto":
            kernel = choices[0]
        elif kernel not in choices:
            raise ValueError(f"int4_weight kernel '{kernel}' is not available on {target.device_type}; "
                             f"available: {', '.join(choices)}")
        if group < 2 or group % 2:
            raise ValueError(f"int4_weight group must be even and >= 2, got {group}")
        self.kernel, self.group = kernel, group
        self.bytes = swap_in(model, lambda linear: make_linear(linear, kernel, group), dequantize_rows, vision)

    def describe(self) -> dict:
        return {"kernel": self.kernel, "group": self.group, **self.bytes}


OPTION = Optimization(
    name="int4_weight",
    axis="quant",
    exact=False,
    summary="int4 weights, asymmetric per group of 128 inputs, two per byte (linears, output matrix, "
    "tied embedding); our AVX2 integer-dot kernel on CPU (int4pack where it does not build), "
    "dequantize-then-matmul on GPU.",
    build=lambda model, target, **params: Int4Weights(model, target, **params),
    # Measured on a seeded 64-step multimodal conversation: tiny KL 0.056, top-1 33%, logits_rel 0.55;
    # mini KL 0.065; the harness's whole-model check on tiny (its fixed prompt, decode steps) measured
    # top-1 0.235 and decode KL 0.104, so the budget sits just past the worst of these. Random uniform
    # weights are a hard case for 4 bits (every weight uses the whole range) and their near-tied logits
    # make top-1 fragile; real checkpoints must be measured.
    error_budget={"logits_rel": 0.8, "kl": 0.12, "top1_agreement": 0.2},
    defaults={"kernel": "auto", "group": 128, "vision": True},
    variants=({"kernel": "auto"}, {"kernel": "dequant"}),
)
