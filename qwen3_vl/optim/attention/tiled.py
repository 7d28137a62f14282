"""Tiled attention with an online softmax: the schedule of the tile kernels for GPUs without
tensor cores (llama.cpp's fattn-tile for Pascal), written in PyTorch.

Queries are taken ``block_q`` at a time, keys ``block_k`` at a time; per query row a running
maximum ``m``, normaliser ``l`` and output accumulator are kept in fp32 and rescaled as each key
tile arrives, so the score matrix never exceeds one tile (O(N) memory instead of O(N^2)).
Key tiles entirely in a query tile's causal future are skipped (about half the work of a causal
prefill). Grouped-query attention is native: the query heads of one KV head are stacked into one
matrix, so each K/V tile is read once for its whole group and never expanded; decode (one query)
is the same loop with a single query tile and ``block_k_decode``-sized key tiles.

Exact up to float reassociation. Inputs in fp16/bf16 are upcast per tile (fp32 accumulation).
"""

from __future__ import annotations

import torch

from qwen3_vl.optim.attention.common import by_segment_length, group_queries
from qwen3_vl.optim.plan import Optimization


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 512,
) -> torch.Tensor:
    """q ``[B, Hq, Lq, d]``, k/v ``[B, Hkv, Lk, d]``; queries are the last ``Lq`` positions."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    offset = lk - lq  # absolute position of query row 0
    qg = group_queries(q, hkv)  # [B, Hkv, G, Lq, d]
    out = torch.empty(b, hkv, groups, lq, d, dtype=q.dtype, device=q.device)
    key_pos = torch.arange(lk, device=q.device)
    for i0 in range(0, lq, block_q):
        i1 = min(lq, i0 + block_q)
        tq = i1 - i0
        qt = qg[:, :, :, i0:i1].reshape(b, hkv, groups * tq, d).float()
        q_pos = torch.arange(offset + i0, offset + i1, device=q.device)
        # Keys any row of this tile may see (causal: up to the tile's last query).
        k_end = offset + i1 if causal else lk
        m = torch.full((b, hkv, groups * tq, 1), float("-inf"), device=q.device)
        row_sum = torch.zeros(b, hkv, groups * tq, 1, device=q.device)
        acc = torch.zeros(b, hkv, groups * tq, d, device=q.device)
        for j0 in range(0, k_end, block_k):
            j1 = min(k_end, j0 + block_k)
            s = torch.matmul(qt, k[:, :, j0:j1].float().transpose(-1, -2)).mul_(scale)
            allowed = None
            if causal and j1 - 1 > offset + i0:  # some key of the tile is after some query
                allowed = key_pos[None, j0:j1] <= q_pos[:, None]  # [tq, tk]
            if key_valid is not None:
                valid = key_valid[:, None, None, None, j0:j1]  # [B, 1, 1, 1, tk]
                allowed = valid if allowed is None else allowed & valid
            if allowed is not None:
                s = s.view(b, hkv, groups, tq, j1 - j0).masked_fill(~allowed, float("-inf"))
                s = s.view(b, hkv, groups * tq, j1 - j0)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
            p = s.sub_(m_safe).exp_()
            correction = (m - m_safe).exp_()
            row_sum = row_sum.mul_(correction).add_(p.sum(dim=-1, keepdim=True))
            acc = acc.mul_(correction).add_(torch.matmul(p, v[:, :, j0:j1].float()))
            m = m_new
        tile = acc.div_(row_sum)
        empty = row_sum == 0  # a padding query that sees no key: eager's answer is the mean of all values
        if bool(empty.any()):
            mean_v = v.float().mean(dim=2, keepdim=True)  # [B, Hkv, 1, d]
            tile = torch.where(empty, mean_v, tile)
        out[:, :, :, i0:i1] = tile.view(b, hkv, groups, tq, d).to(q.dtype)
    return out.view(b, hq, lq, d)


class TiledAttention:
    name = "tiled"

    def __init__(self, block_q: int, block_k: int, block_k_decode: int) -> None:
        for key, value in (("block_q", block_q), ("block_k", block_k), ("block_k_decode", block_k_decode)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"tiled: {key} must be a positive integer, got {value!r}")
        self.block_q, self.block_k, self.block_k_decode = block_q, block_k, block_k_decode

    def describe(self) -> dict:
        return {"option": self.name, "block_q": self.block_q, "block_k": self.block_k,
                "block_k_decode": self.block_k_decode}

    def text(self, q, k, v, mask, scale: float) -> torch.Tensor:
        block_k = self.block_k_decode if q.shape[2] == 1 else self.block_k
        return tiled_attention(q, k, v, scale, mask.causal, mask.key_valid, self.block_q, block_k)

    def vision(self, q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
        attend = lambda q, k, v: tiled_attention(q, k, v, scale, False, None, self.block_q, self.block_k)
        return by_segment_length(q, k, v, cu_seqlens, attend)


OPTION = Optimization(
    name="tiled",
    axis="attention",
    exact=True,
    summary=(
        "Online-softmax attention over key tiles with fp32 accumulation (the Pascal tile-kernel schedule) in "
        "plain PyTorch: O(N) score memory, causal tiles skipped, GQA groups read each KV head once. SLOWER "
        "than sdpa wherever measured (CPU, 2b shapes: 2.2-4.2x eager's time for prefill/ViT, sdpa 0.1-0.35x; "
        "H200: 3-210x eager's, one launch per tile), "
        "so never a default; its use is O(N) memory (46 MiB vs eager's 2.1 GiB at 4096) where no fused "
        "kernel exists."
    ),
    build=lambda model, target, block_q=128, block_k=512, block_k_decode=2048: TiledAttention(
        block_q, block_k, block_k_decode
    ),
    fallback="eager",
    defaults={"block_q": 128, "block_k": 512, "block_k_decode": 2048},
    # Small tiles so that the tiny preset's short prompts cross several tiles.
    variants=({"block_q": 8, "block_k": 16, "block_k_decode": 16},),
)
