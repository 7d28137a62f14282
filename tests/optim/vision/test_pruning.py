"""Visual token pruning: ratio 1 is full, the kept tokens are the right ones and reach the decoder
consistently (embeddings, 3D positions, DeepStack rows, KV cache), and the measured error stays
within the declared budget (seeded random weights: an error measurement, not a quality benchmark)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.workload import PromptSpec, RowSpec, build_prompt
from qwen3_vl.model.positions import mrope_positions
from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim import get
from qwen3_vl.optim.vision.prune_pre import _average_into
from qwen3_vl.optim.vision.pruning import keep_indices, kept_visual_rows, take
from qwen3_vl.session import Session
from suites.vision import pruning_error
from tests.model.prompts import image_prompt, left_pad, relative_error, video_prompt

from .conftest import build, last_logits

PRUNERS = ["prune_fastv", "prune_pre", "prune_pre[method=diversity]", "prune_pre[merge=true]"]
GRIDS = [(1, 8, 12), (1, 4, 6)]  # 24 + 6 visual tokens


def _with_ratio(option: str, ratio: float) -> str:
    name, _, params = option.partition("[")
    return f"vision={name}[ratio={ratio}" + (";" + params if params else "]")


@pytest.mark.parametrize("option", PRUNERS)
def test_keep_ratio_one_is_full(full, option):
    model = build(_with_ratio(option, 1.0))
    ids, pixels, grid = image_prompt(full.config, GRIDS, seed=1)
    assert torch.equal(model(ids, pixel_values=pixels, image_grid_thw=grid),
                       full(ids, pixel_values=pixels, image_grid_thw=grid))
    kw = dict(pixel_values=pixels, image_grid_thw=grid, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(model.generate(ids, **kw), full.generate(ids, **kw))


def _inputs(model, ids, pixels, grid):
    embeds, visual_mask, deepstack = model.embed(ids, pixels, grid)
    positions, _ = mrope_positions(ids, model.config, None, grid)
    return embeds, positions, visual_mask, deepstack


@pytest.mark.parametrize("method", ["attention", "diversity"])
def test_prune_pre_equals_the_decoder_on_the_kept_tokens(full, method):
    """Same logits as running the reference decoder on the kept rows, selected with plain boolean masks."""
    model = build(f"vision=prune_pre[ratio=0.25;method={method}]")
    ids, pixels, grid = image_prompt(full.config, GRIDS, seed=2)
    out = model(ids, pixel_values=pixels, image_grid_thw=grid)
    keep = torch.zeros(ids.shape[1], dtype=torch.bool)
    keep[model.vision.index[0]] = True
    with torch.inference_mode():
        embeds, positions, visual_mask, deepstack = _inputs(full, ids, pixels, grid)
        kept_visual = keep[visual_mask[0]]
        ref = full.step(embeds[:, keep], positions[:, :, keep], None, None, visual_mask[:, keep],
                        [d[kept_visual] for d in deepstack])
    assert torch.equal(out, ref)


def _attention_capture(model, layer: int):
    """Wrap the model's attention to keep (q, k) of decoder layer ``layer`` (its call index)."""
    seen, text = {}, model.attention.text

    def capture(q, k, v, mask, scale):
        seen.setdefault("calls", 0)
        if seen["calls"] == layer:
            seen["q"], seen["k"], seen["scale"] = q, k, scale
        seen["calls"] += 1
        return text(q, k, v, mask, scale)

    model.attention.text = capture
    return seen


def test_fastv_keeps_the_tokens_the_last_token_attends_to_most_and_prunes_consistently(full):
    layer, ratio = 2, 0.25
    model = build(f"vision=prune_fastv[layer={layer};ratio={ratio}]")
    ids, pixels, grid = image_prompt(full.config, GRIDS, seed=3)
    seen = _attention_capture(model, layer - 1)
    out = model(ids, pixel_values=pixels, image_grid_thw=grid)
    index = model.vision.index[0]

    # Which tokens: the top ceil(ratio * 30) visual tokens by layer K-1's last-query attention.
    q, k = seen["q"][:, :, -1:], seen["k"].repeat_interleave(seen["q"].shape[1] // seen["k"].shape[1], dim=1)
    received = (q @ k.transpose(-1, -2) * seen["scale"]).float().softmax(-1).mean(dim=(1, 2))[0]
    visual = (ids[0] == full.config.image_token_id)
    top = received.masked_fill(~visual, -1).topk(math.ceil(ratio * 30)).indices
    keep = ~visual
    keep[top] = True
    assert torch.equal(index, keep.nonzero()[:, 0])

    # How: the reference decoder with rows dropped by boolean masks before layer K.
    with torch.inference_mode():
        embeds, positions, visual_mask, deepstack = _inputs(full, ids, pixels, grid)
        cos, sin = full.rope.text(positions, embeds.dtype)
        cos, sin, x = cos[:, None], sin[:, None], embeds
        for i, block in enumerate(full.language_model.layers):
            if i == layer:
                kept_visual = keep[visual_mask[0]]
                x, cos, sin = x[:, keep], cos[:, :, keep], sin[:, :, keep]
                deepstack = [d[kept_visual] for d in deepstack]
                visual_mask = visual_mask[:, keep]
            x = block(x, cos, sin, AttentionMask(None, True), None, full.attention)
            if i < len(deepstack):
                x = x.clone()
                x[visual_mask] = x[visual_mask] + deepstack[i]
        ref = full.lm_head(full.language_model.norm(x))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
def test_retained_token_counts_in_logits_and_kv_cache(full, ratio):
    ids, pixels, grid = image_prompt(full.config, GRIDS, seed=4)
    length, steps = ids.shape[1], 3
    kw = dict(pixel_values=pixels, image_grid_thw=grid, max_new_tokens=steps, eos_token_id=[])

    pre = build(f"vision=prune_pre[ratio={ratio}]")
    kept = math.ceil(ratio * 24) + math.ceil(ratio * 6)  # per image
    assert pre(ids, pixel_values=pixels, image_grid_thw=grid).shape[1] == length - 30 + kept
    assert pre.vision.kept == [kept]
    cache = _generate_cache(pre, ids, kw)
    assert {k.shape[2] for k in cache.keys} == {length - 30 + kept + steps - 1}

    fastv = build(f"vision=prune_fastv[ratio={ratio}]")
    kept = math.ceil(ratio * 30)  # over the row's visual tokens
    assert fastv(ids, pixel_values=pixels, image_grid_thw=grid).shape[1] == length - 30 + kept
    cache = _generate_cache(fastv, ids, kw)
    assert [k.shape[2] for k in cache.keys] == [length + steps - 1] * 2 + [length - 30 + kept + steps - 1] * 2


def _generate_cache(model, ids, kw):
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda *a: caches.append(new_cache(*a)) or caches[-1]
    model.generate(ids, **kw)
    return caches[0]


def test_prune_pre_counts_video_frames_as_images(full):
    model = build("vision=prune_pre[ratio=0.5]")
    ids, pixels, grid = video_prompt(full.config, (2, 4, 6), seed=5)  # 2 frames of 6 tokens
    out = model(ids, pixel_values_videos=pixels, video_grid_thw=grid)
    assert model.vision.kept == [6] and out.shape[1] == ids.shape[1] - 6


def test_prune_pre_batches_rows_with_different_images_like_rows_alone(full):
    model = build("vision=prune_pre[ratio=0.5]")
    a, pa, ga = image_prompt(full.config, [(1, 8, 12)], seed=6)
    b, pb, gb = image_prompt(full.config, [(1, 4, 6)], seed=7)
    ids, mask = left_pad(full.config, [a[0], b[0]])
    batch = dict(attention_mask=mask, pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.cat([ga, gb]))
    together = last_logits(model, ids, **batch)
    assert model.vision.kept == [12, 3]
    for row, (x, p, g) in enumerate([(a, pa, ga), (b, pb, gb)]):
        alone = last_logits(model, x, pixel_values=p, image_grid_thw=g)
        assert relative_error(together[row], alone[0]) <= 1e-5
    out = model.generate(ids, **batch, max_new_tokens=4, eos_token_id=[])
    solo = model.generate(b, pixel_values=pb, image_grid_thw=gb, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out[1, ids.shape[1]:], solo[0, b.shape[1]:])


def test_merge_averages_each_dropped_token_into_its_target():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0]])
    target = torch.tensor([0, 0, 2, 0])  # rows 1 and 3 merge into 0; row 2 is kept alone
    merged = _average_into(x, target)
    assert torch.equal(merged[0], torch.tensor([11.0 / 3, 8.0 / 3])) and torch.equal(merged[2], x[2])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_gathers_keep_rows_and_deepstack_aligned(data):
    batch, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 10))
    n_visual = data.draw(st.integers(0, length))
    visual = torch.zeros(batch, length, dtype=torch.bool)
    keep = torch.ones(batch, length, dtype=torch.bool)
    kept_visual = data.draw(st.integers(0, n_visual))
    for b in range(batch):
        where = torch.tensor(data.draw(st.permutations(range(length))))[:n_visual]
        visual[b, where] = True
        keep[b, where[kept_visual:]] = False  # equal kept counts per row
    x = torch.randn(batch, length, 4)
    deepstack = x[visual] * 2  # one row per visual token, row-major
    index, filler = keep_indices(keep)
    assert not filler.any()
    gathered = take(x, index, 1)
    for b in range(batch):
        assert torch.equal(gathered[b], x[b, keep[b]])
    new_visual = take(visual, index, 1)
    assert torch.equal(deepstack[kept_visual_rows(visual, index)], gathered[new_visual] * 2)
    positions = torch.arange(3 * batch * length).view(3, batch, length)
    assert torch.equal(take(positions, index, 2, batch_dim=1)[:, 0], positions[:, 0, keep[0]])


def test_pruned_session_turns_recompute_like_forward(full):
    model = build("vision=prune_fastv[ratio=0.5]")
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=8)
    session = Session(model)
    answer = session.generate(ids, pixels, grid, max_new_tokens=3, eos_token_id=[])
    conv = torch.cat([ids[0], answer, torch.tensor([5, 6, 7])])[None]
    out = session.prefill(conv, pixels, grid)
    assert session.last_prefill["reused"] == 0
    assert torch.equal(out, last_logits(model, conv, pixel_values=pixels, image_grid_thw=grid))


MEASURED_SEEDS = (0, 1, 2)


@pytest.mark.parametrize("option", ["prune_fastv", "prune_pre"])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
def test_measured_error_is_within_the_declared_budget(full, option, ratio):
    model = build(_with_ratio(option, ratio))
    budget = get("vision", option).error_budget
    for seed in MEASURED_SEEDS:
        prompt = build_prompt(full.config, PromptSpec((RowSpec(16, (8, 12), 16),), seed=seed))
        measured = pruning_error(model, full, prompt)
        for phase in ("prefill", "decode"):
            assert measured[f"{phase}_kl"] <= budget["kl"]
            assert measured[f"{phase}_logits_rel"] <= budget["logits_rel"]
            # top-1 agreement is measured and stored, not bounded (the budget's 0 promises nothing)
            assert 0.0 <= measured[f"{phase}_top1_agreement"] <= 1.0


def test_fastv_scores_layers_whose_weights_are_streamed_in(full):
    """Offloading streams a layer's weights in from a pre-hook on the decoder layer and lets them go after
    it: FastV must score while layer K-1 runs, not before (planted: weights are NaN outside the layer)."""
    plan = "vision=prune_fastv[ratio=0.25]"
    ids, pixels, grid = image_prompt(full.config, GRIDS, seed=9)
    expected = build(plan)(ids, pixel_values=pixels, image_grid_thw=grid)
    model = build(plan)
    layer = model.language_model.layers[1]  # K - 1
    weights = {name: p.detach().clone() for name, p in layer.named_parameters()}

    def stream_in(module, args):
        for name, p in module.named_parameters():
            p.data.copy_(weights[name])

    def stream_out(module, args, output):
        for p in module.parameters():
            p.data.fill_(float("nan"))

    stream_out(layer, None, None)
    layer.register_forward_pre_hook(stream_in)
    layer.register_forward_hook(stream_out)
    assert torch.equal(model(ids, pixel_values=pixels, image_grid_thw=grid), expected)
