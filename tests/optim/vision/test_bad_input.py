"""Bad input fails with one clear error, before the ViT runs, and caches nothing."""

from __future__ import annotations

import pytest
import torch

from qwen3_vl import InputError, PlanError
from qwen3_vl.optim.vision.budget import PixelBudget, pixel_budget
from qwen3_vl.processing import smart_resize
from qwen3_vl.session import Session
from tests.model.prompts import image_prompt, left_pad, video_prompt

from .conftest import build, forbid_vit


def _nothing_cached(model) -> bool:
    """Nothing is cached now, nor committed by the next good request (which adds only its own entry)."""
    if model.vision.cache.entries:
        return False
    model.visual.forward = type(model.visual).forward.__get__(model.visual)  # undo forbid_vit
    ids, pixels, grid = image_prompt(model.config, [(1, 4, 6)], seed=99)
    model(ids, pixel_values=pixels, image_grid_thw=grid)
    return len(model.vision.cache.entries) == 1


def test_placeholder_count_not_matching_the_image(cond):
    ids, pixels, grid = image_prompt(cond.config, [(1, 8, 12)], seed=1)
    forbid_vit(cond)
    extra = torch.cat([ids, torch.tensor([[cond.config.image_token_id]])], dim=1)
    with pytest.raises(InputError, match="the prompt has 25 placeholder tokens, the grid gives 24"):
        cond(extra, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(InputError, match="the prompt has 25 placeholder tokens, the grid gives 24"):
        Session(cond).prefill(extra, pixels, grid)
    assert _nothing_cached(cond)


def test_video_with_zero_frames(cond):
    ids, pixels, _ = video_prompt(cond.config, (2, 4, 6), seed=2)
    forbid_vit(cond)
    with pytest.raises(InputError, match="zero or negative size"):
        cond(ids, pixel_values_videos=pixels[:0], video_grid_thw=torch.tensor([[0, 4, 6]]))
    with pytest.raises(InputError, match="video_grid_thw has no rows"):
        cond(ids[:, :3], pixel_values_videos=pixels[:0], video_grid_thw=torch.zeros(0, 3, dtype=torch.long))
    assert _nothing_cached(cond)


def test_a_request_failing_after_the_vit_caches_nothing(full, cond):
    """Grids in the wrong order: the placeholder total matches (so the ViT runs) but the runs do not."""
    config = cond.config
    ids, pixels, grid = image_prompt(config, [(1, 8, 12), (1, 4, 6)], seed=3)
    swapped = grid.flip(0)
    with pytest.raises(InputError, match="does not match"):
        cond(ids, pixel_values=torch.cat([pixels[96:], pixels[:96]]), image_grid_thw=swapped)
    assert not cond.vision.cache.entries
    good_ids, good_pixels, good_grid = image_prompt(config, [(1, 4, 6)], seed=4)
    out = cond(good_ids, pixel_values=good_pixels, image_grid_thw=good_grid)
    assert torch.equal(out, full(good_ids, pixel_values=good_pixels, image_grid_thw=good_grid))
    assert len(cond.vision.cache.entries) == 1  # only the good request's pixels


def test_pixel_budgets_with_min_above_max():
    with pytest.raises(InputError, match=r"min_pixels \(300000\) is larger than max_pixels \(262144\)"):
        pixel_budget("cpu-avx2", min_pixels=300_000)
    with pytest.raises(InputError, match="larger than max_pixels"):
        PixelBudget(2048, 1024)
    with pytest.raises(InputError, match="positive integer"):
        PixelBudget(0, 1024)
    with pytest.raises(InputError, match="larger than max_pixels"):
        smart_resize(448, 448, 32, min_pixels=2048, max_pixels=1024)


@pytest.mark.parametrize("plan, message", [
    ("vision=prune_fastv[ratio=0]", "keep ratio must be in"),
    ("vision=prune_pre[ratio=1.5]", "keep ratio must be in"),
    ("vision=prune_fastv[layer=0]", "layer K must be in"),
    ("vision=prune_fastv[layer=4]", "layer K must be in"),
    ("vision=prune_pre[method=random]", "method must be one of"),
])
def test_bad_pruning_parameters(plan, message):
    with pytest.raises(ValueError, match=message):
        build(plan)


def test_fastv_refuses_caches_that_cannot_hold_ragged_layers():
    # declared (Optimization.needs), so the plan is refused before anything is built
    with pytest.raises(PlanError, match=r"vision=prune_fastv needs kv_cache=dynamic \(plan has kv_cache=static\)"):
        build("vision=prune_fastv,kv_cache=static")


def test_fastv_refuses_padded_or_uneven_batches():
    model = build("vision=prune_fastv")
    config = model.config
    ids, pixels, grid = image_prompt(config, [(1, 4, 6)], seed=5)
    padded, mask = left_pad(config, [ids[0], ids[0, 2:]])
    with pytest.raises(InputError, match="padded batches"):
        model(padded, attention_mask=mask, pixel_values=torch.cat([pixels, pixels]), image_grid_thw=grid.repeat(2, 1))
    text_row = torch.full_like(ids, 7)  # same length, no image: 6 visual tokens vs 0
    with pytest.raises(InputError, match="same number of visual tokens in every batch row"):
        model(torch.cat([ids, text_row]), pixel_values=pixels, image_grid_thw=grid)
