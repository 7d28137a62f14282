"""KIVI-style quantized KV storage shared by ``quant_int8``, ``quant_int4`` and ``hierarchical_kv``.

Keys are quantized per channel over blocks of ``group`` tokens (key outliers live in fixed
channels), values per token over groups of ``min(group, head_dim)`` channels (KIVI, arXiv
2402.02750). The most
recent ``residual`` to ``residual + group - 1`` tokens stay in full precision; at the end of a
step, whole blocks of ``group`` tokens leaving that window are quantized. Quantization is
asymmetric min/max to ``bits`` bits (4-bit codes packed two per byte); scales and zero points are
stored in fp16. Padding tokens are left out of every min/max.

Attention sees dequantized keys and values (this is a memory option: on Pascal there are no fast
quantized-attention kernels, so expect it to cost time, not save it).

Where the quantized blocks live is a ``store``: ``MemoryStore`` keeps them on the device the keys
come from; ``hierarchical_kv`` supplies a tiered host/disk store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen3_vl.optim.kv_cache.common import CacheFullError, KVShape, extend_valid, tensor_bytes

# Entries per quantized block, per stored tensor (dim 2): key codes, key scale, key zero, value
# codes, value scale, value zero. Keys have one scale row per block of `group` tokens.
BLOCK_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


def block_rows(group: int) -> tuple[int, ...]:
    return (group, 1, 1, group, group, group)


def value_group(group: int, head_dim: int) -> int:
    """Channels per value scale: ``group``, or the whole head when the head is smaller."""
    return min(group, head_dim)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], last dim even -> two codes per byte (even channel in the low nibble)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None):
    """Asymmetric quantization of fp32 ``x`` with one (scale, zero) per slice reduced over ``dim``.

    ``valid`` (broadcastable to x) marks entries that may set the range. Scale and zero are
    rounded to fp16 *before* computing the codes, so dequantization with the stored fp16 values
    reproduces exactly what was quantized. Returns uint8 codes and fp16 scale, zero (keepdim).
    """
    levels = 2**bits - 1
    if valid is None:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        hi = x.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = torch.isinf(lo)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    scale = ((hi - lo) / levels).clamp(min=1e-6).half()
    zero = lo.half()
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + zero.float()


def quantize_block(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, valid: torch.Tensor | None):
    """k, v [B, H, n*group, d] (fp) -> the six stored tensors for n blocks (see BLOCK_FIELDS)."""
    b, h, t, d = k.shape
    nb, vg = t // group, value_group(group, d)
    kv = None if valid is None else valid[:, None, :, None].view(b, 1, nb, group, 1)
    kc, ks, kz = quantize(k.float().view(b, h, nb, group, d), bits, dim=3, valid=kv)
    vc, vs, vz = quantize(v.float().view(b, h, t, d // vg, vg), bits, dim=4)
    kc, vc = kc.view(b, h, t, d), vc.view(b, h, t, d)
    if bits == 4:
        kc, vc = pack4(kc), pack4(vc)
    return kc, ks.view(b, h, nb, d), kz.view(b, h, nb, d), vc, vs.view(b, h, t, d // vg), vz.view(b, h, t, d // vg)


def dequantize_blocks(stored, bits: int, group: int, dtype: torch.dtype):
    """The six stored tensors of n blocks -> k, v [B, H, n*group, d] in ``dtype``."""
    kc, ks, kz, vc, vs, vz = stored
    if bits == 4:
        kc, vc = unpack4(kc), unpack4(vc)
    b, h, t, d = kc.shape
    nb, vg = t // group, value_group(group, d)
    k = dequantize(kc.view(b, h, nb, group, d), ks[:, :, :, None], kz[:, :, :, None]).view(b, h, t, d)
    v = dequantize(vc.view(b, h, t, d // vg, vg), vs[..., None], vz[..., None]).view(b, h, t, d)
    return k.to(dtype), v.to(dtype)


def stored_shapes(batch: int, shape: KVShape, bits: int, group: int) -> list[tuple[int, int, int]]:
    """(B, H, last dim) of each stored tensor; dim 2 counts entries."""
    d, h = shape.head_dim, shape.kv_heads
    packed = d // 2 if bits == 4 else d
    per_token = d // value_group(group, d)
    return [(batch, h, packed), (batch, h, d), (batch, h, d), (batch, h, packed), (batch, h, per_token),
            (batch, h, per_token)]


class MemoryStore:
    """Quantized blocks in buffers sized for ``capacity`` tokens, carved from one byte buffer.

    ``backing`` (uint8, ``store_layout(...)[1]`` bytes long) lets a caller put the buffers in
    pinned host memory or in a memory-mapped file; by default they are allocated on ``device``.
    """

    def __init__(self, batch: int, shape: KVShape, bits: int, group: int, capacity: int, device,
                 backing: torch.Tensor | None = None) -> None:
        self.group = group
        self.capacity_blocks = capacity // group
        layout, total = store_layout(batch, shape, bits, group, capacity)
        if backing is None:
            backing = torch.zeros(total, dtype=torch.uint8, device=device)
        self.backing = backing
        self.buffers = [backing[off : off + n].view(dt).view(size) for off, n, dt, size in layout]
        self.blocks = 0

    def append(self, stored) -> None:
        new = stored[1].shape[2]
        if self.blocks + new > self.capacity_blocks:
            raise CacheFullError(
                f"quantized KV store holds {self.capacity_blocks * self.group} tokens; appending "
                f"{new * self.group} more would overflow it"
            )
        for buf, part, rows in zip(self.buffers, stored, block_rows(self.group), strict=True):
            buf[:, :, self.blocks * rows : (self.blocks + new) * rows] = part
        self.blocks += new

    def read(self, device) -> list[torch.Tensor]:
        return [buf[:, :, : self.blocks * rows] for buf, rows in zip(self.buffers, block_rows(self.group), strict=True)]

    def nbytes(self) -> int:
        return tensor_bytes(*self.buffers)


def store_layout(batch: int, shape: KVShape, bits: int, group: int, capacity: int):
    """[(byte offset, bytes, dtype, shape)] of the six buffers, and the total bytes."""
    blocks = capacity // group
    dtypes = (torch.uint8, torch.float16, torch.float16) * 2
    out, offset = [], 0
    for (b, h, last), rows, dt in zip(stored_shapes(batch, shape, bits, group), block_rows(group), dtypes,
                                      strict=True):
        size = (b, h, blocks * rows, last)
        n = b * h * blocks * rows * last * dt.itemsize
        out.append((offset, n, dt, size))
        offset += (n + 63) // 64 * 64
    return out, offset


@dataclass
class LayerState:
    store: object
    k_res: torch.Tensor  # full-precision window [B, H, r, d]
    v_res: torch.Tensor
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


class QuantizedCache:
    """The KV-cache protocol over quantized blocks plus a full-precision recent window."""

    def __init__(self, shape: KVShape, batch: int, max_tokens: int, bits: int, group: int, residual: int,
                 make_store=None) -> None:
        if shape.head_dim % value_group(group, shape.head_dim):
            raise ValueError(f"group {group} and head_dim {shape.head_dim}: one must divide the other")
        self.shape, self.batch, self.max_tokens = shape, batch, max_tokens
        self.bits, self.group, self.residual = bits, group, residual
        self.make_store = make_store or (
            lambda layer, like: MemoryStore(batch, shape, bits, group, max_tokens, like.device)
        )
        self.layers: list[LayerState | None] = [None] * shape.num_layers
        self.valid: torch.Tensor | None = None
        self.seen_tokens = 0
        self.quantized_tokens = 0
        self._pending = 0

    def start_step(self, new_mask: torch.Tensor | None, num_new: int) -> None:
        if self.seen_tokens + num_new > self.max_tokens:
            raise CacheFullError(
                f"KV cache created for {self.max_tokens} tokens; this step would need {self.seen_tokens + num_new}"
            )
        self.valid = extend_valid(self.valid, self.seen_tokens, new_mask, num_new)
        self._pending = num_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        state = self.layers[layer]
        if state is None:
            empty = k[:, :, :0]
            state = self.layers[layer] = LayerState(self.make_store(layer, k), empty, v[:, :, :0])
        ks, vs = [state.k_res, k], [state.v_res, v]
        if self.quantized_tokens:
            kq, vq = dequantize_blocks(state.store.read(k.device), self.bits, self.group, k.dtype)
            ks.insert(0, kq)
            vs.insert(0, vq)
        state.pending = (k, v)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), self.valid

    def end_step(self) -> None:
        window = self.seen_tokens + self._pending - self.quantized_tokens
        move = max(0, (window - self.residual) // self.group) * self.group
        start = self.quantized_tokens
        for state in self.layers:
            if state is None or state.pending is None:
                continue
            k_res = torch.cat([state.k_res, state.pending[0]], dim=2)
            v_res = torch.cat([state.v_res, state.pending[1]], dim=2)
            state.pending = None
            if move:
                valid = None if self.valid is None else self.valid[:, start : start + move]
                state.store.append(quantize_block(k_res[:, :, :move], v_res[:, :, :move], self.bits, self.group, valid))
                k_res, v_res = k_res[:, :, move:].clone(), v_res[:, :, move:].clone()
            state.k_res, state.v_res = k_res, v_res
        self.quantized_tokens += move
        self.seen_tokens += self._pending
        self._pending = 0

    def nbytes(self) -> int:
        total = tensor_bytes(self.valid)
        for state in self.layers:
            if state is not None:
                total += state.store.nbytes() + tensor_bytes(state.k_res, state.v_res)
        return total


class QuantizedCacheFactory:
    def __init__(self, name: str, shape: KVShape, bits: int, group: int, residual: int) -> None:
        if residual < 0 or group <= 0:
            raise ValueError(f"{name}: residual must be >= 0 and group > 0")
        self.name, self.shape, self.bits, self.group, self.residual = name, shape, bits, group, residual

    def new(self, batch: int, max_tokens: int) -> QuantizedCache:
        return QuantizedCache(self.shape, batch, max_tokens, self.bits, self.group, self.residual)
