"""Block-sparse attention by gathering the kept key blocks (shared by ``block_sparse`` and
``dynamic_sparse``; not an option itself).

Keys are cut into blocks of ``block`` positions from position 0; queries are grouped by the key
block their position falls in (the queries of a step are the last ``Lq`` of ``Lk`` positions).
A *selection* names, for each query block, ``K`` key blocks to attend to (``idx``) and which of
those entries are real (``keep``); it may differ per batch row and KV head (shape
``[B or 1, Hkv or 1, nqb, K]``). The kept blocks are gathered (``torch.gather``, no padding copy
of the cache) and attended with the usual causal and padding masks, fp32 softmax; all query
heads of one KV group share the selection, so each gathered block is read once per group.
Query blocks are processed in chunks so the score tensor stays under ``score_bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen3_vl.optim.attention.common import group_queries


@dataclass(frozen=True)
class BlockLayout:
    lq: int
    lk: int
    block: int
    first_qb: int  # key block of query row 0
    nqb: int  # query blocks
    nkb: int  # key blocks
    rows: int  # query rows per block (== block, or lq when all queries sit in one block)
    pad_front: int  # zero rows put before query row 0 to align blocks

    @classmethod
    def of(cls, lq: int, lk: int, block: int) -> BlockLayout:
        offset = lk - lq
        first_qb = offset // block
        nkb = math.ceil(lk / block)
        pad_front = offset - first_qb * block
        nqb = math.ceil((pad_front + lq) / block)
        if nqb == 1:  # e.g. one decode query: no padding to a whole block
            return cls(lq, lk, block, first_qb, 1, nkb, lq, 0)
        return cls(lq, lk, block, first_qb, nqb, nkb, block, pad_front)

    def query_positions(self) -> torch.Tensor:
        """[nqb, rows] absolute position of each (padded) query row."""
        if self.nqb == 1:
            return (self.lk - self.lq + torch.arange(self.lq))[None]
        return (self.first_qb + torch.arange(self.nqb))[:, None] * self.block + torch.arange(self.block)

    def visible_blocks(self, causal: bool) -> torch.Tensor:
        """[nqb, nkb] bool: key blocks holding at least one key some query of the block may see."""
        qb = self.first_qb + torch.arange(self.nqb)[:, None]
        kb = torch.arange(self.nkb)[None, :]
        return kb <= qb if causal else torch.ones(self.nqb, self.nkb, dtype=torch.bool)

    def blocks_per_row(self, density: float) -> int:
        return min(self.nkb, max(1, math.ceil(density * self.nkb)))


def pooled_queries(q: torch.Tensor, layout: BlockLayout, num_kv_heads: int) -> torch.Tensor:
    """[B, Hkv, nqb, d] fp32: mean of each query block's real rows over the KV group's heads."""
    qg = group_queries(q, num_kv_heads).float()  # [B, Hkv, G, Lq, d]
    b, h, g, lq, d = qg.shape
    padded = F.pad(qg, (0, 0, layout.pad_front, layout.nqb * layout.rows - layout.pad_front - lq))
    sums = padded.view(b, h, g, layout.nqb, layout.rows, d).sum(dim=(2, 4))
    real = (torch.arange(layout.nqb * layout.rows) - layout.pad_front).view(layout.nqb, layout.rows)
    count = ((real >= 0) & (real < lq)).sum(-1).clamp(min=1).to(sums)  # [nqb]
    return sums / (count[:, None] * g)


def pooled_keys(k: torch.Tensor, key_valid: torch.Tensor | None, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block: [B, Hkv, nkb, 2d] fp32 (mean and max over its valid keys) and [B, nkb] bool
    (the block holds a valid key)."""
    b, h, lk, d = k.shape
    nkb = math.ceil(lk / block)
    valid = torch.ones(b, lk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid
    pad = nkb * block - lk
    kp = F.pad(k.float(), (0, 0, 0, pad)).view(b, h, nkb, block, d)
    vp = F.pad(valid, (0, pad)).view(b, 1, nkb, block, 1)
    count = vp.sum(dim=3).clamp(min=1)
    mean = (kp * vp).sum(dim=3) / count
    top = kp.masked_fill(~vp, float("-inf")).amax(dim=3)
    top = top.masked_fill(top == float("-inf"), 0.0)
    return torch.cat([mean, top], dim=-1), vp.view(b, nkb, block).any(dim=-1)


def empty_query_rows(layout: BlockLayout, causal: bool, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
    """[B, 1, Lq, 1] bool: queries that see no key at all in dense attention (None when none do)."""
    if key_valid is None:
        return None
    q_pos = torch.arange(layout.lk - layout.lq, layout.lk, device=device)
    if causal:
        first_valid = torch.where(key_valid.any(-1), key_valid.int().argmax(-1), layout.lk)  # [B]
        empty = q_pos[None, :] < first_valid[:, None]
    else:
        empty = ~key_valid.any(-1, keepdim=True).expand(-1, layout.lq)
    return empty[:, None, :, None] if bool(empty.any()) else None


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    key_valid: torch.Tensor | None,
    layout: BlockLayout,
    idx: torch.Tensor,
    keep: torch.Tensor,
    score_bytes: int = 64 << 20,
) -> torch.Tensor:
    """Attention of q ``[B, Hq, Lq, d]`` over the selected key blocks of k/v ``[B, Hkv, Lk, d]``."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups, rows, block = hq // hkv, layout.rows, layout.block
    nqb, kk = layout.nqb, idx.shape[-1]
    device = q.device
    qg = group_queries(q, hkv)
    qg = F.pad(qg, (0, 0, layout.pad_front, nqb * rows - layout.pad_front - lq))
    qg = qg.view(b, hkv, groups, nqb, rows, d)
    idx = idx.to(device).expand(b, hkv, nqb, kk)
    keep = keep.to(device).expand(b, hkv, nqb, kk)
    q_pos = layout.query_positions().to(device)  # [nqb, rows]
    offsets = torch.arange(block, device=device)
    out = torch.empty(b, hkv, groups, nqb, rows, d, dtype=q.dtype, device=device)
    per_block = b * hkv * groups * rows * kk * block * 4
    chunk = max(1, score_bytes // max(1, per_block))
    for c0 in range(0, nqb, chunk):
        c1 = min(nqb, c0 + chunk)
        n = c1 - c0
        pos = idx[:, :, c0:c1, :, None] * block + offsets  # [B, Hkv, n, K, block] key positions
        real = (pos < lk) & keep[:, :, c0:c1, :, None]
        pos = pos.clamp(max=lk - 1).reshape(b, hkv, n * kk * block)
        kg = torch.gather(k, 2, pos[..., None].expand(b, hkv, pos.shape[-1], d)).view(b, hkv, n, kk * block, d)
        vg = torch.gather(v, 2, pos[..., None].expand(b, hkv, pos.shape[-1], d)).view(b, hkv, n, kk * block, d)
        allowed = real.view(b, hkv, n, 1, kk * block)
        if key_valid is not None:
            kv_ok = torch.gather(key_valid.to(device), 1, pos.view(b, hkv * pos.shape[-1])).view(b, hkv, n, 1, -1)
            allowed = allowed & kv_ok
        if causal:
            qp = q_pos[c0:c1].view(1, 1, n, rows, 1)
            allowed = allowed & (pos.view(b, hkv, n, 1, kk * block) <= qp)  # [B, Hkv, n, rows, K*block]
        qc = qg[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, n, groups * rows, d)
        s = torch.matmul(qc, kg.transpose(-1, -2)).float() * scale  # [B, Hkv, n, G*rows, K*block]
        s = s.view(b, hkv, n, groups, -1, kk * block).masked_fill(~allowed.unsqueeze(3), torch.finfo(s.dtype).min)
        probs = torch.softmax(s.view(b, hkv, n, groups * s.shape[4], kk * block), dim=-1).to(v.dtype)
        res = torch.matmul(probs, vg).view(b, hkv, n, groups, rows, d)
        out[:, :, :, c0:c1] = res.permute(0, 1, 3, 2, 4, 5)
    out = out.view(b, hkv, groups, nqb * rows, d)[:, :, :, layout.pad_front : layout.pad_front + lq]
    out = out.reshape(b, hq, lq, d)
    empty = empty_query_rows(layout, causal, key_valid, device)
    if empty is not None:  # dense attention gives these padding queries the mean of all values
        mean = v.float().mean(dim=2, keepdim=True)
        mean = mean[:, :, None].expand(b, hkv, groups, 1, d).reshape(b, hq, 1, d)
        out = torch.where(empty, mean.to(out.dtype), out)
    return out


def static_selection(layout: BlockLayout, causal: bool, density: float, sink_blocks: int, global_stride: int):
    """Sinks + local window + optional strided globals, ``ceil(density * nkb)`` blocks per query block.

    Priority: the query's own block, then the first ``sink_blocks`` blocks, then every
    ``global_stride``-th block (when > 0), then the nearest blocks. Returns idx, keep ``[1, 1, nqb, K]``.
    """
    n = layout.nkb
    qb = layout.first_qb + torch.arange(layout.nqb)[:, None]
    kb = torch.arange(n)[None, :]
    prio = -(kb - qb).abs().float()  # nearest first, in (-n, 0]
    if global_stride > 0:
        prio = torch.where(kb % global_stride == 0, prio + 2 * n, prio)
    prio = torch.where(kb < sink_blocks, prio + 3 * n, prio)
    prio = torch.where(kb == qb, prio + 4 * n, prio)
    prio = prio.masked_fill(~layout.visible_blocks(causal), float("-inf"))
    values, idx = prio.topk(layout.blocks_per_row(density), dim=-1)
    return idx[None, None], (values > float("-inf"))[None, None]
