"""vision=conditional: bitwise equal to full on repeated images and text-only requests, and a multi-turn
Session that reuses the KV of the unchanged prefix (exact to fp32 rounding, same greedy tokens; bitwise
with execution=cpu_packed[batch_invariant])."""

from __future__ import annotations

import pytest
import torch

from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.session import Session
from tests.model.prompts import image_prompt, relative_error, text_ids, video_prompt

from .conftest import VitCalls, build, forbid_vit, last_logits


def test_repeated_image_is_bitwise_full_and_encoded_once(full, cond):
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12), (1, 4, 6)], seed=1)
    calls = VitCalls(cond)
    ref = full(ids, pixel_values=pixels, image_grid_thw=grid)
    first = cond(ids, pixel_values=pixels, image_grid_thw=grid)
    second = cond(ids, pixel_values=pixels, image_grid_thw=grid)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert calls.count == 1
    assert cond.vision.cache.stats["hits"] == 1
    kw = dict(pixel_values=pixels, image_grid_thw=grid, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(cond.generate(ids, **kw), full.generate(ids, **kw))
    assert calls.count == 1


def test_the_same_image_in_another_prompt_is_not_encoded_again(full, cond):
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=2)
    other = torch.cat([text_ids(9, torch.Generator().manual_seed(9))[None], ids], dim=1)
    cond(ids, pixel_values=pixels, image_grid_thw=grid)
    forbid_vit(cond)
    out = cond(other, pixel_values=pixels, image_grid_thw=grid)
    assert torch.equal(out, full(other, pixel_values=pixels, image_grid_thw=grid))


def test_repeated_video_is_bitwise_full(full, cond):
    ids, pixels, grid = video_prompt(full.config, (2, 4, 6), seed=3)
    calls = VitCalls(cond)
    ref = full(ids, pixel_values_videos=pixels, video_grid_thw=grid)
    for _ in range(2):
        assert torch.equal(cond(ids, pixel_values_videos=pixels, video_grid_thw=grid), ref)
    assert calls.count == 1


def test_text_only_requests_never_run_the_vision_tower(full, cond):
    forbid_vit(cond)
    ids = text_ids(14, torch.Generator().manual_seed(4))[None]
    assert torch.equal(cond(ids), full(ids))
    kw = dict(max_new_tokens=5, eos_token_id=[])
    assert torch.equal(cond.generate(ids, **kw), full.generate(ids, **kw))
    assert len(cond.vision.cache.entries) == 0


def _turn(ids: torch.Tensor, answer: torch.Tensor, user: int, seed: int) -> torch.Tensor:
    """The conversation so far + the model's answer + a new user turn of ``user`` text tokens."""
    return torch.cat([ids[0], answer, text_ids(user, torch.Generator().manual_seed(seed))])[None]


def test_second_turn_reuses_the_image_prefix(full, cond):
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=5)
    ref_session, session = Session(full), Session(cond)
    kw = dict(max_new_tokens=4, eos_token_id=[])

    # Turn 1: nothing to reuse, so exactly full's computation.
    first = session.generate(ids, pixels, grid, **kw)
    assert torch.equal(first, ref_session.generate(ids, pixels, grid, **kw))
    assert torch.equal(first, full.generate(ids, pixel_values=pixels, image_grid_thw=grid, **kw)[0, ids.shape[1]:])

    # Turn 2, text only: the image prefix and the answer are reused, the ViT does not run.
    conv = _turn(ids, first, 6, seed=6)
    forbid_vit(cond)
    ours, ref = session.prefill(conv, pixels, grid), ref_session.prefill(conv, pixels, grid)
    assert session.last_prefill == {"reused": ids.shape[1] + len(first) - 1, "prefilled": 7}
    assert ref_session.last_prefill["reused"] == 0
    assert relative_error(ours, ref) <= 1e-5
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert relative_error(ours, last_logits(full, conv, pixel_values=pixels, image_grid_thw=grid)) <= 1e-5


def test_greedy_turns_match_recomputing_the_whole_conversation(full, cond):
    ids, pixels, grid = image_prompt(full.config, [(1, 4, 6)], seed=8)
    session, conv = Session(cond), ids
    for turn in range(3):
        answer = session.generate(conv, pixels, grid, max_new_tokens=5, eos_token_id=[])
        expected = full.generate(conv, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(answer, expected[0, conv.shape[1]:])
        assert (session.last_prefill["reused"] > 0) == (turn > 0)
        conv = _turn(conv, answer, 4, seed=20 + turn)


def test_a_new_image_in_a_later_turn_is_the_only_one_encoded(full, cond):
    config = full.config
    ids, pixels, grid = image_prompt(config, [(1, 8, 12)], seed=9)
    new_ids, new_pixels, new_grid = image_prompt(config, [(1, 4, 6)], seed=10)
    session = Session(cond)
    answer = session.generate(ids, pixels, grid, max_new_tokens=3, eos_token_id=[])
    conv = torch.cat([ids[0], answer, new_ids[0]])[None]
    all_pixels, all_grids = torch.cat([pixels, new_pixels]), torch.cat([grid, new_grid])
    calls = VitCalls(cond)
    ours = session.prefill(conv, all_pixels, all_grids)
    assert calls.rows == [new_pixels.shape[0]]
    ref = last_logits(full, conv, pixel_values=all_pixels, image_grid_thw=all_grids)
    assert relative_error(ours, ref) <= 1e-5 and torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_a_changed_history_is_recomputed_bitwise(full, cond):
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=11)
    session = Session(cond)
    answer = session.generate(ids, pixels, grid, max_new_tokens=3, eos_token_id=[])
    conv = _turn(ids, answer, 5, seed=12)

    edited = conv.clone()
    edited[0, 1] = (edited[0, 1] + 1) % 900  # a rewritten first user message
    out = session.prefill(edited, pixels, grid)
    assert session.last_prefill["reused"] == 0
    assert torch.equal(out, last_logits(full, edited, pixel_values=pixels, image_grid_thw=grid))

    session.prefill(conv, pixels, grid)
    other = pixels.clone()
    other[0, 0] += 1.0  # same tokens, different image
    longer = _turn(conv, torch.tensor([5]), 3, seed=13)
    out = session.prefill(longer, other, grid)
    assert session.last_prefill["reused"] == 0
    assert torch.equal(out, last_logits(full, longer, pixel_values=other, image_grid_thw=grid))


def test_full_sessions_recompute_every_turn_bitwise(full):
    ids, pixels, grid = image_prompt(full.config, [(1, 4, 6)], seed=14)
    session = Session(full)
    answer = session.generate(ids, pixels, grid, max_new_tokens=3, eos_token_id=[])
    conv = _turn(ids, answer, 4, seed=15)
    out = session.prefill(conv, pixels, grid)
    assert session.last_prefill["reused"] == 0
    assert torch.equal(out, last_logits(full, conv, pixel_values=pixels, image_grid_thw=grid))


def test_plan_reports_conditional_as_exact():
    model = build("vision=conditional[cache_mb=1]")
    assert "vision=conditional[cache_mb=1]" in model.plan.id
    assert model.vision.cache.max_bytes == 1 << 20


# ---------------------------------------------------------------------------------------------
# Bitwise prefix reuse: with execution=cpu_packed[batch_invariant] every text-decoder row runs through
# kernels whose sums do not depend on how many rows a call holds, so a turn prefilled over a reused
# cache gives the very bits of recomputing the whole conversation.

INVARIANT = "attention=sdpa,kv_cache=static,execution=cpu_packed[batch_invariant=true]"
needs_kernels = pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None, reason=str(cpu_gemv.unavailable_reason()))


@needs_kernels
@pytest.mark.parametrize("quant", ["", ",quant=int8_weight"])
def test_batch_invariant_kernels_make_prefix_reuse_bitwise(quant):
    full, cond = build(INVARIANT + quant), build(INVARIANT + quant + ",vision=conditional")
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=5)
    ref_session, session, conv = Session(full), Session(cond), ids
    for turn in range(3):
        ours, ref = session.prefill(conv, pixels, grid), ref_session.prefill(conv, pixels, grid)
        assert (session.last_prefill["reused"] > 0) == (turn > 0) and ref_session.last_prefill["reused"] == 0
        assert torch.equal(ours, ref)  # reused prefix + new rows == the whole conversation recomputed
        assert torch.equal(ours, last_logits(full, conv, pixel_values=pixels, image_grid_thw=grid))
        answer = session.generate(conv, pixels, grid, max_new_tokens=4, eos_token_id=[])
        assert torch.equal(answer, ref_session.generate(conv, pixels, grid, max_new_tokens=4, eos_token_id=[]))
        conv = _turn(conv, answer, 5, seed=30 + turn)
    if not quant:  # and still exact against the reference model, to fp32 rounding
        expected = last_logits(build(), conv, pixel_values=pixels, image_grid_thw=grid)
        assert relative_error(session.prefill(conv, pixels, grid), expected) <= 1e-5


@needs_kernels
def test_a_row_count_dependent_kernel_breaks_bitwise_reuse():
    """Planted fault: layer 0's down projection back on PyTorch's GEMM (blocked by row count):
    the reused turn's logits now differ from recomputing in the last bits, and the test sees it."""
    full, cond = build(INVARIANT), build(INVARIANT + ",vision=conditional")
    for model in (full, cond):
        layer = model.language_model.layers[0].mlp.down_proj
        layer.kernel = lambda mod, x: torch.nn.functional.linear(x, mod.weight)
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=5)
    session = Session(cond)
    answer = session.generate(ids, pixels, grid, max_new_tokens=4, eos_token_id=[])
    conv = _turn(ids, answer, 6, seed=6)
    ours = session.prefill(conv, pixels, grid)
    assert session.last_prefill["reused"] > 0
    ref = last_logits(full, conv, pixel_values=pixels, image_grid_thw=grid)
    assert not torch.equal(ours, ref) and relative_error(ours, ref) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("plan, problem", [
    ("attention=block_sparse,execution=cpu_packed[batch_invariant=true]", "attention=block_sparse is not one"),
    ("execution=cpu_packed[batch_invariant=true;kernel=mkldnn]", "not 'mkldnn'"),
    ("quant=int8_weight[kernel=fbgemm],execution=cpu_packed[batch_invariant=true]", "fbgemm_kernel has no row"),
])
def test_batch_invariance_is_refused_where_it_cannot_hold(plan, problem):
    with pytest.raises(ValueError, match=problem):
        build(plan)
