"""The vision options on every device and dtype policy this machine has (CUDA runs where a GPU is visible):
conditional stays bitwise equal to full, sessions reuse within fp32 rounding, pruning at ratio 1 is full."""

from __future__ import annotations

import pytest
import torch

import qwen3_vl
from qwen3_vl.session import Session
from tests.model.prompts import image_prompt, relative_error, text_ids

from .conftest import SEED

# CPU fp32 is what every other test here runs; CPU fp16 covers the fp16-storage / fp32-compute policy.
TARGETS = [("cpu", "fp16")] + ([("cuda", "fp32"), ("cuda", "fp16")] if torch.cuda.is_available() else [])


def _model(plan: str, device: str, dtype: str):
    return qwen3_vl.from_pretrained("tiny", seed=SEED, plan=plan, device=device, dtype=dtype)


@pytest.fixture(scope="module", params=TARGETS, ids=lambda t: "-".join(t))
def target(request):
    device, dtype = request.param
    return device, dtype, _model("reference", device, dtype)


def test_conditional_repeats_and_turns(target, tmp_path):
    device, dtype, full = target
    cond = _model(f"vision=conditional[disk_dir={tmp_path}]", device, dtype)
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=1)
    ref = full(ids, pixel_values=pixels, image_grid_thw=grid)
    for model in (cond, cond, _model(f"vision=conditional[disk_dir={tmp_path}]", device, dtype)):  # memory, disk
        assert torch.equal(model(ids, pixel_values=pixels, image_grid_thw=grid), ref)

    session, ref_session = Session(cond), Session(full)
    answer = session.generate(ids, pixels, grid, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(answer, ref_session.generate(ids, pixels, grid, max_new_tokens=3, eos_token_id=[]))
    conv = torch.cat([ids[0], answer, text_ids(5, torch.Generator().manual_seed(2))])[None]
    ours, theirs = session.prefill(conv, pixels, grid), ref_session.prefill(conv, pixels, grid)
    assert session.last_prefill["reused"] > 0
    assert relative_error(ours.cpu(), theirs.cpu()) <= 1e-5 and torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("plan", ["vision=prune_fastv[ratio=0.25]", "vision=prune_pre[ratio=0.25;method=diversity]"])
def test_pruning_runs_and_ratio_one_is_full(target, plan):
    device, dtype, full = target
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=3)
    pruned = _model(plan, device, dtype)
    assert pruned(ids, pixel_values=pixels, image_grid_thw=grid).shape[1] == ids.shape[1] - 24 + 6
    out = pruned.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=3, eos_token_id=[])
    assert out.shape[1] == ids.shape[1] + 3
    whole = _model(plan.replace("ratio=0.25", "ratio=1.0"), device, dtype)
    assert torch.equal(whole(ids, pixel_values=pixels, image_grid_thw=grid),
                       full(ids, pixel_values=pixels, image_grid_thw=grid))
