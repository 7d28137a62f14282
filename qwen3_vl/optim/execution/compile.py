"""torch.compile + CUDA graphs: the decode step compiled by Inductor (Triton kernels that fuse the
elementwise work of each layer) and then captured and replayed like ``cuda_graph``. With ``gemv=True``
the text decoder's one-row products (every projection and the output matrix in a decode step) are our
Triton GEMV (``qwen3_vl/kernels/triton_gemv.py``) instead of cuBLAS's; any product of more rows (the
prefill) stays cuBLAS's. With ``fold=True`` each layer's one-row call is ``GemvDecoderLayer``'s: its RMSNorms,
residual adds and SiLU gate ride in the GEMVs' prologues and epilogue, which removes about three of Inductor's
small kernels a layer (off by default: no gain measured on an H100). With ``prefill_compile=True`` the captured
prefill's text layers and ViT blocks are compiled too, one compiled code per kind of layer (``prefill_graph.py``'s
``LayerRegions``; off by default: on an H100 it took the 2b first token to 7.5 ms against prefill_qk's 8.8, but the
first prompt of a second length compiled for 10.6 s). With ``attend=True`` (the default)
each layer's one-query attention against the graph cache (q/k RMSNorm, M-RoPE, the cache write, scores, softmax,
values: six launches) is two Triton kernels, a split over the cached positions and a combine
(``qwen3_vl/kernels/triton_decode_attention.py``): on an H100, 6.3 instead of 16.8 us a layer at the 2b
benchmark's cache, 1.78 instead of 2.12 ms per 2b token and 6.39 instead of 6.61 per 8b token. With
``prefill_qk`` (on by default wherever ``attend`` is and ``prefill_compile`` is not) the prefill's q/k RMSNorms and
M-RoPE are one Triton kernel a layer instead of about eighteen small ones, and each ViT layer's q/k rotary one
instead of about fourteen: on an H100 the 2b first token took 8.8 instead of 11.3 ms (9.8 instead of 12.3 in a second
process), with no compile. Caches of ``attend_grouped_from`` rows or more (4096 by default) take the decode kernel's
grouped form: a program per KV head and slice, each cached tile read once for the query heads that share it (the
split form reads it once per query head): at 8b's 4096-row cache 13.8 instead of 27.2 us a layer on an H100, while at
512 rows the split form was faster.

Triton refuses GPUs below compute capability 7.0, so on a Pascal (sm_61) GPU this option is
unavailable and falls back to ``cuda_graph`` with that reason recorded.
"""

from __future__ import annotations

import torch

from qwen3_vl.kernels.triton_decode_attention import (
    decode_attention,
    fits,
    qk_fits,
    qk_norm_rotary,
    vision_fits,
    vision_rotary,
)
from qwen3_vl.kernels.triton_gemv import gemv, tile, unavailable_reason
from qwen3_vl.model.layers import Linear
from qwen3_vl.model.text import DecoderLayer, TextAttention
from qwen3_vl.model.vision import VisionAttention
from qwen3_vl.optim.execution.cuda_graph import NEEDS, CudaGraphExecution
from qwen3_vl.optim.execution.fusion import FusedTextAttention, FusedTextMLP
from qwen3_vl.optim.plan import Optimization, Requirements, Target

# Caches of at least this many rows take the decode kernel's grouped form. Measured on an H100
# (scripts/gpu_attention_kernel.py, 2026-12-07, bf16, us a layer): at a 512-row cache the split form won (2b 6.38
# against 7.31, 8b 7.37 against 7.54); at 8b's 4096-row cache the grouped form took 13.84 against 27.18 (Inductor
# 24.40). Where between the two they cross is not measured; 4096 is the shortest cache measured to gain.
GROUPED_FROM = 4096


def _triton_reason(target: Target) -> str | None:
    reason = unavailable_reason()
    return None if reason is None else f"{reason} (torch.compile's GPU backend needs it)"


class GemvLinear(Linear):
    """A bias-free text ``Linear`` whose one-row products go through the Triton GEMV (exact: fp32 sums)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.dtype == self.weight.dtype:
            return gemv(x.contiguous(), self.weight)
        return super().forward(x)


class GemvDecoderLayer(DecoderLayer):
    """A fused decoder layer (``fuse_projections``'s) whose one-row call folds its small kernels into the four
    GEMVs: the input RMSNorm into the q/k/v product, the residual add into ``o_proj``'s, the second RMSNorm into
    gate/up's, SiLU-and-gate and the residual into ``down``'s (``gemv``'s prologues and epilogue, rounding where
    the layer rounds). Any other call, or one a hook watches, is the plain layer's."""

    def forward(self, x, cos, sin, mask, cache, attention) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        if x.numel() != x.shape[-1] or x.dtype != mlp.down_proj.weight.dtype or attn._forward_hooks \
                or attn._forward_pre_hooks:
            return super().forward(x, cos, sin, mask, cache, attention)
        norm, post = self.input_layernorm, self.post_attention_layernorm
        q, k, v = gemv(x, attn.qkv_proj.weight, norm.weight, norm.eps).split(attn.qkv_sizes, dim=-1)
        out = attn.attend(q, k, v, cos, sin, mask, cache, attention).contiguous()
        h = gemv(out, attn.o_proj.weight, residual=x)
        gate_up = gemv(h, mlp.gate_up_proj.weight, post.weight, post.eps)
        return gemv(gate_up, mlp.down_proj.weight, gated=True, residual=h)


class KernelAttention(TextAttention):
    """The attention whose one-query step against the graph cache in graph mode (the captured decode step) is
    the Triton ``decode_attention``: norms, rotary, cache write and attention in two kernels. Any other call (the
    prefill, an eager cache) is the plain attention's; with ``prefill_qk`` its q/k norms and rotary are one Triton
    kernel (``qk_norm_rotary``) where the inputs fit: a captured 2b prefill spends most of its time in such small
    kernels (about 1700 launches against about 2 ms of arithmetic)."""

    prefill_qk = False  # set per layer by ``use_decode_attention``
    grouped_from = GROUPED_FROM  # likewise: caches of at least this many rows take the kernel's grouped form
    qk_unfit = 0  # calls the q/k kernel did not take (they ran the plain ops): counted in ``describe()``

    def attend(self, q, k, v, cos, sin, mask, cache, attention) -> torch.Tensor:
        if q.shape[1] != 1 or not getattr(cache, "graph_mode", False):
            return super().attend(q, k, v, cos, sin, mask, cache, attention)
        keys, values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        return decode_attention(q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin, keys,
                                values, cache.position, cache.valid, self.head_dim**-0.5, q.shape[-1] // self.head_dim,
                                keys.shape[1], keys.shape[2] >= self.grouped_from)

    def position(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefill_qk:
            return super().position(q, k, cos, sin)
        if not qk_fits(q, k, cos, sin, self.head_dim):
            self.qk_unfit += 1
            return super().position(q, k, cos, sin)
        return qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin,
                              q.shape[-1] // self.head_dim, k.shape[-1] // self.head_dim)


class KernelVisionAttention(VisionAttention):
    """The ViT attention with its q/k rotary in one Triton kernel (``vision_rotary``) where the inputs fit."""

    prefill_qk = True
    qk_unfit = 0  # as ``KernelAttention``'s

    def position(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        if not vision_fits(q, k, cos, sin):
            self.qk_unfit += 1
            return super().position(q, k, cos, sin)
        return vision_rotary(q, k, cos, sin)


class FusedKernelAttention(FusedTextAttention, KernelAttention):
    """``KernelAttention`` over the fused q/k/v product (its q, k and v are views of one row)."""


def use_decode_attention(model, prefill_qk: bool = False, grouped_from: int = GROUPED_FROM) -> int:
    """Swap each text attention (fused or not) to its ``KernelAttention`` where the kernel takes its head size (a
    power of two) and both norms share one eps, with ``prefill_qk`` its prefill's q/k kernel on (and the ViT's
    rotary kernel, ``KernelVisionAttention``) and the decode kernel's grouped form for caches of ``grouped_from``
    rows or more; returns how many text layers."""
    kernel_class = {TextAttention: KernelAttention, FusedTextAttention: FusedKernelAttention}
    swapped = 0
    for layer in model.language_model.layers:
        attn = layer.self_attn
        if type(attn) in kernel_class and fits(attn.head_dim) and attn.q_norm.eps == attn.k_norm.eps:
            attn.__class__ = kernel_class[type(attn)]
            attn.prefill_qk, attn.grouped_from = prefill_qk, grouped_from
            swapped += 1
    if prefill_qk:
        for block in model.visual.blocks:
            if type(block.attn) is VisionAttention:
                block.attn.__class__ = KernelVisionAttention
    return swapped


def prefill_qk_state(modules) -> dict:
    """Of ``modules`` (a model's), how many run the prompt's q/k kernels (text and ViT layers), and how many of
    their calls the kernels did not take (inputs they do not fit: the plain ops ran instead)."""
    kernels = [m for m in modules if getattr(m, "prefill_qk", False)]
    return {"layers": len(kernels), "unfit_calls": sum(m.qk_unfit for m in kernels)}


def _foldable(layer) -> bool:
    """A plain fused layer whose four matrices ``use_gemv`` sent to the kernel."""
    attn, mlp = layer.self_attn, layer.mlp
    return type(layer) is DecoderLayer and type(attn) is FusedTextAttention and type(mlp) is FusedTextMLP \
        and all(type(lin) is GemvLinear for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))


def use_gemv(model, fold: bool = False) -> int:
    """Swap the text decoder's plain bias-free ``Linear`` projections and the output matrix to
    ``GemvLinear`` where the kernel fits the shape, and with ``fold`` each fused layer whose four matrices it
    fits to ``GemvDecoderLayer``; returns how many matrices go through the kernel."""
    swapped = 0
    for module in [*model.language_model.modules(), model.lm_head]:
        if type(module) is Linear and module.bias is None and tile(*module.weight.shape) is not None:
            module.__class__ = GemvLinear
            swapped += 1
    if fold:
        for layer in model.language_model.layers:
            if _foldable(layer):
                layer.__class__ = GemvDecoderLayer
    return swapped


class CompiledExecution(CudaGraphExecution):
    name = "compile"

    def __init__(self, model, target: Target, fuse: bool = True, bucket: int = 256, prefill_graphs: int = 8,
                 prefill_bucket: int = 64, gemv: bool = True, host_choice: bool = False, fold: bool = False,
                 prefill_compile: bool = False, attend: bool = True, prefill_qk: bool | None = None,
                 attend_grouped_from: int = GROUPED_FROM) -> None:
        import torch._dynamo

        if prefill_qk and not attend:
            raise ValueError("compile's prefill_qk=true is part of the attention kernels: it needs attend=true")
        if prefill_qk and prefill_compile:
            raise ValueError("compile's prefill_qk=true and prefill_compile=true are two ways to fuse the prefill's "
                             "q/k norms and rotary (our kernels, or Inductor's): choose one")
        if attend_grouped_from < 0:
            raise ValueError(f"compile's attend_grouped_from counts cached rows: 0 or more, got {attend_grouped_from}")
        if prefill_qk is None:  # the default: on wherever the attention kernels are and Inductor is not asked to fuse
            prefill_qk = attend and not prefill_compile
        if fold and not (gemv and fuse):
            raise ValueError("compile's fold=true folds the norms and residual adds into the GEMV of the fused "
                             "projections: it needs gemv=true and fuse=true")

        # Where an option's code breaks the traced graph inside a layer, each layer's frame is
        # specialised on its index; allow one variant per layer (and a few more) before dynamo
        # gives up on compiling a frame.
        layers = model.config.text.num_hidden_layers
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * layers + 8)
        super().__init__(model, target, fuse, bucket, compile_step=True, prefill_graphs=prefill_graphs,
                         prefill_bucket=prefill_bucket, host_choice=host_choice, prefill_compile=prefill_compile)
        self.gemv_layers = use_gemv(model, fold) if gemv else 0  # after fusing: the fused projections are swapped
        self.folded_layers = sum(type(layer) is GemvDecoderLayer for layer in model.language_model.layers)
        # after folding: it checks the attention's type
        self.attention_kernel_layers = use_decode_attention(model, prefill_qk, attend_grouped_from) if attend else 0
        self.attend_grouped_from = attend_grouped_from
        self.attentions = [*(layer.self_attn for layer in model.language_model.layers),
                           *(block.attn for block in model.visual.blocks)]  # for describe()

    def describe(self) -> dict:
        return {**super().describe(), "gemv_layers": self.gemv_layers, "folded_layers": self.folded_layers,
                "attention_kernel_layers": self.attention_kernel_layers,
                "attend_grouped_from": self.attend_grouped_from,
                "prefill_qk": prefill_qk_state(self.attentions)}


OPTION = Optimization(
    name="compile",
    axis="execution",
    exact=True,
    summary=(
        "Decode step compiled by torch.compile (Inductor/Triton fuses each layer's elementwise work) and "
        "replayed as a CUDA graph, with fused projections, one-row products of matrices with a side under 4096 "
        "(2b-class) through our Triton GEMV (gemv=false: cuBLAS's; fold=true: each layer's norms, residual adds and "
        "SiLU gate folded into its GEMVs), greedy tokens chosen inside the graph "
        "(host_choice=true: by the host) and cuda_graph's captured prefill (prefill_compile=true: its text layers "
        "and ViT blocks compiled before the capture, one compiled code for all layers of a kind); each layer's "
        "one-query attention (q/k norms, rotary, cache write, softmax attention) our Triton split-and-combine "
        "kernels (attend=false: Inductor's kernels), from attend_grouped_from cached rows on (4096) one program per KV "
        "head reading each cached tile once for its query heads; the prefill's q/k norms and rotary, the ViT's "
        "included, one Triton kernel a layer (prefill_qk=false: the plain ops); needs Triton, so sm_70+."
    ),
    build=lambda model, target, **params: CompiledExecution(model, target, **params),
    requires=Requirements(devices=("cuda",), min_compute_capability=(7, 0)),
    probe=_triton_reason,
    needs=NEEDS,
    fallback="cuda_graph",
    defaults={"fuse": True, "bucket": 256, "prefill_graphs": 8, "prefill_bucket": 64, "gemv": True,
              "host_choice": False, "fold": False, "prefill_compile": False, "attend": True,
              "prefill_qk": True, "attend_grouped_from": GROUPED_FROM},
)
