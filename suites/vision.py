"""Vision: time to first token with conditional extraction (cold image, repeated image, second turn).

Runs under ``--suites vision`` on its own prompt: 16 text tokens, one 448x448 image (28x28 patches,
196 visual tokens: a laptop-budget image), 16 text tokens. Every ``time_`` case runs interleaved with
the reference plan (``vision=full``), which does the same work every time:

- ``time_first_image``: an image never seen before (fresh pixels every call).
- ``time_repeated_image``: the same image again (its first request is not timed).
- ``time_second_turn``: a conversation's second turn, 8 new text tokens after an untimed first turn
  and 4 decoded tokens (``qwen3_vl.session.Session``).

The pruning options' TTFT and error are in ``suites/vision_pruning.py``. Example, stored through
the harness::

    python -m harness validate --preset mini --device cpu --suites vision --plan vision=conditional
"""

from __future__ import annotations

import dataclasses

import torch

from harness.numerics import logit_metrics
from harness.results import Measurement
from harness.workload import Prompt, PromptSpec, RowSpec, build_prompt
from qwen3_vl.model.positions import mrope_positions
from qwen3_vl.session import Session

GRID = (28, 28)  # patches of 16 px: a 448x448 image
TEXT = 16


def vision_prompt(config, seed: int = 0) -> Prompt:
    return build_prompt(config, PromptSpec((RowSpec(TEXT, GRID, TEXT),), seed=seed))


def shared_prompt(bench) -> Prompt:
    key = ("vision_prompt", id(bench.model.config))
    if key not in bench.shared:
        bench.shared[key] = vision_prompt(bench.model.config)
    return bench.shared[key]


def _ttft(model, prompt: Prompt) -> None:
    """Prefill and the first token: ``generate`` of one token."""
    model.generate(prompt.input_ids, **prompt.inputs(), max_new_tokens=1, eos_token_id=[])


def fresh_image_ttft(bench, clock) -> None:
    prompt = shared_prompt(bench)
    fresh = dataclasses.replace(prompt, pixel_values=torch.randn_like(prompt.pixel_values))
    with torch.inference_mode(), clock(tokens=1):
        _ttft(bench.model, fresh)


def time_first_image(bench, clock) -> None:
    """TTFT for an image the model has not seen (new pixels each call, drawn outside the clock)."""
    fresh_image_ttft(bench, clock)


def time_repeated_image(bench, clock) -> None:
    """TTFT for the same image a second time (the first request is not timed)."""
    prompt = shared_prompt(bench)
    with torch.inference_mode():
        _ttft(bench.model, prompt)
        with clock(tokens=1):
            _ttft(bench.model, prompt)


def time_second_turn(bench, clock) -> None:
    """TTFT of a second conversation turn: 8 new text tokens after the first turn's 4-token answer."""
    prompt = shared_prompt(bench)
    session = Session(bench.model)
    answer = session.generate(prompt.input_ids, prompt.pixel_values, prompt.image_grid_thw,
                              max_new_tokens=4, eos_token_id=[])
    follow_up = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1))
    conversation = torch.cat([prompt.input_ids[0], answer, follow_up])[None]
    with clock(tokens=1):
        session.prefill(conversation, prompt.pixel_values, prompt.image_grid_thw).argmax(-1)


def track_pixel_budget(bench):
    """The operating point: this suite's image size, and the pixel budget this machine's profile sets."""
    from qwen3_vl.optim.vision.budget import TOKEN_PIXELS, pixel_budget

    patch = bench.model.config.vision.patch_size
    pixels = GRID[0] * GRID[1] * patch * patch
    budget = pixel_budget("auto", device=str(bench.model.device))
    case = f"pixel_budget[{budget.source}]"
    return [("image", Measurement("image_pixels", pixels, "pixels")),
            ("image", Measurement("visual_tokens", pixels // TOKEN_PIXELS, "tokens")),
            (case, Measurement("min_pixels", budget.min_pixels, "pixels")),
            (case, Measurement("max_pixels", budget.max_pixels, "pixels"))]


def teacher_forced(model, prompt: Prompt, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill, then decode the given tokens ([B, N]) one by one: last-position logits [B, N + 1, V]."""
    batch, length = prompt.input_ids.shape
    cache = model.new_cache(batch, length + tokens.shape[1])
    embeds, visual_mask, deepstack = model.embed(prompt.input_ids, prompt.pixel_values, prompt.image_grid_thw)
    positions, deltas = mrope_positions(prompt.input_ids, model.config, prompt.attention_mask, prompt.image_grid_thw)
    out = [model.step(embeds, positions, prompt.attention_mask, cache, visual_mask, deepstack, logits_to_keep=1)]
    position = (torch.tensor(prompt.real_lengths) + deltas.cpu()).to(model.device).view(1, batch, 1)
    for i in range(tokens.shape[1]):
        embeds = model.language_model.embed_tokens(tokens[:, i : i + 1].to(model.device)).to(model.compute_dtype)
        out.append(model.step(embeds, position.expand(3, batch, 1), None, cache))
        position = position + 1
    return torch.cat([o[:, -1:] for o in out], dim=1).float()


def pruning_error(model, reference, prompt: Prompt, decode_steps: int = 4) -> dict[str, float]:
    """Metrics of ``model`` vs ``reference``: prefill logits at the text positions after the image
    (mapped through the pruned positions), and ``decode_steps`` steps decoding the reference's greedy
    tokens (``decode_*``, the prefill's last position included)."""
    with torch.inference_mode():
        ours = model(prompt.input_ids, **prompt.inputs()).float()
        index = getattr(model.vision, "index", None)
        ref = reference(prompt.input_ids, **prompt.inputs()).float()
        if index is None or ours.shape[1] == ref.shape[1]:
            index = torch.arange(ref.shape[1])[None].expand(ref.shape[0], -1)
        ids = prompt.input_ids.to(index.device)
        config = model.config
        visual = (ids == config.image_token_id) | (ids == config.video_token_id)
        after = visual.long().cumsum(1).bool() & ~visual  # text once the first visual token has passed
        picked = (index >= 0) & after.gather(1, index.clamp(min=0))
        rows = torch.arange(index.shape[0])[:, None].expand_as(index)
        a, b = ours[picked], ref[rows[picked], index[picked]]
        tokens = reference.generate(prompt.input_ids, **prompt.inputs(), max_new_tokens=decode_steps,
                                    min_new_tokens=decode_steps, eos_token_id=[])[:, prompt.input_ids.shape[1]:]
        steps_a, steps_b = teacher_forced(model, prompt, tokens), teacher_forced(reference, prompt, tokens)
    prefill_metrics = logit_metrics(a, b)
    decode_metrics = logit_metrics(steps_a.flatten(0, 1), steps_b.flatten(0, 1))
    return {**{f"prefill_{k}": v for k, v in prefill_metrics.items()},
            **{f"decode_{k}": v for k, v in decode_metrics.items()}}
