"""FlashAttention-2 with the KV cache, through the flash-attn package (Dao-AILab).

- prefill: ``flash_attn_func`` (causal masks are bottom-right aligned there, as a cache needs:
  the queries are the last ``Lq`` of ``Lk`` positions);
- decode: ``flash_attn_with_kvcache``, whose split-KV ("flash-decoding") kernel spreads a long
  cache over the GPU's SMs for a single query;
- ViT: ``flash_attn_varlen_func`` over ``cu_seqlens`` (one launch for every image and frame);
- GQA native everywhere (the cache's KV heads are never expanded).

Needs a CUDA GPU of sm80+, bf16 compute and the package; where any is missing the option is
unavailable and the plan falls back to ``sdpa`` with the reason recorded (``model.fallbacks``,
``plan_report()``). A profile emulating hardware without flash kernels makes it unavailable too.
Calls flash-attn cannot take, a left-padded batch (``key_valid``), go to SDPA and are counted
in ``describe()``. Without flash-attn there is nothing this option could add: a split-KV decode
written in torch ops measured 3-10x slower than SDPA's fused decode on CPU (2b shapes), and on
CPU SDPA's fused kernel already is a FlashAttention-2-style kernel.
Exact up to float reassociation.
"""

from __future__ import annotations

import importlib
from collections import Counter

import torch

from qwen3_vl.optim.attention.sdpa import SdpaAttention
from qwen3_vl.optim.plan import Optimization, Requirements, Target


def _emulation_probe(target: Target) -> str | None:
    if target.emulated_profile:
        from qwen3_vl.hardware.profiles import get_profile

        if "flash" not in get_profile(target.emulated_profile).sdpa_backends:
            return f"emulating {target.emulated_profile}, which has no flash kernels"
    return None


class FlashKVAttention:
    name = "flash_kv"

    def __init__(self, target: Target, flash_attn=None) -> None:
        self.fa = flash_attn if flash_attn is not None else importlib.import_module("flash_attn")
        self.padded = SdpaAttention(target)  # for calls with padded keys
        self.ran: Counter[tuple[str, str]] = Counter()

    def describe(self) -> dict:
        ran: dict[str, dict[str, int]] = {}
        for (kind, kernel), n in sorted(self.ran.items()):
            ran.setdefault(kind, {})[kernel] = n
        return {"option": self.name, "ran": ran}

    def text(self, q, k, v, mask, scale: float) -> torch.Tensor:
        decode = q.shape[2] == 1
        kind = "decode" if decode else "prefill"
        if mask.key_valid is not None:
            out = self.padded.text(q, k, v, mask, scale)
            self.ran[(kind, f"sdpa:{self.padded.last} (padded keys)")] += 1
            return out
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, d], last dim contiguous
        if decode:  # one query sees the whole cache
            out = self.fa.flash_attn_with_kvcache(qt, kt, vt, softmax_scale=scale, causal=False)
            self.ran[(kind, "flash_attn_with_kvcache")] += 1
        else:
            out = self.fa.flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=mask.causal)
            self.ran[(kind, "flash_attn_func")] += 1
        return out.transpose(1, 2)

    def vision(self, q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(q.device, torch.int32)
        self.ran[("vision", "flash_attn_varlen_func")] += 1
        return self.fa.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale)


OPTION = Optimization(
    name="flash_kv",
    axis="attention",
    exact=True,
    summary=(
        "FlashAttention-2 via the flash-attn package: flash prefill, split-KV decode over the GQA cache "
        "(flash_attn_with_kvcache), varlen ViT. Needs CUDA sm80+, bf16 and the package, else falls back to sdpa."
    ),
    build=lambda model, target: FlashKVAttention(target),
    requires=Requirements(devices=("cuda",), min_compute_capability=(8, 0), dtypes=("bf16",),
                          packages=("flash_attn",)),
    probe=_emulation_probe,
    fallback="sdpa",
)
