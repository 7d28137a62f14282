"""Qwen3-VL: vision encoder + text decoder + LM head, with every optimization routed through a plan.

The model holds one runtime object per plan axis (``model.attention``, ``model.rope``,
``model.kv_cache``, ``model.memory``, ``model.quant``, ``model.vision``, ``model.execution``; see
``qwen3_vl/optim/registry.py`` for what each provides). ``model.visual`` is the ViT module itself.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3_vl.config import Qwen3VLConfig
from qwen3_vl.model.layers import Linear
from qwen3_vl.model.positions import InputError, mrope_positions
from qwen3_vl.model.text import AttentionMask, TextModel
from qwen3_vl.model.vision import VisionEncoder
from qwen3_vl.optim.plan import Fallback, Plan, Target, resolve
from qwen3_vl.optim.registry import AXES, get


class Qwen3VL(nn.Module):
    def __init__(self, config: Qwen3VLConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionEncoder(config.vision)
        self.language_model = TextModel(config.text)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()
        self.compute_dtype = torch.float32
        self.device = torch.device("cpu")
        self.requested_plan: Plan | None = None
        self.plan: Plan | None = None
        self.fallbacks: list[Fallback] = []
        self.target: Target | None = None
        # Called with the logits of every decoder step (prefill and each decode step, whoever runs
        # it: ``step`` or an execution option replaying a captured step); the harness listens here.
        self.step_observers: list = []

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    # ------------------------------------------------------------------------------------------
    # Plans

    def apply_plan(self, plan: Plan, target: Target) -> None:
        """Resolve ``plan`` for ``target`` (recording fallbacks) and build every axis's runtime.

        Weight-changing axes go first (quant rewrites storage, memory places it), then the rest.
        """
        resolved, fallbacks = resolve(plan, target)
        self.requested_plan, self.plan, self.fallbacks, self.target = plan, resolved, fallbacks, target
        self.device = torch.device(target.device)
        order = ["quant", "memory"] + [a for a in AXES if a not in ("quant", "memory")]
        for axis in order:
            choice = resolved[axis]
            setattr(self, axis, get(axis, choice.name).build(self, target, **choice.kwargs))

    def plan_report(self) -> str:
        """What was asked, what runs, and why anything differs."""
        lines = [f"requested: {self.requested_plan}", f"running:   {self.plan}"]
        if self.fallbacks:
            lines += ["fallbacks:"] + [f"  {fb}" for fb in self.fallbacks]
        else:
            lines.append("fallbacks: none")
        return "\n".join(lines)

    def new_cache(self, batch: int, max_tokens: int):
        return self.execution.new_cache(self, batch, max_tokens)

    # ------------------------------------------------------------------------------------------
    # Forward pieces

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Token embeddings with vision tokens scattered in; the visual mask and DeepStack features."""
        ids = input_ids.to(self.device)
        embeds = self.language_model.embed_tokens(ids).to(self.compute_dtype)
        masks, features = [], []
        for _, pixels, grid, mask in visual_inputs(self.config, ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                   video_grid_thw):
            tokens, deepstack = self.vision.encode(self, pixels, grid)
            embeds[mask] = tokens.to(embeds.dtype)
            masks.append(mask)
            features.append(deepstack)
        self.vision.after_embed(self, ids)
        if not masks:
            return embeds, None, None
        if len(masks) == 1:
            return embeds, masks[0], features[0]
        # Images and videos together: DeepStack rows in sequence order.
        visual = masks[0] | masks[1]
        is_image = masks[0][visual]
        joint = []
        for img, vid in zip(*features, strict=True):
            rows = img.new_zeros(int(visual.sum()), img.shape[-1])
            rows[is_image], rows[~is_image] = img, vid
            joint.append(rows)
        return embeds, visual, joint

    def step(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
        logits_to_keep: int = 0,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Run the decoder on ``embeds`` at 3D ``positions``; logits for the last ``logits_to_keep``
        positions (all when 0). With a cache, the new tokens are appended to it. ``hidden_only``:
        return the final-normed hidden states instead (for an execution that chooses greedy tokens
        from them itself); the step observers that need logits still get them computed."""
        if visual_mask is not None:  # a pruning vision option may drop visual rows here
            embeds, positions, attention_mask, visual_mask, deepstack = self.vision.before_llm(
                self, embeds, positions, attention_mask, visual_mask, deepstack
            )
        new_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            new_mask = attention_mask.to(self.device).bool()
        cos, sin = self.rope.text(positions.to(self.device), embeds.dtype)
        mask = AttentionMask(new_mask, causal=True)
        if cache is not None:
            cache.start_step(new_mask, embeds.shape[1])
        hook = self.vision.layer_hook if visual_mask is not None else None
        hidden = self.language_model(
            embeds, cos[:, None], sin[:, None], mask, cache, self.attention, visual_mask, deepstack, hook
        )
        if cache is not None:
            cache.end_step()
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = None
        if not hidden_only or any(getattr(o, "needs_logits", True) for o in self.step_observers):
            logits = self.lm_head(hidden)
        for observer in self.step_observers:
            observer(logits)
        return hidden if hidden_only else logits

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] with the input conventions of transformers' Qwen3-VL."""
        check_prompt(input_ids, attention_mask, self.config)
        embeds, visual_mask, deepstack = self.embed(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        positions, _ = mrope_positions(input_ids, self.config, attention_mask, image_grid_thw, video_grid_thw)
        return self.step(embeds, positions, attention_mask, None, visual_mask, deepstack, logits_to_keep)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Prompt followed by generated tokens, [batch, prompt + new]; see ``qwen3_vl.generate``."""
        from qwen3_vl.generate import generate

        return generate(self, input_ids, **kwargs)

    def load_state_dict_from_hf(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights given in the Hugging Face key layout (validated first; nothing half-loaded)."""
        from qwen3_vl.checkpoint import load_hf_state_dict

        load_hf_state_dict(self, state_dict)


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: Qwen3VLConfig) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise InputError("input_ids must be a [batch, seq] integer tensor")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be integers, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids is empty")
    if input_ids.shape[1] > config.text.max_position_embeddings:
        raise InputError(
            f"prompt of {input_ids.shape[1]} tokens is longer than the context "
            f"({config.text.max_position_embeddings} tokens)"
        )
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= config.text.vocab_size:
        raise InputError(f"input_ids outside the vocabulary [0, {config.text.vocab_size})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask.bool().any(dim=1).all()):
        raise InputError("attention_mask has a row with no real token")


def visual_inputs(
    config: Qwen3VLConfig,
    ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    pixel_values_videos: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(kind, pixels, grid, placeholder mask of ids)`` for the images, then the videos, of a prompt,
    checked against each other before any vision tower runs (so a bad request costs nothing and caches nothing)."""
    out = []
    for kind, pixels, grid, token in (
        ("image", pixel_values, image_grid_thw, config.image_token_id),
        ("video", pixel_values_videos, video_grid_thw, config.video_token_id),
    ):
        mask = ids == token
        if pixels is None:
            if grid is not None:
                raise InputError(f"{kind}_grid_thw given without the {kind} pixel values")
            if mask.any():
                raise InputError(f"the prompt has {int(mask.sum())} {kind} placeholder tokens but no {kind} given")
            continue
        if grid is None:
            raise InputError(f"{kind} pixel values given without {kind}_grid_thw")
        check_grid(kind, pixels, grid, config)
        expected = int(grid.prod(-1).sum()) // config.vision.spatial_merge_size**2
        if int(mask.sum()) != expected:
            raise InputError(
                f"{kind} token count does not match the {kind} grid: the prompt has {int(mask.sum())} "
                f"placeholder tokens, the grid gives {expected} features"
            )
        out.append((kind, pixels, grid, mask))
    return out


def check_grid(kind: str, pixels: torch.Tensor, grid: torch.Tensor, config: Qwen3VLConfig) -> None:
    v = config.vision
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise InputError(f"{kind}_grid_thw must be [n, 3], got {tuple(grid.shape)}")
    if grid.shape[0] == 0:
        raise InputError(f"{kind}_grid_thw has no rows; pass None when there is no {kind}")
    if bool((grid <= 0).any()):
        raise InputError(f"{kind}_grid_thw has a zero or negative size: {grid.tolist()}")
    if bool((grid[:, 1:] % v.spatial_merge_size != 0).any()):
        raise InputError(f"{kind}_grid_thw heights/widths must be multiples of {v.spatial_merge_size}")
    rows = int(grid.prod(-1).sum())
    if pixels.ndim != 2 or pixels.shape != (rows, v.patch_dim):
        raise InputError(
            f"{kind} pixel values have shape {tuple(pixels.shape)}, the grid needs [{rows}, {v.patch_dim}]"
        )
