"""Latency: vision encode, time to first token, decode time per token, end-to-end generation.

Each case runs on the run's fixed seeded multimodal prompt, once per round, interleaved with the
reference plan (the harness does the rounds, warm-up and ratios; see ``harness.timing``). Everything
goes through ``model.generate`` itself (observed, never re-implemented), with
``min_new_tokens == max_new_tokens`` so every run decodes the same number of tokens.
"""

from __future__ import annotations

import torch


def time_vision_encode(bench, clock) -> None:
    """The vision tower on the prompt's image: patch embedding, ViT blocks, merger and DeepStack taps."""
    model, prompt = bench.model, bench.prompt
    with torch.inference_mode(), clock():
        model.vision.encode(model, prompt.pixel_values.to(model.device), prompt.image_grid_thw)


def time_prefill(bench, clock) -> None:
    """Time to first token: ``generate`` of one token (embeddings, vision, prefill, the first token)."""
    prompt = bench.prompt
    with clock():
        bench.model.generate(prompt.input_ids, **prompt.inputs(), max_new_tokens=1, eos_token_id=[])


def time_decode_per_token(bench, clock) -> None:
    """One sample per decode step of a ``generate`` of ``new_tokens`` tokens: the time between the
    logits of consecutive steps (the first logits are the prefill's). Read from the model's step
    observers, so it also times steps an execution option replays as a CUDA graph."""
    model, prompt, n = bench.model, bench.prompt, bench.new_tokens
    marks = clock.marks()
    model.step_observers.append(marks)
    try:
        model.generate(prompt.input_ids, **prompt.inputs(), max_new_tokens=n, min_new_tokens=n, eos_token_id=[])
    finally:
        model.step_observers.remove(marks)
    marks.record_intervals(tokens=prompt.batch)


def time_generate(bench, clock) -> None:
    """End to end: ``model.generate`` with ``min_new_tokens == max_new_tokens`` (tokens/s from the count)."""
    prompt, n = bench.prompt, bench.new_tokens
    with clock(tokens=prompt.batch * n):
        bench.model.generate(prompt.input_ids, **prompt.inputs(), max_new_tokens=n, min_new_tokens=n, eos_token_id=[])
