"""Visual token pruning before the decoder (VisionZip / DivPrune style).

Each image (each temporal slice of a video) keeps the top ``ratio`` of its merged tokens, chosen
by one of two methods:

- ``attention`` (VisionZip's dominant tokens): the attention a token's 2x2 patches receive in the
  ViT's last block, averaged over heads and over the image's queries (Qwen3-VL has no CLS token).
- ``diversity`` (DivPrune): a max-min diverse subset of the merged tokens under cosine distance,
  greedy farthest-point selection started from the most isolated token.

With ``merge=true`` every dropped token is averaged into its most similar kept token of the same
image (embedding and every DeepStack level alike; a ToMe-style stand-in for VisionZip's
contextual tokens, which would need positions of their own). Kept tokens keep their 3D positions
and DeepStack rows are pruned with the same indices. Approximate.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from qwen3_vl.optim.plan import Optimization
from qwen3_vl.optim.vision.full import FullVision
from qwen3_vl.optim.vision.pruning import check_ratio, keep_count, keep_indices, take

METHODS = ("attention", "diversity")


def received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """[S]: attention each patch receives within its segment (mean over heads and queries).

    q, k: [S, H, d]. Queries go in chunks so the probabilities never exceed ~64 MiB at once.
    """
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        n, heads = end - start, q.shape[1]
        ks = k[start:end].transpose(0, 1)  # [H, n, d]
        total = torch.zeros(n, dtype=torch.float32, device=q.device)
        chunk = max(1, (1 << 24) // (heads * n))
        for c in range(start, end, chunk):
            qs = q[c : min(c + chunk, end)].transpose(0, 1)  # [H, c, d]
            probs = (qs @ ks.transpose(-1, -2) * scale).float().softmax(-1)
            total += probs.sum(dim=(0, 1))
        out[start:end] = total / (heads * n)
    return out


class _RecordLastBlock:
    """The model's attention for the ViT that also records ``received_attention`` at the last block."""

    def __init__(self, inner, depth: int) -> None:
        self.inner, self.depth, self.calls, self.received = inner, depth, 0, None

    def vision(self, q, k, v, cu_seqlens, scale):
        self.calls += 1
        if self.calls == self.depth:
            self.received = received_attention(q, k, cu_seqlens, scale)
        return self.inner.vision(q, k, v, cu_seqlens, scale)


def diverse_subset(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` [n, D] that greedily maximise the minimum cosine distance."""
    unit = F.normalize(features.float(), dim=-1)
    dist = 1.0 - unit @ unit.T
    isolation = dist.clone().fill_diagonal_(float("inf")).min(dim=1).values
    chosen = [int(isolation.argmax())]
    nearest = dist[chosen[0]].clone()
    for _ in range(k - 1):
        nearest[chosen] = float("-inf")
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, dist[chosen[-1]])
    return torch.tensor(sorted(chosen), device=features.device)


class PrunePre(FullVision):
    name = "prune_pre"

    def __init__(self, ratio: float, method: str, merge: bool) -> None:
        if method not in METHODS:
            raise ValueError(f"prune_pre: method must be one of {', '.join(METHODS)}, got {method!r}")
        self.ratio, self.method, self.merge = check_ratio("prune_pre", ratio), method, bool(merge)
        # The last pruned prompt: visual tokens kept per row, and the original position of every
        # position the decoder saw ([B, L'], -1 where a shorter row was left-filled).
        self.kept: list[int] | None = None
        self.index: torch.Tensor | None = None
        # One record per encode since the last embed: (grid, per-token scores or None).
        self._records: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # The last embedded prompt's visual rows (row-major): which image / video frame each belongs
        # to, and its score; consumed by that prompt's step.
        self._units: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def encode(self, model, pixel_values, grid_thw):
        del self._records[:-1]  # a prompt has at most two visual kinds: older records are never used
        if self.method != "attention" or self.ratio >= 1.0:
            tokens, deepstack = super().encode(model, pixel_values, grid_thw)
            self._records.append((grid_thw.cpu(), None))
            return tokens, deepstack
        recorder = _RecordLastBlock(model.attention, len(model.visual.blocks))
        tokens, deepstack = model.visual(pixel_values.to(model.device), grid_thw, recorder, model.rope)
        merge = model.config.vision.spatial_merge_size ** 2
        self._records.append((grid_thw.cpu(), recorder.received.view(-1, merge).mean(1)))
        return tokens, deepstack

    def after_embed(self, model, input_ids) -> None:
        records, self._records, self._units = self._records, [], None
        config = model.config
        kinds = [t for t in (config.image_token_id, config.video_token_id) if bool((input_ids == t).any())]
        if not kinds:
            return
        records = records[max(0, len(records) - len(kinds)):]  # older ones: an embed that failed mid-way
        visual_ids = input_ids[(input_ids == config.image_token_id) | (input_ids == config.video_token_id)]
        unit = torch.empty(visual_ids.shape[0], dtype=torch.long)
        score = torch.zeros(visual_ids.shape[0], dtype=torch.float32)
        units, merge = 0, config.vision.spatial_merge_size ** 2
        for token, (grid, scores) in zip(kinds, records, strict=True):
            sizes = torch.tensor([h * w // merge for t, h, w in grid.tolist() for _ in range(t)])
            rows = (visual_ids == token).cpu()
            unit[rows] = torch.repeat_interleave(torch.arange(len(sizes)) + units, sizes)
            if scores is not None:
                score[rows] = scores.cpu()
            units += len(sizes)
        self._units = (unit, score, units)

    def before_llm(self, model, embeds, positions, attention_mask, visual_mask, deepstack):
        prompt, self._units = self._units, None
        if self.ratio >= 1.0:
            return embeds, positions, attention_mask, visual_mask, deepstack
        n = int(visual_mask.sum())
        if prompt is None or prompt[0].shape[0] != n:
            raise RuntimeError("prune_pre: a step's visual tokens must be those of the last embedded prompt, whole")
        device = embeds.device
        # position ids are built on the host; everything indexed with ``index`` must sit on its device
        positions, visual_mask = positions.to(device), visual_mask.to(device)
        unit, score, units = prompt[0].to(device), prompt[1].to(device), prompt[2]
        features = embeds[visual_mask]
        keep = torch.zeros(n, dtype=torch.bool, device=device)
        target = torch.arange(n, device=device)  # the kept row each row is merged into
        normed = F.normalize(features.float(), dim=-1) if self.merge else None
        for u in range(units):
            rows = (unit == u).nonzero()[:, 0]
            k = keep_count(len(rows), self.ratio)
            if self.method == "attention":
                chosen = rows[score[rows].topk(k).indices]
            else:
                chosen = rows[diverse_subset(features[rows], k)]
            keep[chosen] = True
            if self.merge:
                dropped = rows[~keep[rows]]
                if len(dropped):
                    sim = normed[dropped] @ normed[chosen].T
                    target[dropped] = chosen[sim.argmax(dim=1)]

        keep_seq = ~visual_mask
        keep_seq[visual_mask] = keep
        if self.merge:
            embeds = embeds.clone()
            embeds[visual_mask] = _average_into(features, target)
            deepstack = [_average_into(d, target) for d in deepstack]
        # Rows that keep fewer tokens (images of different sizes) are left-filled and masked like padding.
        index, filler = keep_indices(keep_seq)
        valid = ~filler if attention_mask is None else take(attention_mask.to(device).bool(), index, 1) & ~filler
        self.kept = (keep_seq & visual_mask).sum(1).tolist()
        self.index = index.masked_fill(filler, -1)
        embeds = take(embeds, index, 1)
        positions = take(positions, index, 2, batch_dim=1)
        visual_mask = take(visual_mask, index, 1) & ~filler
        deepstack = [d[keep] for d in deepstack]
        return embeds, positions, None if bool(valid.all()) else valid.long(), visual_mask, deepstack


def _average_into(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row ``t`` becomes the mean of every row whose target is ``t`` (itself included for kept rows)."""
    sums = torch.zeros_like(x, dtype=torch.float32).index_add_(0, target, x.float())
    counts = torch.zeros(x.shape[0], device=x.device).index_add_(0, target, torch.ones(x.shape[0], device=x.device))
    return (sums / counts.clamp(min=1)[:, None]).to(x.dtype)


def _build(model, target, ratio: float = 0.5, method: str = "attention", merge: bool = False) -> PrunePre:
    return PrunePre(ratio, method, merge)


OPTION = Optimization(
    name="prune_pre",
    axis="vision",
    exact=False,
    summary="Prune visual tokens before the decoder: keep each image's top ratio by ViT attention "
    "(VisionZip) or diversity (DivPrune), optionally merging the rest into their nearest kept token.",
    build=_build,
    # Worst case measured over ratios 0.5/0.25/0.125 and both methods, merged or not, on seeded random
    # weights, plus margin: tiny preset (tests/optim/vision/test_pruning.py, 3 prompts, 24-token image)
    # worst logits_rel 1.62, kl 0.84, top-1 0.0; mini preset (suites/vision_pruning.py, 196-token image,
    # attention method) worst 0.97, 0.36, 0.0. On random weights dropping visual tokens before layer 0
    # moves the text logits a lot; this says nothing of quality: re-declare from a real checkpoint.
    error_budget={"logits_rel": 2.0, "kl": 1.0, "top1_agreement": 0.0},
    defaults={"ratio": 0.5, "method": "attention", "merge": False},
    variants=({"ratio": 0.5}, {"ratio": 0.25}, {"ratio": 0.125}),
)
