"""Full vision extraction: the vision tower runs on every request that carries pixels. The reference.

``FullVision`` also defines the vision runtime protocol's defaults; the other vision options
subclass it and override only what they change:

- ``encode(model, pixel_values, grid_thw) -> (tokens, deepstack)``: pixels may be on any device.
- ``after_embed(model, input_ids)``: called by ``Qwen3VL.embed`` once its encodes are done, so a
  runtime can tie what it recorded to this prompt's visual tokens; nothing here.
- ``before_llm(model, embeds, positions, attention_mask, visual_mask, deepstack)``: called by
  ``Qwen3VL.step`` for a step that carries visual tokens (those of the last embedded prompt); may
  drop visual rows (all five outputs stay aligned, kept rows keep their positions); identity here.
- ``layer_hook``: None, or ``hook(text_model, index, x, cos, sin, mask, visual_mask, deepstack)
  -> (x, cos, sin, visual_mask, deepstack)`` called before every decoder layer of a step that
  carries visual tokens; it may drop rows from everything aligned with ``x``.
- ``reuses_prefix``: whether a ``qwen3_vl.session.Session`` may keep the KV of an unchanged
  conversation prefix (False: every turn recomputes the whole conversation, the reference).
"""

from __future__ import annotations

import torch

from qwen3_vl.optim.plan import Optimization


class FullVision:
    name = "full"
    reuses_prefix = False
    layer_hook = None

    def encode(self, model, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        return model.visual(pixel_values.to(model.device), grid_thw, model.attention, model.rope)

    def after_embed(self, model, input_ids) -> None:
        pass

    def before_llm(self, model, embeds, positions, attention_mask, visual_mask, deepstack):
        return embeds, positions, attention_mask, visual_mask, deepstack


OPTION = Optimization(
    name="full",
    axis="vision",
    exact=True,
    reference=True,
    summary="Reference vision path: run the ViT for every image and video, no caching or pruning.",
    build=lambda model, target: FullVision(),
)
