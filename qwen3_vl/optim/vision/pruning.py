"""Pieces shared by the visual token pruning options (no option of its own).

Pruning keeps every text token and a subset of the visual tokens. Kept tokens keep their original
3D positions (so decoding continues from the unpruned prompt's ``max position + 1``), and the
DeepStack rows, which follow the visual tokens in row-major order, are pruned with the same indices.
"""

from __future__ import annotations

import math

import torch

from qwen3_vl.model.positions import InputError


def check_ratio(option: str, ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{option}: keep ratio must be in (0, 1], got {ratio}")
    return ratio


def keep_count(n: int, ratio: float) -> int:
    """Visual tokens kept out of ``n`` at ``ratio`` (at least one when there are any)."""
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


def same_count_per_row(option: str, counts: torch.Tensor) -> int:
    """Rows of a batch must keep equally many tokens so the pruned batch stays rectangular."""
    values = counts.tolist()
    if len(set(values)) != 1:
        raise InputError(
            f"{option} needs the same number of visual tokens in every batch row, got {values}; "
            "run the rows separately"
        )
    return int(values[0])


def keep_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] bool -> (index [B, W], filler [B, W]): each row's kept positions in order, right-aligned.

    ``W`` is the largest row count; a row that keeps fewer is left-filled with some of its dropped
    positions, flagged in ``filler`` so they can be masked out like left padding.
    """
    width = int(keep.sum(1).max())
    order = torch.sort(keep.int(), dim=1, stable=True).indices  # dropped first, then kept, each in order
    index = order[:, keep.shape[1] - width :]
    return index, ~keep.gather(1, index)


def take(t: torch.Tensor, index: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Gather the sequence positions ``index`` ([B, L']) along ``dim`` of ``t``, per batch row.

    ``t``'s batch dimension may be 1 (broadcast over the batch, like cos/sin of shared positions).
    """
    shape = list(t.shape)
    shape[batch_dim] = index.shape[0]
    t = t.expand(shape)
    view = [1] * t.ndim
    view[batch_dim], view[dim] = index.shape
    shape[dim] = index.shape[1]
    return torch.gather(t, dim, index.view(view).expand(shape))


def kept_visual_rows(visual_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of the DeepStack tensors (visual tokens in row-major order) that ``index`` keeps."""
    rank = (visual_mask.flatten().long().cumsum(0) - 1).view(visual_mask.shape)
    return rank.gather(1, index)[visual_mask.gather(1, index)]
