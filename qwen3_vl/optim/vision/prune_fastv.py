"""FastV: drop the visual tokens the prompt's last token pays least attention to, inside the decoder.

Layers ``0 .. K-1`` run on the whole prompt. Before layer ``K`` the attention that the last prompt
token gives each key in layer ``K-1`` (mean over heads) ranks the visual tokens; the top
``ratio`` of them per row are kept and every other visual token is dropped from the hidden
states, the 3D positions, the visual mask and the DeepStack features, so layers ``K..`` (and
their KV cache) hold only the kept tokens. Approximate (Chen et al., 2024, "An Image is Worth
1/2 Tokens After Layer 2").

The ranking attention is recomputed from layer ``K-1``'s normalised input (its q for the last
token, its k for the step's tokens), so it works with every attention backend. It is computed in a
one-shot forward hook on that layer's attention module, i.e. while the layer runs, so weights that
are streamed in per layer (``memory=offload_*``) are in place. In a step that follows cached
tokens (a later conversation turn), only the step's own keys enter the softmax.
Limits: layers then hold different numbers of tokens, which only ``kv_cache=dynamic`` supports;
padded batches are refused (one conversation per row, unpadded, or use ``prune_pre``).
"""

from __future__ import annotations

import torch

from qwen3_vl.model.layers import apply_rotary
from qwen3_vl.model.positions import InputError
from qwen3_vl.optim.plan import Optimization, PlanError
from qwen3_vl.optim.vision.full import FullVision
from qwen3_vl.optim.vision.pruning import (
    check_ratio,
    keep_count,
    keep_indices,
    kept_visual_rows,
    same_count_per_row,
    take,
)

RAGGED_CACHES = ("dynamic",)  # caches whose layers may hold different numbers of tokens


def last_token_attention(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[B, L]: attention the last token gives each token in the attention module ``attn`` whose
    (normalised) input is ``h`` (softmax in fp32, mean over heads)."""
    b, n, _ = h.shape
    d, groups = attn.head_dim, attn.num_heads // attn.num_kv_heads
    # through ``project``: execution options fuse q/k/v into one matmul (no q_proj/k_proj then)
    q = attn.q_norm(attn.project(h[:, -1:])[0].view(b, 1, -1, d)).transpose(1, 2)  # [B, Hq, 1, d]
    k = attn.k_norm(attn.project(h)[1].view(b, n, -1, d)).transpose(1, 2)  # [B, Hkv, n, d]
    q = apply_rotary(q, cos[:, :, -1:], sin[:, :, -1:])
    k = apply_rotary(k, cos, sin)
    scores = q.view(b, attn.num_kv_heads, groups, d) @ k.transpose(-1, -2) * d**-0.5  # [B, Hkv, g, n]
    return scores.float().softmax(-1).mean(dim=(1, 2))


class FastV(FullVision):
    name = "prune_fastv"

    def __init__(self, layer: int, ratio: float, num_layers: int) -> None:
        if not 1 <= layer < num_layers:
            raise ValueError(f"prune_fastv: layer K must be in [1, {num_layers - 1}], got {layer}")
        self.layer, self.ratio = int(layer), check_ratio("prune_fastv", ratio)
        # The last pruned prefill: visual tokens kept per row, and the original position of every
        # position layers K.. saw ([B, L']).
        self.kept: list[int] | None = None
        self.index: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._capture = None  # the one-shot hook handle on layer K-1's attention
        # At ratio 1 nothing is dropped: no hook at all, so the computation is exactly full's.
        self.layer_hook = self.prune if self.ratio < 1.0 else None

    def prune(self, text_model, index, x, cos, sin, mask, visual_mask, deepstack):
        if index == self.layer - 1:
            if mask.key_valid is not None:
                raise InputError("prune_fastv does not support padded batches; run the rows separately")
            self._arm(text_model.layers[index].self_attn)
        elif index == self.layer:
            scores, self._scores = self._scores, None
            if scores is None:
                raise RuntimeError(f"prune_fastv: layer {self.layer - 1}'s attention did not run through its module")
            n = same_count_per_row("prune_fastv", visual_mask.sum(1))
            k = keep_count(n, self.ratio)
            top = scores.masked_fill(~visual_mask, float("-inf")).topk(k, dim=1).indices
            index_kept, _ = keep_indices((~visual_mask).scatter(1, top, True))  # equal counts: no filler
            rows = kept_visual_rows(visual_mask, index_kept)
            x, cos, sin = take(x, index_kept, 1), take(cos, index_kept, 2), take(sin, index_kept, 2)
            visual_mask = take(visual_mask, index_kept, 1)
            deepstack = [d[rows] for d in deepstack] if deepstack else deepstack
            self.kept, self.index = [k] * x.shape[0], index_kept
        return x, cos, sin, visual_mask, deepstack

    def _arm(self, attn) -> None:
        if self._capture is not None:  # left over from a step that failed before the layer ran
            self._capture.remove()

        def capture(module, args, output):
            self._capture.remove()
            self._capture = None
            h, cos, sin = args[:3]
            self._scores = last_token_attention(module, h, cos, sin)

        self._scores = None
        self._capture = attn.register_forward_hook(capture)


def _build(model, target, layer: int = 2, ratio: float = 0.5) -> FastV:
    cache = getattr(model.kv_cache, "name", None)
    if float(ratio) < 1.0 and cache not in RAGGED_CACHES:
        raise PlanError(
            f"vision=prune_fastv leaves later layers with fewer cached tokens, which kv_cache={cache} "
            f"cannot hold; use kv_cache={' or '.join(RAGGED_CACHES)}"
        )
    return FastV(layer, ratio, model.config.text.num_hidden_layers)


OPTION = Optimization(
    name="prune_fastv",
    axis="vision",
    exact=False,
    summary="FastV: after layer K keep the top ratio of visual tokens by the last token's attention.",
    build=_build,
    # Worst case measured over ratios 0.5/0.25/0.125 on seeded random weights, plus margin: tiny preset
    # (tests/optim/vision/test_pruning.py, 3 prompts, 24-token image) worst logits_rel 0.61, kl 0.091,
    # top-1 0.24; mini preset (suites/vision_pruning.py, 196-token image) worst 0.59, 0.136, top-1 0.0
    # over the 17 text positions after the image. Random weights say nothing of quality: re-declare
    # from a real checkpoint on a VQA subset.
    error_budget={"logits_rel": 0.8, "kl": 0.2, "top1_agreement": 0.0},
    # Declared so the matrix never offers the combinations _build refuses.
    needs=("kv_cache=" + "|".join(RAGGED_CACHES),),
    defaults={"layer": 2, "ratio": 0.5},
    variants=({"ratio": 0.5}, {"ratio": 0.25}, {"ratio": 0.125}),
)
