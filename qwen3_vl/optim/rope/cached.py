"""Cached rotary tables: cos/sin of ``position * inv_freq`` computed once per position and reused
by every layer and every step (a step looks its positions up instead of calling cos/sin).

Bitwise equal to ``standard`` on the same device: the table entries are the same fp32 products
passed through the same elementwise cos/sin, and M-RoPE's interleaving only picks, per frequency
slot, which axis's position (T, H or W) indexes the table. Positions may come in any order and
with gaps (the rope_delta after an image); the table grows to the largest position seen, in
powers of two. Negative positions (never produced by the model) are rejected.
"""

from __future__ import annotations

import torch

from qwen3_vl.config import Qwen3VLConfig
from qwen3_vl.optim.plan import Optimization
from qwen3_vl.optim.rope.standard import inverse_frequencies


class RopeTable:
    """cos/sin of ``p * inv_freq`` for p = 0 .. size-1, [size, len(inv_freq)] fp32, grown on demand."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq
        self.cos = self.sin = torch.empty(0, inv_freq.numel(), device=inv_freq.device)

    def covering(self, largest: int) -> tuple[torch.Tensor, torch.Tensor]:
        if largest >= self.cos.shape[0]:
            size = 1 << max(10, int(largest).bit_length())
            angles = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos, self.sin


class CachedRope:
    name = "cached"

    def __init__(self, config: Qwen3VLConfig, device: torch.device | str = "cpu") -> None:
        self.section = config.text.mrope_section
        self.text_table = RopeTable(inverse_frequencies(config.text.rope_theta, config.text.head_dim).to(device))
        self.vision_table = RopeTable(
            inverse_frequencies(config.vision.rope_theta, config.vision.head_dim // 2).to(device)
        )
        half = config.text.head_dim // 2
        # Which axis (0 = T, 1 = H, 2 = W) each frequency slot reads: interleaved M-RoPE.
        axis = torch.zeros(half, dtype=torch.long)
        axis[1 : 3 * self.section[1] : 3] = 1
        axis[2 : 3 * self.section[2] : 3] = 2
        self.slot_axis = axis.to(device)

    @staticmethod
    def _check(positions: torch.Tensor) -> int:
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"rope positions must be >= 0, got {int(positions.min())}")
        return int(positions.max()) if positions.numel() else 0

    def text(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos_t, sin_t = self.text_table.covering(self._check(positions))
        device = positions.device
        cos_t, sin_t = cos_t.to(device), sin_t.to(device)
        # [3, B, L] positions -> per slot the position of that slot's axis: [B, L, d/2]
        pos = positions.long().permute(1, 2, 0)  # [B, L, 3]
        per_slot = pos.index_select(-1, self.slot_axis.to(device))  # [B, L, d/2]
        slot = torch.arange(per_slot.shape[-1], device=device)
        cos_half = cos_t[per_slot, slot]
        sin_half = sin_t[per_slot, slot]
        return torch.cat((cos_half, cos_half), dim=-1).to(dtype), torch.cat((sin_half, sin_half), dim=-1).to(dtype)

    def vision(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        largest = max(self._check(rows), self._check(cols))
        cos_t, sin_t = self.vision_table.covering(largest)
        cos_t, sin_t = cos_t.to(rows.device), sin_t.to(rows.device)
        cos_half = torch.cat((cos_t[rows.long()], cos_t[cols.long()]), dim=-1)
        sin_half = torch.cat((sin_t[rows.long()], sin_t[cols.long()]), dim=-1)
        return torch.cat((cos_half, cos_half), dim=-1), torch.cat((sin_half, sin_half), dim=-1)


OPTION = Optimization(
    name="cached",
    axis="rope",
    exact=True,
    summary=(
        "RoPE cos/sin looked up from tables built once per position and shared by all layers and steps; "
        "bitwise equal to standard. RoPE is a negligible share of the work, so the gain is small."
    ),
    build=lambda model, target: CachedRope(model.config, target.device),
    fallback="standard",
)
