"""Drive a model through a whole conversation and compare next-token distributions (used by
the KV/quant tests and by ``suites/bench_memory_quant.py --parts kv_error``).

A conversation: prefill a prompt, decode ``steps`` tokens, feed a second user turn of
``turn2`` tokens as one multi-token step on the same cache, decode ``steps2`` more. Greedy when
no tokens are given (the reference run); teacher-forced with the reference's tokens otherwise, so
every compared distribution has the same context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.numerics import bounded_measurement
from qwen3_vl.model.positions import mrope_positions


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [B, L], left-padded
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]


def make_prompt(config, rows: list[tuple[int, tuple[int, int] | None, int]], seed: int = 0) -> Prompt:
    """Rows of (text before, image grid (h, w) in patches or None, text after), left-padded."""
    gen = torch.Generator().manual_seed(seed)
    merge = config.vision.spatial_merge_size
    seqs, grids = [], []
    for before, grid, after in rows:
        parts = [torch.randint(0, 900, (before,), generator=gen)]
        if grid is not None:
            parts += [torch.tensor([config.vision_start_token_id]),
                      torch.full((grid[0] * grid[1] // merge**2,), config.image_token_id),
                      torch.tensor([config.vision_end_token_id])]
            grids.append((1, *grid))
        parts.append(torch.randint(0, 900, (after,), generator=gen))
        seqs.append(torch.cat(parts))
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), config.pad_token_id)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
    grid_t = torch.tensor(grids) if grids else None
    pixels = None if not grids else torch.randn(int(grid_t.prod(-1).sum()), config.vision.patch_dim, generator=gen)
    return Prompt(ids, None if bool(mask.all()) else mask, pixels, grid_t)


@torch.inference_mode()
def conversation(model, prompt: Prompt, steps: int = 64, turn2: int = 8, steps2: int = 8,
                 tokens: torch.Tensor | None = None, seed: int = 7, max_tokens: int | None = None):
    """Next-token logits [B, S, V] at every position produced, the tokens fed [B, steps + steps2], the cache."""
    batch, length = prompt.input_ids.shape
    total = length + steps + turn2 + steps2 + 1
    cache = model.new_cache(batch, max_tokens or total)
    embeds, visual_mask, deepstack = model.embed(prompt.input_ids, prompt.pixel_values, prompt.image_grid_thw)
    positions, deltas = mrope_positions(prompt.input_ids, model.config, prompt.attention_mask, prompt.image_grid_thw)
    out = [model.step(embeds, positions, prompt.attention_mask, cache, visual_mask, deepstack, logits_to_keep=1)[:, -1]]
    real = length if prompt.attention_mask is None else prompt.attention_mask.sum(1)
    position = (torch.as_tensor(real) + deltas.cpu()).to(model.device).view(1, batch, 1)
    fed = []

    def decode(n: int, position):
        for _ in range(n):
            token = out[-1].argmax(-1) if tokens is None else tokens[:, len(fed)].to(model.device)
            fed.append(token)
            embeds = model.language_model.embed_tokens(token[:, None]).to(model.compute_dtype)
            out.append(model.step(embeds, position.expand(3, batch, 1), None, cache)[:, -1])
            position = position + 1
        return position

    position = decode(steps, position)
    if turn2:
        ids = torch.randint(0, 900, (batch, turn2), generator=torch.Generator().manual_seed(seed))
        embeds = model.language_model.embed_tokens(ids.to(model.device)).to(model.compute_dtype)
        positions = (position + torch.arange(turn2, device=position.device)).expand(3, batch, turn2)
        out.extend(model.step(embeds, positions, None, cache).unbind(1))
        position = position + turn2
    decode(steps2, position)
    return torch.stack(out, dim=1).float(), torch.stack(fed, dim=1), cache


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative logits error (max|d| / max|ref|), mean next-token KL(ref || ours), top-1 agreement."""
    ours, ref = ours.double(), ref.double()
    log_p, log_q = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "logits_rel": ((ours - ref).abs().max() / ref.abs().max()).item(),
        "kl": max(kl.mean().item(), 0.0),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).double().mean().item(),
    }


# Seeded conversations (rows of text before, image grid, text after) the KV options are measured on.
PROMPTS = {
    # two rows padded to one length, two images: exact options must handle padding bit for bit
    "padded": [(40, (16, 16), 20), (30, (8, 8), 10)],
    # one row of 126 tokens, then 80 more: quantization and eviction both engage
    "single": [(40, (16, 16), 20)],
}


def named_prompt(name: str, config, seed: int = 3) -> Prompt:
    return make_prompt(config, PROMPTS[name], seed=seed)


def within_budget(metrics: dict[str, float], budget: dict[str, float]) -> list[str]:
    """Violations: agreement metrics are lower bounds, the others upper bounds."""
    checked = (bounded_measurement(name, metrics[name], bound) for name, bound in budget.items())
    return [m.error for m in checked if m.status != "ok"]
