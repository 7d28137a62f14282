"""int8 weights, one scale per output channel, for every linear layer, the output matrix and the
(tied) embedding. Quantized at load from the full-precision weights.

Kernels (``kernel`` parameter; ``auto`` picks per device):

- ``dequant``: ``linear(x, q.to(x.dtype)) * scale``, row-chunked so the dequantized temporary
  stays small. Exact activations; the GPU path on Pascal (no int8 GEMM PyTorch can reach there
  and no Triton), where it saves memory, not time.
- ``avx2``: our kernel (``qwen3_vl/kernels``) on fp32 activations with fp32 accumulation, the
  weight stored with eight rows interleaved; the same products as ``dequant`` up to float
  reassociation, so the same error, at 1 byte per weight. Needs AVX2+FMA+F16C and a C++ compiler.
- ``int8pack``: ``torch._weight_int8pack_mm`` (gpt-fast's CPU kernel) on bf16 activations with
  the result rounded to bf16; reads 1 byte per weight.
- ``fbgemm``: PyTorch's dynamic quantized linear (fbgemm): activations quantized per row to
  uint8 on the fly, int8 x uint8 products with int32 accumulation; reads 1 byte per weight.

The fast kernels serve decode-sized inputs (``SMALL_BATCH_ROWS`` rows or fewer); prefill takes
``dequant`` (compute-bound, exact activations). ``auto`` on CPU is ``avx2`` where it builds, else
``int8pack`` (nearly ``fbgemm``'s speed at a tenth of its error on mini; numbers in
``suites/bench_memory_quant.py``'s output), else ``fbgemm``, else ``dequant``; on GPU ``dequant``.
"""

from __future__ import annotations

import warnings

import torch

from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.optim.plan import Optimization
from qwen3_vl.optim.quant.weights import SMALL_BATCH_ROWS, QuantLinear, linear_in_row_blocks, quantize_int8, swap_in

# Output rows dequantized at a time. On a GPU: bounds the temporary with few launches. On a CPU: a block
# that stays in cache while the GEMM reads it (mini prefill on the AVX2 machine, hand-run: 613 ms median
# with 8192 rows, 532 with 512, 553 with 256).
_CHUNK_ROWS = {"cpu": 512}
_CHUNK_ROWS_DEFAULT = 8192


def codes_as(mod: QuantLinear, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows ``start:end`` of the int8 codes as a [rows, K] ``dtype`` matrix (unscaled), whichever layout
    the kernel keeps (``avx2``: ``pack8``'s, converted back in one vectorized pass)."""
    if mod.weight.dim() == 3:
        end = mod.out_features if end is None else min(end, mod.out_features)
        return cpu_gemv.unpack8_float(mod.weight, start, end).to(dtype)
    return mod.weight[start:end].to(dtype)


def dequant_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    chunk = _CHUNK_ROWS.get(x.device.type, _CHUNK_ROWS_DEFAULT)
    out = linear_in_row_blocks(x, mod.out_features, chunk, lambda s, e: codes_as(mod, x.dtype, s, e))
    return out.mul_(mod.scale.to(x.dtype))


def int8pack_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > SMALL_BATCH_ROWS:
        return dequant_kernel(mod, x)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), mod.weight, mod.scale_bf16).to(x.dtype)


def avx2_gemv(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Every row through our GEMV, each row's sums in the same order whatever the row count."""
    x32 = x.float().contiguous()
    if mod.weight.dim() == 3:
        return cpu_gemv.gemv_packed8(x32, mod.weight, mod.scale).to(x.dtype)
    return cpu_gemv.gemv(x32, mod.weight, mod.scale).to(x.dtype)


def avx2_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > SMALL_BATCH_ROWS:
        return dequant_kernel(mod, x)
    return avx2_gemv(mod, x)


avx2_kernel.all_rows = avx2_gemv  # execution=cpu_packed[batch_invariant] runs prefill rows through it too


def fbgemm_kernel(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > SMALL_BATCH_ROWS:
        return dequant_kernel(mod, x)
    return torch.ops.quantized.linear_dynamic(x.float(), mod.packed, True).to(x.dtype)


# Per-output-row buffers of the layouts these kernels read: concatenated along rows they stay exact,
# so fusion.py can fuse q/k/v and gate/up (fbgemm's prepacked weight and int8pack's bf16 scales cannot).
dequant_kernel.row_buffers = avx2_kernel.row_buffers = ("weight", "scale")

KERNELS = {"dequant": dequant_kernel, "avx2": avx2_kernel, "int8pack": int8pack_kernel, "fbgemm": fbgemm_kernel}


def dequantize_rows(mod: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
    rows = cpu_gemv.packed8_rows(mod.weight, ids) if mod.weight.dim() == 3 else mod.weight[ids]
    return rows.float() * mod.scale[ids, None]


def make_linear(linear, kernel: str) -> QuantLinear:
    q, scale = quantize_int8(linear.weight.detach())
    mod = QuantLinear(linear.in_features, linear.out_features, linear.bias, KERNELS[kernel])
    if kernel == "avx2" and q.shape[0] % 8 == 0:
        q = cpu_gemv.pack8(q)  # eight rows interleaved: one sequential stream per thread
    mod.register_buffer("weight", q)
    mod.register_buffer("scale", scale)
    if kernel == "int8pack":
        mod.register_buffer("scale_bf16", scale.to(torch.bfloat16))
    if kernel == "fbgemm":
        with warnings.catch_warnings():  # quantized tensors are deprecated; the packed kernel is not
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                          0)
            mod.packed = torch.ops.quantized.linear_prepack(qw, None)
    return mod


def available_kernels(device_type: str) -> list[str]:
    """Kernels that run on this build and device, preferred first: ``int8pack`` is within ~15% of
    ``fbgemm``'s speed with ~10x less error (bf16 activations instead of 7-bit ones), measured on mini."""
    if device_type != "cpu":
        return ["dequant"]
    found = []
    if cpu_gemv.unavailable_reason() is None:
        found.append("avx2")
    if hasattr(torch, "_weight_int8pack_mm"):
        found.append("int8pack")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        found.append("fbgemm")
    return [*found, "dequant"]


class Int8Weights:
    name = "int8_weight"

    def __init__(self, model, target, kernel: str = "auto", vision: bool = True) -> None:
        choices = available_kernels(target.device_type)
        if kernel == "auto":
            kernel = choices[0]
        elif kernel not in KERNELS:
            raise ValueError(f"int8_weight kernel '{kernel}' unknown; kernels are: auto, {', '.join(KERNELS)}")
        elif kernel not in choices:
            raise ValueError(f"int8_weight kernel '{kernel}' does not run on {target.device_type} here; "
                             f"available: {', '.join(choices)}")
        self.kernel = kernel
        self.bytes = swap_in(model, lambda linear: make_linear(linear, kernel), dequantize_rows, vision)

    def describe(self) -> dict:
        return {"kernel": self.kernel, **self.bytes}


OPTION = Optimization(
    name="int8_weight",
    axis="quant",
    exact=False,
    summary="int8 weights with per-output-channel scales (linears, output matrix, tied embedding); "
    "our AVX2 kernel (fp32 activations) or PyTorch's int8pack / fbgemm on CPU, dequantize-then-matmul on GPU.",
    build=lambda model, target, **params: Int8Weights(model, target, **params),
    # Measured on a seeded 64-step multimodal conversation: tiny KL 2.9e-4, top-1 95-97%, logits_rel
    # 0.048; mini KL 2.3e-4. Random weights give near-tied logits, so top-1 flips easily: mini's
    # bench prompt (33 teacher-forced steps, harness.bench) measured 0.82-0.85 at KL 2.9-3.2e-4.
    error_budget={"logits_rel": 0.1, "kl": 2e-3, "top1_agreement": 0.8},
    defaults={"kernel": "auto", "vision": True},
    variants=({"kernel": "auto"}, {"kernel": "dequant"}),
)
