"""3D (temporal, height, width) position ids for interleaved M-RoPE, and the rope deltas.

Text advances all three axes together; a vision block of merged grid (h', w') starting at
position ``s`` gets ``(s, s + row, s + col)`` and the text after it starts at
``s + max(h', w')``. Each temporal slice of a video is its own block (time is carried by the
``<x.x seconds>`` text between frames).
"""

from __future__ import annotations

import itertools

import torch

from qwen3_vl.config import Qwen3VLConfig


class InputError(ValueError):
    """Model inputs that do not fit together (token counts vs grids, shapes, lengths)."""


def token_types(input_ids: torch.Tensor, config: Qwen3VLConfig) -> torch.Tensor:
    """0 for text, 1 for image placeholders, 2 for video placeholders (derived from the ids)."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def mrope_positions(
    input_ids: torch.Tensor,
    config: Qwen3VLConfig,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [3, batch, seq] (padding gets 0) and rope deltas [batch] = max + 1 - real length."""
    merge = config.vision.spatial_merge_size
    grids = {
        1: [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()],
        2: [],
    }
    if video_grid_thw is not None:
        for t, h, w in video_grid_thw.tolist():
            grids[2].extend([(1, h, w)] * t)
    cursor = {1: 0, 2: 0}
    names = {1: "image", 2: "video"}
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    mask_cpu = None if attention_mask is None else attention_mask.cpu().bool()
    for b in range(batch):
        row = ids_cpu[b] if mask_cpu is None else ids_cpu[b][mask_cpu[b]]
        types = token_types(row, config).tolist()
        chunks, pos = [], 0
        for kind, group in itertools.groupby(types):
            length = len(list(group))
            if kind == 0:
                chunks.append(torch.arange(pos, pos + length).expand(3, -1))
                pos += length
                continue
            # One placeholder run may hold several consecutive grids only if the template has no
            # separator; walk grids until the run is consumed.
            remaining = length
            while remaining > 0:
                if cursor[kind] >= len(grids[kind]):
                    raise InputError(
                        f"the prompt has more {names[kind]} placeholder tokens than the "
                        f"{len(grids[kind])} {names[kind]} grid(s) provide"
                    )
                _, h, w = grids[kind][cursor[kind]]
                cursor[kind] += 1
                gh, gw = h // merge, w // merge
                if gh * gw > remaining:
                    raise InputError(
                        f"{names[kind]} placeholder run of {length} tokens does not match the "
                        f"{names[kind]} grid {h}x{w} ({gh * gw} tokens)"
                    )
                hh = torch.arange(gh).repeat_interleave(gw) + pos
                ww = torch.arange(gw).repeat(gh) + pos
                chunks.append(torch.stack([torch.full_like(hh, pos), hh, ww]))
                pos += max(gh, gw)
                remaining -= gh * gw
        flat = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        if mask_cpu is None:
            positions[:, b] = flat
        else:
            positions[:, b, mask_cpu[b]] = flat
        deltas[b] = (flat.max() + 1 - len(row)) if flat.numel() else 0
    for kind in (1, 2):
        if cursor[kind] != len(grids[kind]):
            raise InputError(
                f"{len(grids[kind])} {names[kind]} grid(s) given but the prompt's placeholders use "
                f"only {cursor[kind]}"
            )
    return positions.to(input_ids.device), deltas.to(input_ids.device)
