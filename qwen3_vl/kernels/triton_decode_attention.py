"""A decode step's text attention in two Triton kernels, for the compiled GPU decode step (and the prompt's
q/k norm and rotary kernels).

Why: in the compiled 2b step a layer's attention between its q/k/v product and ``o_proj`` is six launches
(the q/k RMSNorms with M-RoPE, the cache writes, the scores product, the masked softmax, the value product):
15.3 us a layer on the H100 (2026-12-07 profile), mostly latency over a few hundred kilobytes. Here a split
kernel does all of it but the last sum: each program takes one query head and one slice of the cached
positions (flash-decoding), normalises and rotates the query and its KV head's new key, writes the new key and
value into the layer's cache at the step's device-side position (the first slice of the group's first head),
and runs an online softmax in fp32 over its slice (the first slice also over the new key). A combine kernel
rescales the slices' partials to their common max and sums them. The first form, one program per query head
walking the whole cache, took 16.2 us a layer: 16 programs on 132 SMs, each a chain of dependent tile loads.
``grouped=True`` (``compile`` uses it from ``attend_grouped_from`` cached rows on, 4096 by default): one program per KV
head and slice, which reads each tile once for the query heads sharing it, as two tensor-core dots in the cache's
dtype. The split form reads a KV head's tiles once per query head: on an H100 at 8b's 4096-row cache, 27.2 us a layer
against the grouped form's 13.8 (at 512 rows the split form was the faster, 7.37 against 7.54).

The same function as ``reference`` (the eager ops: ``rms_norm``, ``apply_rotary``, the cache's
``index_copy_``, ``grouped_softmax_attention`` with the validity mask) up to float reassociation in fp32.
In bf16 it rounds less often than eager: the normalised-and-rotated query and key are rounded once (as
Inductor's fused kernel rounds them in the compiled step), scores and probabilities stay fp32 (eager
rounds both to bf16), the output is rounded once.

For the prompt (``compile[prefill_qk=true]``), two more kernels: ``qk_norm_rotary``, a text layer's q/k RMSNorms
and M-RoPE for every row in one launch (the same helper as the decode step's), and ``vision_rotary``, a ViT
layer's 2D rotary of q and k in one launch. A captured 2b prefill is about 1700 small launches against about 2 ms
of arithmetic; these replace about 18 of a text layer's 37 and 14 of a ViT layer's 24.

``decode_attention`` is a ``torch.library.triton_op`` that mutates the two cache buffers, so torch.compile
sees into it and CUDA graphs capture it; so are the prompt's kernels. Needs Triton
(``triton_gemv.unavailable_reason``); with ``TRITON_INTERPRET=1`` set before the first call it runs on the CPU (how
the tests check it).
"""

from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

from qwen3_vl.kernels.triton_gemv import unavailable_reason
from qwen3_vl.model.layers import apply_rotary, rms_norm
from qwen3_vl.optim.attention.eager import grouped_softmax_attention

BLOCK_T = 64  # cached positions per tile: a 64 x 128 bf16 tile of K or V is 16 KB per load
MAX_SPLITS = 64  # programs per query head at most; longer caches give each program more tiles


def fits(head_dim: int) -> bool:
    """Whether the kernel takes this head size (a power of two of at least 16: one ``tl.arange``)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def splits(cache_len: int) -> tuple[int, int]:
    """(programs per query head, tiles each) for a cache of ``cache_len`` rows: one tile each up to
    ``MAX_SPLITS`` programs, more tiles each past it. Fixed by the cache's capacity, not the step's position,
    so a captured graph's launch fits every position (programs past the position end at once)."""
    tiles = -(-cache_len // BLOCK_T)
    per_split = -(-tiles // MAX_SPLITS)
    return -(-tiles // per_split), per_split


@functools.cache
def _kernels():
    # Built on first use: Triton reads TRITON_INTERPRET when a kernel is defined. The helpers are bound at module
    # level because Triton resolves a kernel's callees through its globals (its interpreter drops closures).
    global _norm_rotary, _rotate_row, _load_tile, _fold_tile, _fold_tile_group, _fold
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_rotary(x_ptr, norm_ptr, cos, sin, eps, dtype, D: tl.constexpr):
        # rms_norm (fp32 statistics, rounded after the normalisation and after the weight), then
        # x*cos + rotate_half(x)*sin in fp32, rounded once. rotate_half reads the other half, negated first.
        # x_ptr: one row's start, or a column [G, 1] of rows' starts (then every row at once, [G, D]).
        d = tl.arange(0, D)
        other = (d + D // 2) % D
        x = tl.load(x_ptr + d).to(tl.float32)
        x_other = tl.load(x_ptr + other).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=len(x.shape) - 1, keep_dims=True) / D + eps)
        x = (tl.load(norm_ptr + d).to(dtype).to(tl.float32) * (x * rstd).to(dtype).to(tl.float32)).to(dtype)
        x_other = (tl.load(norm_ptr + other).to(dtype).to(tl.float32)
                   * (x_other * rstd).to(dtype).to(tl.float32)).to(dtype)
        rotated = tl.where(d < D // 2, -x_other.to(tl.float32), x_other.to(tl.float32))
        return (x.to(tl.float32) * cos + rotated * sin).to(dtype).to(tl.float32)

    @triton.jit
    def _rotate_row(x_ptr, cos, sin, D: tl.constexpr):
        # x*cos + rotate_half(x)*sin of one stored row, in fp32 (rotate_half reads the other half, negated first)
        d = tl.arange(0, D)
        x = tl.load(x_ptr + d).to(tl.float32)
        x_other = tl.load(x_ptr + (d + D // 2) % D).to(tl.float32)
        return x * cos + tl.where(d < D // 2, -x_other, x_other) * sin

    @triton.jit
    def _load_tile(keys_ptr, values_ptr, valid_ptr, cache, start, end, stride_cache_t, D: tl.constexpr,
                   BLOCK_T: tl.constexpr):
        # rows start .. start+BLOCK_T of one KV head's cache, as stored, and which of them the query may see
        t = start + tl.arange(0, BLOCK_T)
        before = t < end
        rows = cache + t[:, None] * stride_cache_t + tl.arange(0, D)[None, :]
        keys = tl.load(keys_ptr + rows, mask=before[:, None], other=0.0)
        values = tl.load(values_ptr + rows, mask=before[:, None], other=0.0)
        visible = before & (tl.load(valid_ptr + t, mask=before, other=0) != 0)
        return keys, values, visible

    @triton.jit
    def _fold_tile(best, total, acc, keys, values, visible, q, scale):
        # one online-softmax step over a tile, in fp32
        scores = tl.where(visible, tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        shrink = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best)
        total = total * shrink + tl.sum(weights, axis=0)
        acc = acc * shrink + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
        return new_best, total, acc

    @triton.jit
    def _fold_tile_group(best, total, acc, keys, values, visible, q, scale):
        # _fold_tile for a group's query heads [G, D] at once, the tile read once for all of them, both products
        # as dots in the cache's dtype with fp32 sums (tensor cores; ieee for fp32: no TF32 rounding). The scores
        # are the split form's (q is already a value of that dtype); the probabilities are rounded to the
        # dtype before the value product, as the eager ops round them (the split form keeps them fp32).
        scores = tl.dot(q.to(keys.dtype), tl.trans(keys), input_precision="ieee") * scale
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        shrink = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * shrink + tl.sum(weights, axis=1)
        acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values, input_precision="ieee")
        return new_best, total, acc

    @triton.jit
    def _fold(best, total, acc, keys, values, visible, q, scale, GROUPED):
        if GROUPED:
            best, total, acc = _fold_tile_group(best, total, acc, keys, values, visible, q, scale)
        else:
            best, total, acc = _fold_tile(best, total, acc, keys, values, visible, q, scale)
        return best, total, acc

    @triton.jit
    def decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr,
                                      values_ptr, position_ptr, valid_ptr, stats_ptr, partial_ptr, stride_qb,
                                      stride_kb, stride_vb, stride_cb, stride_cache_b, stride_cache_h,
                                      stride_cache_t, stride_valid_b, eps, scale, HEADS: tl.constexpr,
                                      GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                                      TILES: tl.constexpr, GROUPED: tl.constexpr, G_PAD: tl.constexpr):
        # Program (b * HEADS + head, split): the online softmax of one query head over TILES tiles of the cached
        # positions, left as a partial (running max, sum of weights, weighted sum of values) for the combine.
        # GROUPED: program (b * KV heads + KV head, split) for the GROUPS query heads that share a KV head, each
        # tile read once for all of them. Their rows form [G_PAD, D] blocks (G_PAD >= 16, what tl.dot takes; rows
        # past GROUPS repeat the last head and are not stored); their partials land in the same slots.
        # Inductor passes Python float arguments as fp64 scalars (Triton's own launcher as fp32): fp64 here would
        # make the online softmax's loop-carried sums fp64, which Triton refuses. Compute in fp32 either way.
        eps = tl.cast(eps, tl.float32)
        scale = tl.cast(scale, tl.float32)
        row = tl.program_id(0)
        split = tl.program_id(1)
        if GROUPED:
            b = row // (HEADS // GROUPS)
            kv_head = row % (HEADS // GROUPS)
            group_row = tl.arange(0, G_PAD)
            head = kv_head * GROUPS + tl.minimum(group_row, GROUPS - 1)
        else:
            b = row // HEADS
            head = row % HEADS
            kv_head = head // GROUPS
        dtype = q_ptr.dtype.element_ty
        d = tl.arange(0, D)
        position = tl.load(position_ptr).to(tl.int32)
        cache = b * stride_cache_b + kv_head * stride_cache_h
        valid_row = valid_ptr + b * stride_valid_b
        # This split's rows, all before the step's position (the rows its write does not touch; later ones are
        # invalid). The first tile's loads go out before the query's norm and rotary, which do not feed them, so
        # their memory latency overlaps that work (most splits have one tile).
        lo = split * (TILES * BLOCK_T)
        hi = tl.minimum(lo + TILES * BLOCK_T, position)
        keys, values, visible = _load_tile(keys_ptr, values_ptr, valid_row, cache, lo, hi, stride_cache_t, D,
                                           BLOCK_T)
        cos = tl.load(cos_ptr + b * stride_cb + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_cb + d).to(tl.float32)
        if GROUPED:
            q = _norm_rotary(q_ptr + b * stride_qb + head[:, None] * D, q_norm_ptr, cos, sin, eps, dtype, D)
        else:
            q = _norm_rotary(q_ptr + b * stride_qb + head * D, q_norm_ptr, cos, sin, eps, dtype, D)
        k = _norm_rotary(k_ptr + b * stride_kb + kv_head * D, k_norm_ptr, cos, sin, eps, dtype, D)
        v = tl.load(v_ptr + b * stride_vb + kv_head * D + d).to(tl.float32)
        first = split == 0
        # one program writes the KV head's new row: the group's first head's (grouped: the group's own)
        writes = first if GROUPED else first & (head % GROUPS == 0)
        if writes:
            tl.store(keys_ptr + cache + position * stride_cache_t + d, k.to(dtype))
            tl.store(values_ptr + cache + position * stride_cache_t + d, v.to(dtype))
        # The new key is always visible to its own query: the first split starts its softmax from it; the others
        # start empty (a finite floor for the max, so an empty split's rescaling is exp(0), not exp(nan)).
        best = tl.where(first, tl.sum(q * k, axis=len(q.shape) - 1) * scale, -1e30)
        total = tl.where(first, 1.0, 0.0)
        acc = tl.where(first, v, 0.0)
        if GROUPED:  # a state per query head of the group
            total += tl.zeros([G_PAD], dtype=tl.float32)
            acc += tl.zeros([G_PAD, D], dtype=tl.float32)
        best, total, acc = _fold(best, total, acc, keys, values, visible, q, scale, GROUPED)
        if TILES > 1:  # the split's further tiles (long caches): each loaded while the one before is reduced
            for start in tl.range(lo + BLOCK_T, hi, BLOCK_T, num_stages=2):
                keys, values, visible = _load_tile(keys_ptr, values_ptr, valid_row, cache, start, hi,
                                                   stride_cache_t, D, BLOCK_T)
                best, total, acc = _fold(best, total, acc, keys, values, visible, q, scale, GROUPED)
        if GROUPED:
            slot = (b * HEADS + head) * tl.num_programs(1) + split
            stored = group_row < GROUPS
            tl.store(stats_ptr + 2 * slot, best, mask=stored)
            tl.store(stats_ptr + 2 * slot + 1, total, mask=stored)
            tl.store(partial_ptr + slot[:, None] * D + d[None, :], acc, mask=stored[:, None])
        else:
            slot = row * tl.num_programs(1) + split
            tl.store(stats_ptr + 2 * slot, best)
            tl.store(stats_ptr + 2 * slot + 1, total)
            tl.store(partial_ptr + slot * D + d, acc)

    @triton.jit
    def decode_attention_combine_kernel(stats_ptr, partial_ptr, out_ptr, SPLITS: tl.constexpr,
                                        SPLITS_P2: tl.constexpr, D: tl.constexpr):
        # Program b * HEADS + head: the splits' partials rescaled to their common max and summed; rounded once.
        row = tl.program_id(0)
        s = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, D)
        used = s < SPLITS
        slot = row * SPLITS + s
        best = tl.load(stats_ptr + 2 * slot, mask=used, other=float("-inf"))
        total = tl.load(stats_ptr + 2 * slot + 1, mask=used, other=0.0)
        partial = tl.load(partial_ptr + slot[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
        weight = tl.exp(best - tl.max(best, axis=0))
        out = tl.sum(weight[:, None] * partial, axis=0) / tl.sum(weight * total, axis=0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def qk_norm_rotary_kernel(q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                              stride_qb, stride_qt, stride_kb, stride_kt, stride_cb, stride_ct, n, eps,
                              HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr):
        # Program (b * n + t, head): one query head (head < HEADS) or KV head of one prompt row, normalised and
        # rotated, written to [b, heads, n, D] (the layout attention takes). fp32 eps as in the split kernel.
        eps = tl.cast(eps, tl.float32)
        row = tl.program_id(0)
        head = tl.program_id(1)
        b = row // n
        t = row % n
        dtype = q_ptr.dtype.element_ty
        d = tl.arange(0, D)
        cos = tl.load(cos_ptr + b * stride_cb + t * stride_ct + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_cb + t * stride_ct + d).to(tl.float32)
        if head < HEADS:
            x = _norm_rotary(q_ptr + b * stride_qb + t * stride_qt + head * D, q_norm_ptr, cos, sin, eps, dtype, D)
            tl.store(q_out_ptr + ((b * HEADS + head) * n + t) * D + d, x.to(dtype))
        else:
            kv_head = head - HEADS
            x = _norm_rotary(k_ptr + b * stride_kb + t * stride_kt + kv_head * D, k_norm_ptr, cos, sin, eps, dtype,
                             D)
            tl.store(k_out_ptr + ((b * KV_HEADS + kv_head) * n + t) * D + d, x.to(dtype))

    @triton.jit
    def vision_rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, stride_q, stride_k, stride_c,
                             HEADS: tl.constexpr, D: tl.constexpr):
        # Program (patch, head): one query head (head < HEADS) or key head of one patch, rotated in fp32 and
        # rounded once (as the ViT's own ops: upcast, rotate, cast back), written to [patches, HEADS, D].
        s = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, D)
        cos = tl.load(cos_ptr + s * stride_c + d).to(tl.float32)
        sin = tl.load(sin_ptr + s * stride_c + d).to(tl.float32)
        if head < HEADS:
            x = _rotate_row(q_ptr + s * stride_q + head * D, cos, sin, D)
            tl.store(q_out_ptr + (s * HEADS + head) * D + d, x.to(q_out_ptr.dtype.element_ty))
        else:
            x = _rotate_row(k_ptr + s * stride_k + (head - HEADS) * D, cos, sin, D)
            tl.store(k_out_ptr + (s * HEADS + head - HEADS) * D + d, x.to(k_out_ptr.dtype.element_ty))

    return decode_attention_split_kernel, decode_attention_combine_kernel, qk_norm_rotary_kernel, vision_rotary_kernel


def _rows(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """[B, 1, width] (or any [B, ..., width] of one row per batch entry) with a contiguous last dim, as [B, width]."""
    if t.shape[-1] != width or t.numel() != t.shape[0] * width or t.stride(-1) != 1:
        raise ValueError(f"decode_attention needs {name} as one row of {width} per batch entry with a contiguous "
                         f"last dimension; got shape {tuple(t.shape)} strides {t.stride()}")
    return t.reshape(t.shape[0], width)


def _check(q, k, v, q_norm, k_norm, keys, values, position, valid, heads, kv_heads) -> None:
    head_dim = keys.shape[-1]
    if not fits(head_dim) or heads % kv_heads:
        raise ValueError(f"decode_attention needs a power-of-two head size of at least 16 and query heads a "
                         f"multiple of KV heads; got head size {head_dim}, {heads} query and {kv_heads} KV heads")
    batch = q.shape[0]
    if keys.shape != values.shape or keys.shape[:2] != (batch, kv_heads) or keys.stride(-1) != 1 \
            or keys.stride() != values.stride():
        raise ValueError(f"decode_attention needs K and V caches [batch {batch}, {kv_heads} KV heads, T, "
                         f"{head_dim}] of one layout; got {tuple(keys.shape)} {keys.stride()} and "
                         f"{tuple(values.shape)} {values.stride()}")
    if len({q.dtype, k.dtype, v.dtype, keys.dtype, values.dtype}) != 1:
        raise ValueError("decode_attention needs q, k, v and the caches in one dtype")
    if q_norm.shape != (head_dim,) or k_norm.shape != (head_dim,):
        raise ValueError(f"decode_attention needs q/k RMSNorm weights of {head_dim}")
    if position.numel() != 1 or position.dtype != torch.long:
        raise ValueError("decode_attention needs the step's position as one long on the device")
    if valid.shape != (batch, keys.shape[2]) or valid.dtype != torch.bool or valid.stride(-1) != 1:
        raise ValueError(f"decode_attention needs a [batch, {keys.shape[2]}] bool validity mask; got "
                         f"{tuple(valid.shape)} {valid.dtype}")


def reference(q, k, v, q_norm, k_norm, eps, cos, sin, keys, values, position, valid, scale, heads, kv_heads):
    """What ``decode_attention`` computes, in the eager layer's ops (its contract, and its tests' oracle):
    TextAttention.attend's one-query step against GraphStaticCache in graph mode."""
    b, d = q.shape[0], keys.shape[-1]
    q = rms_norm(q.reshape(b, 1, heads, d), q_norm, eps).transpose(1, 2)
    k = rms_norm(k.reshape(b, 1, kv_heads, d), k_norm, eps).transpose(1, 2)
    v = v.reshape(b, 1, kv_heads, d).transpose(1, 2)
    cos, sin = cos.reshape(b, 1, 1, d), sin.reshape(b, 1, 1, d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    keys.index_copy_(2, position.reshape(1), k)
    values.index_copy_(2, position.reshape(1), v)
    out = grouped_softmax_attention(q, keys, values, valid[:, None, None, :], scale)
    return out.transpose(1, 2).reshape(b, 1, heads * d)


def qk_reference(q, k, q_norm, k_norm, eps, cos, sin, heads, kv_heads):
    """What ``qk_norm_rotary`` computes, in the eager layer's ops (``TextAttention.position``)."""
    b, n, d = q.shape[0], q.shape[1], q_norm.shape[0]
    q = rms_norm(q.reshape(b, n, heads, d), q_norm, eps).transpose(1, 2)
    k = rms_norm(k.reshape(b, n, kv_heads, d), k_norm, eps).transpose(1, 2)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def qk_fits(q, k, cos, sin, head_dim: int) -> bool:
    """Whether ``qk_norm_rotary`` takes these: rows with a contiguous last dimension, one dtype, and cos/sin
    [b, 1, n, d] of one layout (what the text decoder passes)."""
    if q.dim() != 3 or k.dim() != 3:
        return False
    b, n = q.shape[0], q.shape[1]
    return (fits(head_dim) and k.shape[:2] == (b, n) and q.stride(-1) == 1 and k.stride(-1) == 1
            and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.shape == sin.shape == (b, 1, n, head_dim)
            and cos.stride() == sin.stride() and cos.stride(-1) == 1)


def vision_reference(q, k, cos, sin):
    """What ``vision_rotary`` computes, in the ViT's ops (``VisionAttention.position``)."""
    return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)


def vision_fits(q, k, cos, sin) -> bool:
    """Whether ``vision_rotary`` takes these: q and k [s, heads, d] of one dtype with contiguous heads (views of
    the ViT's qkv product will do), cos/sin [s, 1, d] of one layout."""
    if q.dim() != 3:
        return False
    s, _, d = q.shape
    return (fits(d) and k.shape == q.shape and q.dtype == k.dtype
            and q.stride()[1:] == k.stride()[1:] == (d, 1) and cos.shape == sin.shape == (s, 1, d)
            and cos.stride() == sin.stride() and cos.stride(-1) == 1)


if unavailable_reason() is None:  # registered only with Triton (torch looks for the op's kernels at registration)

    @triton_op("qwen3_vl::decode_attention", mutates_args={"keys", "values"})
    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor,
                         k_norm: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, position: torch.Tensor, valid: torch.Tensor, scale: float, heads: int,
                         kv_heads: int, grouped: bool = False) -> torch.Tensor:
        """One decode query per batch entry: ``q`` [B, 1, heads * d], ``k`` and ``v`` [B, 1, kv_heads * d]
        (views of the fused q/k/v product will do: only the last dimension must be contiguous), the q/k
        RMSNorm weights [d], ``cos``/``sin`` [B, ..., d] of this step's position, the layer's caches
        ``keys``/``values`` [B, kv_heads, T, d] (written at ``position``, a long [1] on the device) and
        ``valid`` [B, T] (the step's own position already marked). Returns [B, 1, heads * d].
        ``grouped``: one program per KV head and slice, reading each tile once for its query heads (the grouped
        kernel), instead of one per query head."""
        _check(q, k, v, q_norm, k_norm, keys, values, position, valid, heads, kv_heads)
        batch, d = q.shape[0], keys.shape[-1]
        q2, k2, v2 = _rows(q, heads * d, "q"), _rows(k, kv_heads * d, "k"), _rows(v, kv_heads * d, "v")
        cos2, sin2 = _rows(cos, d, "cos"), _rows(sin, d, "sin")
        if cos2.stride() != sin2.stride():
            raise ValueError("decode_attention needs cos and sin of one layout")
        out = torch.empty(batch, 1, heads * d, dtype=q.dtype, device=q.device)
        split_kernel, combine_kernel, *_ = _kernels()
        count, tiles = splits(keys.shape[2])
        stats = torch.empty(batch * heads, count, 2, dtype=torch.float32, device=q.device)
        partial = torch.empty(batch * heads, count, d, dtype=torch.float32, device=q.device)
        args = (q2, k2, v2, q_norm, k_norm, cos2, sin2, keys, values, position, valid, stats, partial, q2.stride(0),
                k2.stride(0), v2.stride(0), cos2.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
                valid.stride(0), eps, scale)
        groups = heads // kv_heads
        wrap_triton(split_kernel)[(batch * (kv_heads if grouped else heads), count)](
            *args, HEADS=heads, GROUPS=groups, D=d, BLOCK_T=BLOCK_T, TILES=tiles, GROUPED=grouped,
            G_PAD=max(16, 1 << (groups - 1).bit_length()) if grouped else 1, num_warps=4)
        wrap_triton(combine_kernel)[(batch * heads,)](
            stats, partial, out, SPLITS=count, SPLITS_P2=max(2, 1 << (count - 1).bit_length()), D=d, num_warps=4)
        return out

    @triton_op("qwen3_vl::qk_norm_rotary", mutates_args=())
    def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt's q/k RMSNorms and rotary in one kernel (``qk_reference``'s ops, six to ten launches eagerly):
        ``q`` [B, n, heads * d] and ``k`` [B, n, kv_heads * d] (views of the fused product will do), ``cos`` and
        ``sin`` [B, 1, n, d] (``qk_fits``). Returns q [B, heads, n, d] and k [B, kv_heads, n, d], contiguous."""
        b, n, d = q.shape[0], q.shape[1], q_norm.shape[0]
        if not qk_fits(q, k, cos, sin, d) or q.shape[2] != heads * d or k.shape[2] != kv_heads * d:
            raise ValueError(f"qk_norm_rotary needs q [b, n, {heads} x {d}] and k [b, n, {kv_heads} x {d}] rows with "
                             f"a contiguous last dimension and cos/sin [b, 1, n, {d}] of their dtype; got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)} {cos.dtype}")
        q_out = torch.empty(b, heads, n, d, dtype=q.dtype, device=q.device)
        k_out = torch.empty(b, kv_heads, n, d, dtype=k.dtype, device=k.device)
        wrap_triton(_kernels()[2])[(b * n, heads + kv_heads)](
            q, k, q_norm, k_norm, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), cos.stride(2), n, eps, HEADS=heads, KV_HEADS=kv_heads, D=d, num_warps=1)
        return q_out, k_out

    @triton_op("qwen3_vl::vision_rotary", mutates_args=())
    def vision_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ViT's 2D rotary of q and k [s, heads, d] (``vision_fits``) in one kernel (``vision_reference``'s
        ops, fourteen launches eagerly in half precision). Returns both [s, heads, d], contiguous."""
        if not vision_fits(q, k, cos, sin):
            raise ValueError(f"vision_rotary needs q and k [s, heads, d] with contiguous heads and cos/sin [s, 1, d]; "
                             f"got {tuple(q.shape)} {q.stride()}, {tuple(k.shape)}, {tuple(cos.shape)}")
        s, heads, d = q.shape
        q_out = torch.empty(s, heads, d, dtype=q.dtype, device=q.device)
        k_out = torch.empty(s, heads, d, dtype=k.dtype, device=k.device)
        wrap_triton(_kernels()[3])[(s, 2 * heads)](
            q, k, cos, sin, q_out, k_out, q.stride(0), k.stride(0), cos.stride(0), HEADS=heads, D=d, num_warps=1)
        return q_out, k_out

else:

    def vision_rotary(q, k, cos, sin):
        raise RuntimeError(f"the Triton vision rotary cannot run: {unavailable_reason()}")

    def qk_norm_rotary(q, k, q_norm, k_norm, eps, cos, sin, heads, kv_heads):
        raise RuntimeError(f"the Triton q/k norm and rotary cannot run: {unavailable_reason()}")

    def decode_attention(q, k, v, q_norm, k_norm, eps, cos, sin, keys, values, position, valid, scale, heads,
                         kv_heads, grouped=False) -> torch.Tensor:
        raise RuntimeError(f"the Triton decode attention cannot run: {unavailable_reason()}")
