"""Fused projections (gpt-fast style data layout, not an option of its own): q/k/v in one matmul,
gate/up in one matmul. Fewer, larger kernels per layer; the same products, so the results agree
with the separate matmuls to float reassociation (the GEMM may block the larger N differently).

Applied by module class swap after the weights are loaded. Plain ``Linear`` projections are fused,
and quantized ones whose kernel names its ``row_buffers`` (per-output-row data that concatenates
exactly: int8 codes and scales, int4 codes, scales and offsets in our kernel's layout); others
(fbgemm's prepacked weights, int4pack's tiles) keep their modules. A fused model cannot be saved as a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3_vl.model.layers import Linear
from qwen3_vl.model.text import TextAttention, TextMLP
from qwen3_vl.optim.quant.weights import QuantLinear


def _concat(*linears: Linear) -> Linear:
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    fused = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    return fused


def _concat_quantized(*mods: QuantLinear) -> QuantLinear:
    kernel = mods[0].kernel
    fused = QuantLinear(mods[0].in_features, sum(m.out_features for m in mods), None, kernel)
    for name in kernel.row_buffers:
        fused.register_buffer(name, torch.cat([getattr(m, name) for m in mods], dim=0))
    if hasattr(mods[0], "group"):  # int4: one group size per input width, so the projections share it
        fused.group = mods[0].group
    return fused


def _fusable(projections) -> bool:
    if all(type(p) is Linear for p in projections):
        return True
    kernel = getattr(projections[0], "kernel", None)
    group = getattr(projections[0], "group", None)
    return all(type(p) is QuantLinear and p.kernel is kernel and p.bias is None and getattr(p, "group", None) == group
               for p in projections) and hasattr(kernel, "row_buffers")


class FusedTextAttention(TextAttention):
    def project(self, x: torch.Tensor):
        return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)


class FusedTextMLP(TextMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_projections(model) -> int:
    """Fuse every decoder layer's q/k/v and gate/up projections in place; returns layers fused."""
    fused = 0
    for layer in model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        if not _fusable(projections):
            continue
        concat = _concat if type(attn.q_proj) is Linear else _concat_quantized
        attn.qkv_sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        attn.qkv_proj = concat(attn.q_proj, attn.k_proj, attn.v_proj)
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.__class__ = FusedTextAttention
        mlp.gate_up_proj = concat(mlp.gate_proj, mlp.up_proj)
        del mlp.gate_proj, mlp.up_proj
        mlp.__class__ = FusedTextMLP
        fused += 1
    return fused
