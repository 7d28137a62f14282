"""Multi-turn conversations: one sequence's KV cache and rope state kept between turns.

A ``Session`` is given the *whole* conversation at every turn (all token ids and all images and
videos so far, as a chat server receives them). When the model's vision runtime reuses prefixes
(``vision=conditional``) and the conversation extends the one the session holds (same leading
tokens, same images), only the new suffix is prefilled: its 3D positions continue from the rope
state and only its own images are encoded. Otherwise (``vision=full``, the reference, or a
conversation that rewrote its history) the whole conversation is recomputed from scratch, exactly
as ``model.generate`` would.

Reusing a prefix is exact in the team's sense (fp32 relative error ~1e-6, same greedy tokens) but
not bitwise: the suffix's matrix products run with fewer rows than a one-shot prefill, and BLAS
sums in an order that depends on the row count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from qwen3_vl.generate import sample_next
from qwen3_vl.model.positions import InputError, mrope_positions
from qwen3_vl.model.qwen3_vl import check_prompt
from qwen3_vl.optim.vision.conditional import content_key


@dataclass(frozen=True)
class Visual:
    """One image or video of a conversation: its pixel rows, grid, placeholder count and content key."""

    pixels: torch.Tensor
    grid: torch.Tensor  # [1, 3]
    tokens: int
    key: str


def split_visuals(pixels: torch.Tensor | None, grid_thw: torch.Tensor | None, merge: int, keyed: bool) -> list[Visual]:
    """Per-image (or per-video) pieces of a request's concatenated pixel rows (content keys when ``keyed``)."""
    if pixels is None or grid_thw is None:
        return []
    out, start = [], 0
    for row in grid_thw.cpu():
        rows = int(row.prod())
        piece, grid = pixels[start : start + rows], row[None]
        key = content_key(piece, grid, piece.dtype)[0] if keyed else ""
        out.append(Visual(piece, grid, rows // merge**2, key))
        start += rows
    return out


def _join(visuals: list[Visual]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not visuals:
        return None, None
    return torch.cat([v.pixels for v in visuals]), torch.cat([v.grid for v in visuals])


def _prefix_count(held: list[Visual], given: list[Visual], placeholders: int) -> int | None:
    """How many of ``given`` lie in a held prefix with ``placeholders`` visual tokens; None when the
    held visuals differ or the prefix ends inside one."""
    count, tokens = 0, 0
    while tokens < placeholders:
        if count >= len(given) or count >= len(held) or given[count].key != held[count].key:
            return None
        tokens += given[count].tokens
        count += 1
    return count if tokens == placeholders else None


class Session:
    """One conversation (batch of one) on ``model``; ``max_tokens`` bounds its KV cache."""

    def __init__(self, model, max_tokens: int = 8192) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.ids: list[int] = []  # tokens whose K/V are in the cache
        self.images: list[Visual] = []
        self.videos: list[Visual] = []
        self.next_position = 0  # 3D rope state: every axis of the next token's position
        self.last_prefill = {"reused": 0, "prefilled": 0}

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bring the cache up to the conversation ``input_ids`` ([1, L]); logits [1, vocab] of its last token."""
        model, config = self.model, self.model.config
        ids = input_ids.reshape(1, -1) if input_ids.ndim == 1 else input_ids
        check_prompt(ids, None, config)
        if ids.shape[0] != 1:
            raise InputError(f"a Session holds one conversation; input_ids has {ids.shape[0]} rows")
        if ids.shape[1] > self.max_tokens:
            raise InputError(f"conversation of {ids.shape[1]} tokens exceeds the session's {self.max_tokens}")
        merge = config.vision.spatial_merge_size
        keyed = model.vision.reuses_prefix  # only a session that may reuse needs to compare images
        images = split_visuals(pixel_values, image_grid_thw, merge, keyed)
        videos = split_visuals(pixel_values_videos, video_grid_thw, merge, keyed)
        tokens = ids[0].tolist()

        held = len(self.ids)
        reuse = (model.vision.reuses_prefix and self.cache is not None and held < len(tokens)
                 and tokens[:held] == self.ids)
        if reuse:
            prefix = ids[0, :held].cpu()
            n_img = _prefix_count(self.images, images, int((prefix == config.image_token_id).sum()))
            n_vid = _prefix_count(self.videos, videos, int((prefix == config.video_token_id).sum()))
            reuse = n_img is not None and n_vid is not None
        if not reuse:
            self.reset()
            held, n_img, n_vid = 0, 0, 0
            self.cache = model.new_cache(1, self.max_tokens)

        suffix = ids[:, held:]
        pix, grid = _join(images[n_img:])
        vpix, vgrid = _join(videos[n_vid:])
        embeds, visual_mask, deepstack = model.embed(suffix, pix, grid, vpix, vgrid)
        positions, _ = mrope_positions(suffix, config, None, grid, vgrid)
        positions = positions + self.next_position
        try:
            logits = model.step(embeds, positions, None, self.cache, visual_mask, deepstack, logits_to_keep=1)
        except BaseException:
            self.reset()  # some layers may have appended to the cache: start over next time
            raise
        self.ids, self.images, self.videos = tokens, images, videos
        self.next_position = int(positions.max()) + 1  # pruning keeps positions: the unpruned maximum
        self.last_prefill = {"reused": held, "prefilled": suffix.shape[1]}
        return logits[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Iterable[int] | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The next turn's tokens [n] after the conversation ``input_ids`` (greedy unless ``do_sample``).

        The caller appends them (and the next user turn) to the conversation it passes next time.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        length = input_ids.shape[-1]
        if length + max_new_tokens > min(self.max_tokens, self.model.config.text.max_position_embeddings):
            raise InputError(f"conversation ({length}) + max_new_tokens ({max_new_tokens}) exceeds the session")
        config, device = self.model.config, self.model.device
        eos = list(config.eos_token_ids) if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        )
        generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None
        logits = self.prefill(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        out: list[int] = []
        for step in range(max_new_tokens):
            token = sample_next(logits.float(), do_sample, temperature, top_k, top_p, generator)
            out.append(int(token))
            if int(token) in eos or step == max_new_tokens - 1:
                break
            embeds = self.model.language_model.embed_tokens(token[:, None].to(device)).to(self.model.compute_dtype)
            position = torch.full((3, 1, 1), self.next_position, device=device)
            try:
                logits = self.model.step(embeds, position, None, self.cache)[:, -1]
            except BaseException:
                self.reset()
                raise
            self.ids.append(int(token))
            self.next_position += 1
        return torch.tensor(out, dtype=torch.long)
