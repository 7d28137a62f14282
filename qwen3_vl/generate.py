"""Autoregressive generation with a KV cache: prefill once, then one token per step.

Positions during decode are ``next_position = max prompt position + 1`` per sequence (the rope
delta of an image prompt is carried this way), advanced by one per step. Sampling happens on the
model's device; greedy decoding is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from qwen3_vl.model.positions import InputError, mrope_positions
from qwen3_vl.model.qwen3_vl import check_prompt


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids (argmax, or temperature/top-k/top-p sampling)."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    seed: int | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens; returns ``[batch, prompt + generated]``.

    ``eos_token_id`` defaults to the config's end tokens; pass ``[]`` to never stop early.
    Finished sequences are padded with ``pad_token_id``. ``streamer`` (transformers' protocol)
    receives the prompt via ``put``, then each step's tokens, then ``end()``.
    """
    config = model.config
    check_prompt(input_ids, attention_mask, config)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, prompt_len = input_ids.shape
    if prompt_len + max_new_tokens > config.text.max_position_embeddings:
        raise InputError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the context "
            f"({config.text.max_position_embeddings} tokens)"
        )
    eos = list(config.eos_token_ids) if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    )
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    device = model.device
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    cache = model.new_cache(batch, prompt_len + max_new_tokens)
    prompt = Prompt(config, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                    video_grid_thw)
    prefill = getattr(model.execution, "prefill", None)  # an execution's own (e.g. captured) prefill, if any
    logits = None if prefill is None else prefill(model, cache, prompt)
    if logits is None:
        embeds, visual_mask, deepstack = model.embed(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        positions, _ = prompt.positions()
        logits = model.step(embeds, positions, attention_mask, cache, visual_mask, deepstack, logits_to_keep=1)
    _, deltas = prompt.positions()
    real_len = prompt_len if attention_mask is None else attention_mask.to("cpu").long().sum(1)
    next_position = (torch.as_tensor(real_len) + deltas.cpu()).to(device).view(1, batch, 1)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    request = DecodeRequest(
        cache, logits, next_position, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
        eos, pad, generator, streamer,
    )
    tokens = model.execution.decode(model, request)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids.to(device), tokens], dim=1)


@dataclass
class Prompt:
    """A ``generate`` call's model inputs; ``positions()`` (M-RoPE positions [3, B, L] and rope deltas [B])
    computed once, when first asked (after the visual inputs were checked: their errors come first)."""

    config: object
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    _positions: tuple[torch.Tensor, torch.Tensor] | None = None

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._positions is None:
            self._positions = mrope_positions(self.input_ids, self.config, self.attention_mask, self.image_grid_thw,
                                              self.video_grid_thw)
        return self._positions


@dataclass
class DecodeRequest:
    """Everything a decode loop needs after the prefill (see ``qwen3_vl/optim/execution``)."""

    cache: object
    logits: torch.Tensor  # [B, 1, V] logits of the last prompt position
    next_position: torch.Tensor  # [1, B, 1] position of the first generated token
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: list[int]
    pad: int
    generator: torch.Generator | None
    streamer: object

    def banned(self, step: int) -> list[int]:
        """Token ids the step may not choose: the end tokens before ``min_new_tokens``."""
        return self.eos if step < self.min_new_tokens else []

    def choose(self, logits: torch.Tensor, step: int, finished: torch.Tensor) -> torch.Tensor:
        """The step's tokens from [B, V] logits: end tokens masked before min_new_tokens, finished
        rows padded. Runs on the device with no host synchronisation."""
        if self.banned(step):
            logits = logits.float().clone()
            logits[:, self.eos] = float("-inf")
        token = sample_next(logits, self.do_sample, self.temperature, self.top_k, self.top_p, self.generator)
        return self.pad_finished(token, finished)

    def pad_finished(self, token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        return torch.where(finished, torch.full_like(token, self.pad), token)


def decode_loop(model, request: DecodeRequest, argmax=None) -> torch.Tensor:
    """The reference decode loop: one ``model.step`` per token. Returns [B, generated].

    ``argmax`` (an execution's, e.g. ``cpu_packed``'s screened output matrix): ``argmax(hidden [B, H],
    banned ids) -> [B]``, the exact greedy tokens from the final-normed hidden states, so a greedy
    request's decode steps skip the full logits."""
    batch = request.logits.shape[0]
    device = request.logits.device
    eos_ids = torch.tensor(request.eos, device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    hidden_only = argmax is not None and not request.do_sample
    state, next_position, out = request.logits, request.next_position, []  # state: logits, or hidden states
    for step in range(request.max_new_tokens):
        if hidden_only and step:
            token = request.pad_finished(argmax(state[:, -1], request.banned(step)), finished)
        else:
            token = request.choose(state[:, -1], step, finished)
        out.append(token)
        if request.streamer is not None:
            request.streamer.put(token.cpu())
        if request.eos:
            finished = finished | torch.isin(token, eos_ids)
            if bool(finished.all()):
                break
        if step == request.max_new_tokens - 1:
            break
        embeds = model.language_model.embed_tokens(token[:, None]).to(model.compute_dtype)
        state = model.step(embeds, next_position.expand(3, batch, 1), None, request.cache, hidden_only=hidden_only)
        next_position = next_position + 1
    return torch.stack(out, dim=1)
