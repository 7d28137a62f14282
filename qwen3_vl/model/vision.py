"""Qwen3-VL vision encoder (SigLIP-2 style ViT with 2D RoPE, patch merger and DeepStack taps).

Input rows are flattened (channel, time, row, col) patches of 3*2*16*16 values, already in
merge-window order (every 4 consecutive rows form one 2x2 window) as the processor emits them.
Output: one token per 2x2 window, plus one DeepStack feature tensor per tap, same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen3_vl.config import VisionConfig
from qwen3_vl.model.layers import LayerNorm, Linear, apply_rotary


def grid_coordinates(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (row, col) patch coordinates in merge-window order, and the per-token grid (h, w).

    Returns ``rows``, ``cols`` and ``sizes`` (``[S, 2]`` of each token's image h, w), repeated for
    every temporal slice.
    """
    rows, cols, sizes = [], [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # (block_row, block_col, intra_row, intra_col) order
        rows.append(r.permute(0, 2, 1, 3).reshape(-1).repeat(t))
        cols.append(c.permute(0, 2, 1, 3).reshape(-1).repeat(t))
        sizes.append(torch.tensor([h, w]).expand(t * h * w, 2))
    return torch.cat(rows), torch.cat(cols), torch.cat(sizes)


def segment_boundaries(grid_thw: torch.Tensor) -> torch.Tensor:
    """cu_seqlens: one attention segment per image and per temporal slice of a video."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


@dataclass
class VisionGrid:
    """What a vision forward derives from ``grid_thw`` alone: the position-table taps and weights
    ([S, 4] each), the 2D RoPE cos/sin ([S, 1, d]) on the device, and the segment bounds on the host."""

    pos_index: torch.Tensor
    pos_weight: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, cu_seqlens, attention) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = self.qkv(x).view(s, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.position(q, k, cos, sin)
        return self.proj(self.segment_attention(q, k, v, cu_seqlens, attention).reshape(s, -1))

    def segment_attention(self, q, k, v, cu_seqlens, attention) -> torch.Tensor:
        """Each image's or frame's patches (bounded by ``cu_seqlens``, on the host) attend among themselves."""
        return attention.vision(q, k, v, cu_seqlens, self.head_dim**-0.5)

    def position(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2D rotary of q and k [s, heads, d], in fp32 whatever the activation dtype."""
        return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, cu_seqlens, attention) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, attention)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 patch merge: LayerNorm (per patch, or on the 4 concatenated patches), fc1, erf GELU, fc2."""

    def __init__(self, config: VisionConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.merged if postshuffle_norm else config.hidden_size, eps=1e-6)
        self.linear_fc1 = Linear(self.merged, self.merged)
        self.linear_fc2 = Linear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The DeepStack mergers normalise the 4 concatenated patches, the main merger each patch.
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    """The Conv3d(kernel = stride = (2, 16, 16)) patch embedding, written as the linear map it is."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = Linear(config.patch_dim, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        # Activation dtype; the top-level model sets it (fp32 when weights are stored in fp16).
        self.compute_dtype = torch.float32
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle_norm=True) for _ in config.deepstack_visual_indexes
        )

    def position_taps(self, rows, cols, sizes) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear (align-corners) taps into the learned 48x48 table at each token's cell: the four
        table rows [S, 4] and their weights [S, 4] (host tensors)."""
        side = round(self.config.num_position_embeddings**0.5)
        taps, weights = [], []
        for coord, size in ((rows, sizes[:, 0]), (cols, sizes[:, 1])):
            src = coord.float() * (side - 1) / torch.clamp(size - 1, min=1)
            lo = torch.floor(src)
            taps.append(torch.stack([lo, lo + 1], 1).long().clamp(0, side - 1))
            frac = (src - lo)[:, None]
            weights.append(torch.cat([1 - frac, frac], 1))
        index = (taps[0][:, :, None] * side + taps[1][:, None, :]).reshape(-1, 4)
        weight = (weights[0][:, :, None] * weights[1][:, None, :]).reshape(-1, 4)
        return index, weight

    def prepare(self, grid_thw: torch.Tensor, rope) -> VisionGrid:
        """Everything of a forward that depends on the grid alone, on the weights' device (see ``VisionGrid``)."""
        grid_thw = grid_thw.cpu()
        rows, cols, sizes = grid_coordinates(grid_thw, self.config.spatial_merge_size)
        device = self.pos_embed.weight.device
        index, weight = self.position_taps(rows, cols, sizes)
        cos, sin = rope.vision(rows.to(device), cols.to(device))
        # cu_seqlens stays on the host: attention reads the bounds every layer
        return VisionGrid(index.to(device), weight.to(device), cos[:, None, :], sin[:, None, :],
                          segment_boundaries(grid_thw))

    def encode(
        self, pixel_values: torch.Tensor, grid: VisionGrid, attention
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward`` on a prepared grid: device work only, no host reads (what a CUDA graph can capture)."""
        x = self.patch_embed(pixel_values.to(self.compute_dtype))
        position = (self.pos_embed(grid.pos_index) * grid.pos_weight[:, :, None]).sum(1)
        x = x + position.to(x.dtype)
        taps = list(self.config.deepstack_visual_indexes)
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, grid.cos, grid.sin, grid.cu_seqlens, attention)
            if index in taps:
                deepstack.append(self.deepstack_merger_list[taps.index(index)](x))
        return self.merger(x), deepstack

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, attention, rope
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Merged tokens [N, out_hidden] and the DeepStack features (one [N, out_hidden] per tap)."""
        return self.encode(pixel_values, self.prepare(grid_thw, rope), attention)
