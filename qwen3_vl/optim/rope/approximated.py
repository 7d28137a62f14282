"""Approximated rotary tables: cos/sin by angle addition from two small tables. Approximate.

A position ``p = hi * split + lo`` gives ``cos(p t) = cos(hi split t) cos(lo t) - sin(hi split t) sin(lo t)``
(and likewise for sin), so a step needs two table look-ups and four multiply-adds per entry
instead of cos/sin, and the tables hold ``split + max_position / split`` rows instead of one row
per position (``cached``). Both tables are built in float64 and rounded once to fp32.

Precision, declared and tested: against the exact value (float64 cos/sin of ``p t``), the error
is at most ``MAX_ABS_ERROR`` for every position below 2^24 (four rounded fp32 factors and one
sum). ``standard`` itself rounds the fp32 angle ``p * t`` first, which costs up to about
``p * max(t) * 2^-24`` (about 2e-3 at 32K positions), so against ``standard`` the difference is
dominated by standard's own rounding, not by this approximation. Not a default anywhere: RoPE
is a negligible share of the work, so there is nothing to win.
"""

from __future__ import annotations

import torch

from qwen3_vl.config import Qwen3VLConfig
from qwen3_vl.optim.plan import Optimization

MAX_ABS_ERROR = 4e-7  # |cos - exact|, |sin - exact| for positions < 2^24


def _inverse_frequencies64(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


class AngleAdditionTable:
    """cos/sin(p * inv_freq) for integer p >= 0 from a low table (p % split) and a high table (p // split)."""

    def __init__(self, inv_freq64: torch.Tensor, split: int, device) -> None:
        self.inv_freq64, self.split, self.device = inv_freq64, split, device
        lo = torch.arange(split, dtype=torch.float64)[:, None] * inv_freq64
        self.cos_lo, self.sin_lo = lo.cos().float().to(device), lo.sin().float().to(device)
        self.cos_hi = self.sin_hi = torch.empty(0, inv_freq64.numel(), device=device)

    def _grow(self, rows: int) -> None:
        if rows > self.cos_hi.shape[0]:
            size = 1 << max(4, int(rows).bit_length())
            hi = torch.arange(size, dtype=torch.float64)[:, None] * self.split * self.inv_freq64
            self.cos_hi, self.sin_hi = hi.cos().float().to(self.device), hi.sin().float().to(self.device)

    def lookup(self, positions: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[..., n]`` (one per frequency slot when ``slots`` is given, else ``[...]``
        broadcast over all slots) -> fp32 cos, sin ``[..., n_slots]``."""
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"rope positions must be >= 0, got {int(positions.min())}")
        self._grow(int(positions.max()) // self.split + 1 if positions.numel() else 1)
        device = positions.device
        hi, lo = positions // self.split, positions % self.split
        tables = [t.to(device) for t in (self.cos_hi, self.sin_hi, self.cos_lo, self.sin_lo)]
        if slots is None:
            ch, sh, cl, sl = (t[i] for t, i in zip(tables, (hi, hi, lo, lo), strict=True))
        else:
            ch, sh, cl, sl = (t[i, slots] for t, i in zip(tables, (hi, hi, lo, lo), strict=True))
        return ch * cl - sh * sl, sh * cl + ch * sl


class ApproximatedRope:
    name = "approximated"

    def __init__(self, config: Qwen3VLConfig, device="cpu", split: int = 256) -> None:
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"approximated rope: split must be a positive integer, got {split!r}")
        t, v = config.text, config.vision
        self.text_table = AngleAdditionTable(_inverse_frequencies64(t.rope_theta, t.head_dim), split, device)
        self.vision_table = AngleAdditionTable(_inverse_frequencies64(v.rope_theta, v.head_dim // 2), split, device)
        half = t.head_dim // 2
        axis = torch.zeros(half, dtype=torch.long)
        axis[1 : 3 * t.mrope_section[1] : 3] = 1
        axis[2 : 3 * t.mrope_section[2] : 3] = 2
        self.slot_axis = axis.to(device)

    def text(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.long().permute(1, 2, 0)  # [B, L, 3]
        per_slot = pos.index_select(-1, self.slot_axis.to(pos.device))  # [B, L, d/2]
        slots = torch.arange(per_slot.shape[-1], device=pos.device)
        cos, sin = self.text_table.lookup(per_slot, slots)
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)

    def vision(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cr, sr = self.vision_table.lookup(rows.long())
        cc, sc = self.vision_table.lookup(cols.long())
        cos, sin = torch.cat((cr, cc), dim=-1), torch.cat((sr, sc), dim=-1)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


OPTION = Optimization(
    name="approximated",
    axis="rope",
    exact=False,
    summary=(
        "RoPE cos/sin by angle addition from two small float64-built tables (no cos/sin per step); |error| <= "
        "4e-7 against exact cos/sin at every position < 2^24. No measurable speed gain (RoPE is negligible "
        "work): kept for precision studies, never a default."
    ),
    build=lambda model, target, split=256: ApproximatedRope(model.config, target.device, split),
    # Measured on tiny: logits_rel ~1e-6 (table differences of 1 ulp at short positions).
    error_budget={"logits_rel": 1e-4, "kl": 1e-6, "top1_agreement": 0.95},
    fallback="standard",
    defaults={"split": 256},
    variants=({"split": 8},),  # tiny prompts cross several high-table rows
)
