"""FlashAttention-2-style attention with the KV cache: fused prefill, split-KV decode.

Two engines, chosen when the model is built:

- ``flash_attn``: the flash-attn package (Dao-AILab): ``flash_attn_func`` for prefill (causal is
  bottom-right aligned there, as our cache needs), ``flash_attn_with_kvcache`` for decode (its
  split-KV "flash-decoding" kernel), ``flash_attn_varlen_func`` for the ViT's image segments.
  Needs a CUDA GPU of sm80+, the package, and fp16/bf16 compute. Calls with padded keys (a
  left-padded batch) use the torch engine for that call, counted in ``describe()``.
- ``torch``: prefill through SDPA's fused kernels (flash / memory-efficient / CPU flash, see the
  ``sdpa`` option) and decode through ``split_kv_decode`` below: the cache is cut into chunks of
  ``split`` keys, each chunk yields a partial (max, sum, output) for every query head of a KV
  group at once, and the partials are merged by their log-sum-exp, the flash-decoding algorithm.

When the flash-attn engine cannot be used, the reason is recorded in ``model.fallbacks`` (and
so in ``plan_report()`` and harness results) as well as in ``describe()``.
Exact up to float reassociation.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter

import torch

from qwen3_vl.hardware.device import storage_and_compute
from qwen3_vl.optim.attention.common import group_queries
from qwen3_vl.optim.attention.sdpa import SdpaAttention
from qwen3_vl.optim.plan import Fallback, Optimization, Target

ENGINE_FLASH, ENGINE_TORCH = "flash_attn", "torch"


def flash_attn_unavailable(target: Target) -> str | None:
    """Why the flash-attn engine cannot run on ``target`` (None when it can)."""
    if target.device_type != "cuda":
        return f"flash-attn needs a CUDA GPU, target is {target.device_type}"
    cc = tuple(target.compute_capability or (0, 0))
    if cc < (8, 0):
        return f"flash-attn needs compute capability >= 8.0, GPU has {cc[0]}.{cc[1]}"
    if target.emulated_profile:
        from qwen3_vl.hardware.profiles import get_profile

        if "flash" not in get_profile(target.emulated_profile).sdpa_backends:
            return f"emulating {target.emulated_profile}, which has no flash kernels"
    if storage_and_compute(target.dtype)[1] not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16, this target computes in fp32 (dtype policy {target.dtype})"
    if importlib.util.find_spec("flash_attn") is None:
        return "package 'flash_attn' is not installed"
    return None


def split_kv_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_valid: torch.Tensor | None, split: int
) -> torch.Tensor:
    """Attention for queries that see every (valid) key, e.g. one decode step: flash-decoding in torch ops.

    q ``[B, Hq, Lq, d]``, k/v ``[B, Hkv, Lk, d]`` in any layout (no copy of the cache). The scores of
    each KV group come from one matmul (each KV head read once for its ``G`` query heads); they are
    cut into ``ceil(Lk / split)`` chunks, each chunk's max and exp-sum computed, and the chunks merged
    by their log-sum-exp before one matmul with V. (A fused split-KV kernel runs the chunks on
    separate thread blocks; composed of torch ops the split changes only the order of the sums.)
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    rows = groups * lq
    qg = group_queries(q, hkv).reshape(b, hkv, rows, d)
    s = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)  # [B, Hkv, G*Lq, Lk]
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    chunks = -(-lk // split)
    s = torch.nn.functional.pad(s, (0, chunks * split - lk), value=float("-inf")).view(b, hkv, rows, chunks, split)
    m = s.amax(dim=-1, keepdim=True)  # per-chunk max
    m_safe = m.masked_fill(m == float("-inf"), 0.0)
    p = s.sub_(m_safe).exp_()
    sums = p.sum(dim=-1, keepdim=True)  # per-chunk exp-sum
    top = m.amax(dim=-2, keepdim=True)  # merge: weight each chunk by exp(m_chunk - m_all)
    w = (m - top.masked_fill(top == float("-inf"), 0.0)).exp_()
    total = (w * sums).sum(dim=-2)  # [B, Hkv, rows, 1]
    p = p.mul_(w).view(b, hkv, rows, chunks * split)[..., :lk]
    out = torch.matmul(p.to(v.dtype), v).float() / total
    if bool((total == 0).any()):  # a query that sees no key: eager's answer, the mean of all values
        out = torch.where(total == 0, v.float().mean(dim=2, keepdim=True), out)
    return out.view(b, hkv, groups, lq, d).reshape(b, hq, lq, d).to(q.dtype)


class FlashKVAttention:
    name = "flash_kv"

    def __init__(self, target: Target, split: int) -> None:
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"flash_kv: split must be a positive integer, got {split!r}")
        self.split = split
        self.prefill = SdpaAttention(target)
        self.reason = flash_attn_unavailable(target)
        self.engine = ENGINE_TORCH if self.reason else ENGINE_FLASH
        self._fa = importlib.import_module("flash_attn") if self.engine == ENGINE_FLASH else None
        self.ran: Counter[tuple[str, str]] = Counter()

    def describe(self) -> dict:
        ran: dict[str, dict[str, int]] = {}
        for (kind, kernel), n in sorted(self.ran.items()):
            ran.setdefault(kind, {})[kernel] = n
        return {"option": self.name, "engine": self.engine, "engine_reason": self.reason, "split": self.split,
                "ran": ran, "prefill_sdpa": self.prefill.describe()}

    def _sdpa(self, kind: str, q, k, v, mask, scale):
        out = self.prefill.text(q, k, v, mask, scale)
        self.ran[(kind, f"sdpa:{self.prefill.last}")] += 1
        return out

    def text(self, q, k, v, mask, scale: float) -> torch.Tensor:
        decode = q.shape[2] == 1
        kind = "decode" if decode else "prefill"
        if self.engine == ENGINE_FLASH and mask.key_valid is None:
            self.ran[(kind, "flash_attn")] += 1
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, d]
            if decode:
                out = self._fa.flash_attn_with_kvcache(qt, kt, vt, softmax_scale=scale, causal=False)
            else:
                out = self._fa.flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=mask.causal)
            return out.transpose(1, 2)
        if decode:  # one query: it sees every valid key, causal or not
            self.ran[(kind, "split_kv")] += 1
            return split_kv_decode(q, k, v, scale, mask.key_valid, self.split)
        return self._sdpa(kind, q, k, v, mask, scale)

    def vision(self, q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
        if self.engine == ENGINE_FLASH:
            self.ran[("vision", "flash_attn_varlen")] += 1
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            longest = int(lengths.max())
            cu = cu_seqlens.to(torch.int32)
            return self._fa.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale)
        out = self.prefill.vision(q, k, v, cu_seqlens, scale)
        self.ran[("vision", f"sdpa:{self.prefill.last}")] += 1
        return out


def build(model, target: Target, split: int = 512) -> FlashKVAttention:
    attention = FlashKVAttention(target, split)
    if attention.reason is not None and model is not None:
        # Not an option-level fallback (flash_kv runs), but the kernels differ: say so where people look.
        model.fallbacks.append(
            Fallback("attention", "flash_kv[engine=flash_attn]", "flash_kv[engine=torch]", attention.reason)
        )
    return attention


OPTION = Optimization(
    name="flash_kv",
    axis="attention",
    exact=True,
    summary=(
        "FlashAttention-2-style: fused prefill and split-KV (flash-decoding) decode over the GQA cache; the "
        "flash-attn package's kernels on sm80+ with fp16/bf16, else SDPA prefill + a torch split-KV decode "
        "(the reason is recorded in model.fallbacks)."
    ),
    build=build,
    fallback="sdpa",
    defaults={"split": 512},
    variants=({"split": 16},),  # short chunks so that tiny prompts cross several
)
