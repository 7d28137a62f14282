"""Synthetic multimodal prompts (token ids + random pixel rows) for model-level tests."""

from __future__ import annotations

import torch

from qwen3_vl.config import Qwen3VLConfig


def text_ids(n: int, gen: torch.Generator, vocab: int = 900) -> torch.Tensor:
    """Plain text ids, below every special token id used in tests."""
    return torch.randint(0, vocab, (n,), generator=gen)


def image_block(config: Qwen3VLConfig, grid: tuple[int, int, int], token: int | None = None) -> torch.Tensor:
    n = grid[1] * grid[2] // config.vision.spatial_merge_size**2
    token = config.image_token_id if token is None else token
    return torch.cat([
        torch.tensor([config.vision_start_token_id]),
        torch.full((n,), token),
        torch.tensor([config.vision_end_token_id]),
    ])


def image_prompt(config: Qwen3VLConfig, grids: list[tuple[int, int, int]], seed: int = 0):
    """ids [1, L], pixel_values, image_grid_thw for text / image / text / image / text."""
    gen = torch.Generator().manual_seed(seed)
    parts = [text_ids(5, gen)]
    for grid in grids:
        parts += [image_block(config, grid), text_ids(3, gen)]
    grid_t = torch.tensor(grids)
    pixels = torch.randn(int(grid_t.prod(-1).sum()), config.vision.patch_dim, generator=gen)
    return torch.cat(parts)[None], pixels, grid_t


def video_prompt(config: Qwen3VLConfig, grid: tuple[int, int, int], seed: int = 0):
    """One video: a timestamp-like text run before each temporal patch, as the processor emits."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    parts = [text_ids(4, gen)]
    for _ in range(t):
        parts += [text_ids(3, gen), image_block(config, (1, h, w), token=config.video_token_id)]
    parts.append(text_ids(3, gen))
    pixels = torch.randn(t * h * w, config.vision.patch_dim, generator=gen)
    return torch.cat(parts)[None], pixels, torch.tensor([grid])


def left_pad(config: Qwen3VLConfig, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), config.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


def token_types(ids: torch.Tensor, config: Qwen3VLConfig) -> torch.Tensor:
    return (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
