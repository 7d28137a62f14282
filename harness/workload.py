"""Seeded inputs, and generation observed from outside (step logits, the cache it used).

A prompt is described by a small frozen ``PromptSpec`` (rows of text / image / text lengths, a seed),
so hypothesis can draw it, a failing example prints as something a person can re-run, and the same
spec always builds the same tensors. Rows of different lengths are left-padded, as ``generate`` expects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from qwen3_vl.config import Qwen3VLConfig

TEXT_VOCAB = 1000  # plain text ids are drawn below every special token id


@dataclass(frozen=True)
class RowSpec:
    """One sequence: ``text_before`` tokens, an optional image of ``grid`` = (h, w) patches, ``text_after``."""

    text_before: int
    grid: tuple[int, int] | None = None
    text_after: int = 0


@dataclass(frozen=True)
class PromptSpec:
    rows: tuple[RowSpec, ...]
    seed: int = 0


@dataclass
class Prompt:
    spec: PromptSpec
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor | None  # [B, L] (None when no row is padded)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    real_lengths: list[int] = field(default_factory=list)
    row_image: list[int | None] = field(default_factory=list)  # index into image_grid_thw per row

    def inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``."""
        return {
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def valid(self) -> torch.Tensor:
        """[B, L] bool: positions holding real tokens."""
        if self.attention_mask is None:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        return self.attention_mask.bool()


def build_prompt(config: Qwen3VLConfig, spec: PromptSpec) -> Prompt:
    gen = torch.Generator().manual_seed(spec.seed)
    merge = config.vision.spatial_merge_size
    rows, grids, row_image = [], [], []
    for row in spec.rows:
        parts = [torch.randint(0, TEXT_VOCAB, (row.text_before,), generator=gen)]
        if row.grid is not None:
            h, w = row.grid
            parts += [
                torch.tensor([config.vision_start_token_id]),
                torch.full((h * w // merge**2,), config.image_token_id),
                torch.tensor([config.vision_end_token_id]),
            ]
            grids.append((1, h, w))
        row_image.append(len(grids) - 1 if row.grid is not None else None)
        parts.append(torch.randint(0, TEXT_VOCAB, (row.text_after,), generator=gen))
        rows.append(torch.cat(parts).long())
    grid_t = torch.tensor(grids) if grids else None
    pixels = None
    if grids:
        pixels = torch.randn(int(grid_t.prod(-1).sum()), config.vision.patch_dim, generator=gen)
    return _assemble(spec, rows, pixels, grid_t, row_image, config.pad_token_id, 0)


def _assemble(spec, rows, pixels, grid_t, row_image, pad_id: int, extra_pad: int) -> Prompt:
    """Left-pad ``rows`` (1-D id tensors) to one batch, ``extra_pad`` more pad tokens than needed."""
    length = max(len(r) for r in rows) + extra_pad
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    padded = bool((mask == 0).any())
    return Prompt(spec, ids, mask if padded else None, pixels, grid_t, [len(r) for r in rows], row_image)


def _row_ids(prompt: Prompt, b: int) -> torch.Tensor:
    return prompt.input_ids[b][prompt.valid()[b]]


def single_row(prompt: Prompt, b: int, pad_id: int) -> Prompt:
    """Row ``b`` alone, unpadded, with exactly the same ids and pixels it has in the batch."""
    image = prompt.row_image[b]
    pixels = grid = None
    row_image: list[int | None] = [None]
    if image is not None:
        sizes = prompt.image_grid_thw.prod(-1).tolist()
        start = int(sum(sizes[:image]))
        pixels = prompt.pixel_values[start:start + int(sizes[image])]
        grid = prompt.image_grid_thw[image:image + 1]
        row_image = [0]
    return _assemble(prompt.spec, [_row_ids(prompt, b)], pixels, grid, row_image, pad_id, 0)


def left_padded(prompt: Prompt, extra: int, pad_id: int) -> Prompt:
    """The same rows with ``extra`` more pad tokens on the left of every row."""
    rows = [_row_ids(prompt, b) for b in range(prompt.batch)]
    return _assemble(prompt.spec, rows, prompt.pixel_values, prompt.image_grid_thw, prompt.row_image, pad_id, extra)


def benchmark_spec(seed: int = 0) -> PromptSpec:
    """The fixed multimodal prompt of the latency, memory and accuracy suites: text, one 8x8-patch
    image (16 visual tokens after the 2x2 merge), text."""
    return PromptSpec((RowSpec(8, (8, 8), 8),), seed=seed)


# ---------------------------------------------------------------------------------------------
# Generation, observed from outside: the harness never re-implements ``generate``


@contextlib.contextmanager
def observe(model):
    """While active, record what ``model.generate`` does: the last-position logits of every
    ``model.step`` call (the first is the prefill) and the caches ``model.new_cache`` creates."""
    seen: dict[str, list] = {"logits": [], "caches": []}
    new_cache = model.new_cache
    previous = model.__dict__.get("new_cache")  # observers may nest

    def observed_logits(logits):
        seen["logits"].append(logits[:, -1].detach())

    def observed_new_cache(*args, **kwargs):
        cache = new_cache(*args, **kwargs)
        seen["caches"].append(cache)
        return cache

    # Step logits come through the model's observer list, which also sees steps that an execution
    # option replays without calling ``model.step`` (CUDA graphs).
    model.step_observers.append(observed_logits)
    model.__dict__["new_cache"] = observed_new_cache
    try:
        yield seen
    finally:
        model.step_observers.remove(observed_logits)
        if previous is None:
            model.__dict__.pop("new_cache", None)  # the class's method is visible again
        else:
            model.__dict__["new_cache"] = previous


def generate(model, prompt: Prompt, new_tokens: int):
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens; returns (tokens [B, N] on the CPU,
    step logits [B, N, V] as float on the CPU: the distribution each token was chosen from, the cache)."""
    with observe(model) as seen:
        out = model.generate(prompt.input_ids, **prompt.inputs(), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=[])
    logits = torch.stack([x.float().cpu() for x in seen["logits"][:new_tokens]], dim=1)
    return out[:, prompt.length:].cpu(), logits, seen["caches"][-1] if seen["caches"] else None


def extended(prompt: Prompt, tokens: torch.Tensor) -> Prompt:
    """The prompt with ``tokens`` ([B, N]) appended to every row (as decoding appends them)."""
    ids = torch.cat([prompt.input_ids, tokens.to(prompt.input_ids.dtype)], dim=1)
    mask = None
    if prompt.attention_mask is not None:
        mask = torch.cat([prompt.attention_mask, torch.ones_like(tokens, dtype=prompt.attention_mask.dtype)], dim=1)
    return Prompt(prompt.spec, ids, mask, prompt.pixel_values, prompt.image_grid_thw,
                  [n + tokens.shape[1] for n in prompt.real_lengths], prompt.row_image)
