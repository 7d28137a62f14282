"""Full vision extraction: the vision tower runs on every request that carries pixels. The reference."""

from __future__ import annotations

from qwen3_vl.optim.plan import Optimization


class FullVision:
    name = "full"

    def encode(self, model, pixel_values, grid_thw):
        return model.visual(pixel_values, grid_thw, model.attention, model.rope)


OPTION = Optimization(
    name="full",
    axis="vision",
    exact=True,
    reference=True,
    summary="Reference vision path: run the ViT for every image and video, no caching or pruning.",
    build=lambda model, target: FullVision(),
)
