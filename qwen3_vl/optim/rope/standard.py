"""Standard rotary embeddings, computed per step: interleaved M-RoPE (text) and 2D RoPE (vision)."""

from __future__ import annotations

import torch

from qwen3_vl.config import Qwen3VLConfig
from qwen3_vl.optim.plan import Optimization


def inverse_frequencies(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2j/dim) for j = 0 .. dim/2 - 1, in fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def interleave_mrope(freqs: torch.Tensor, section: tuple[int, int, int]) -> torch.Tensor:
    """[3, ..., d/2] per-axis angles -> [..., d/2] taking slots round-robin T, H, W.

    Slot j < 3*section[1] with j % 3 == 1 comes from H, j < 3*section[2] with j % 3 == 2 from W,
    every other slot from T.
    """
    out = freqs[0].clone()
    out[..., 1 : 3 * section[1] : 3] = freqs[1, ..., 1 : 3 * section[1] : 3]
    out[..., 2 : 3 * section[2] : 3] = freqs[2, ..., 2 : 3 * section[2] : 3]
    return out


class StandardRope:
    name = "standard"

    def __init__(self, config: Qwen3VLConfig, device: torch.device | str = "cpu") -> None:
        self.section = config.text.mrope_section
        self.inv_freq = inverse_frequencies(config.text.rope_theta, config.text.head_dim).to(device)
        # The vision 2D RoPE: d_v/4 frequencies over d_v/2, shared by rows and columns.
        self.vision_inv_freq = inverse_frequencies(config.vision.rope_theta, config.vision.head_dim // 2).to(device)

    def text_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[3, B, L] positions -> [B, L, d] angles (fp32)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        half = interleave_mrope(freqs, self.section)
        return torch.cat((half, half), dim=-1)

    def text(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.text_angles(positions)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def vision(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.vision_inv_freq.to(rows.device)
        half = torch.cat((rows[:, None].float() * inv, cols[:, None].float() * inv), dim=-1)
        emb = torch.cat((half, half), dim=-1)
        return emb.cos(), emb.sin()


OPTION = Optimization(
    name="standard",
    axis="rope",
    exact=True,
    reference=True,
    summary="Reference RoPE: cos/sin computed in fp32 from the position ids at every forward.",
    build=lambda model, target: StandardRope(model.config, target.device),
)
