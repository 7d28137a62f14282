"""The captured prefill's logic on the CPU, without capturing (the same buffers, copies and code, run
eagerly): prompts padded to a length bucket, one entry per shape whose inputs are copied in per prompt, the
cache told only the real tokens; against the reference plan on images, videos, both, and text.

(Capture itself needs a GPU: ``scripts/gpu_exactness.py`` runs these prompts through real graphs.)
"""

from __future__ import annotations

import pytest
import torch

import qwen3_vl
from qwen3_vl.model.positions import InputError
from qwen3_vl.optim.execution.cuda_graph import CudaGraphExecution
from qwen3_vl.optim.execution.prefill_graph import PrefillGraphs
from qwen3_vl.optim.plan import Target

from ...model.prompts import image_block, image_prompt, left_pad, relative_error, text_ids, video_prompt


def graph_model(source, plan="attention=sdpa", **kwargs):
    model = qwen3_vl.from_pretrained(source, plan=plan)
    model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, **kwargs)
    return model


def mixed_prompt(config, seed):
    """An image, then a two-frame video, with text around them."""
    gen = torch.Generator().manual_seed(seed)
    ids, vpix, vgrid = video_prompt(config, (2, 4, 4), seed=seed)
    image = image_block(config, (1, 4, 6))
    ids = torch.cat([text_ids(3, gen), image, ids[0]])[None]
    return ids, dict(pixel_values=torch.randn(24, config.vision.patch_dim, generator=gen),
                     image_grid_thw=torch.tensor([[1, 4, 6]]), pixel_values_videos=vpix, video_grid_thw=vgrid)


def prompts(config):
    ids, pix, grid = image_prompt(config, [(1, 4, 8), (1, 6, 4)], seed=31)
    vids, vpix, vgrid = video_prompt(config, (2, 4, 4), seed=32)
    return {
        "images": (ids, dict(pixel_values=pix, image_grid_thw=grid)),
        "video": (vids, dict(pixel_values_videos=vpix, video_grid_thw=vgrid)),
        "image and video": mixed_prompt(config, 33),
        "text": (torch.randint(0, 900, (2, 11), generator=torch.Generator().manual_seed(34)), {}),
    }


def observed_steps(model, ids, inputs, n=10):
    steps = []
    model.step_observers.append(lambda logits: steps.append(logits[:, -1].clone()))
    tokens = model.generate(ids, **inputs, max_new_tokens=n, eos_token_id=[])
    model.step_observers.clear()
    return tokens, torch.stack(steps, 1)


@pytest.mark.parametrize("case", ["images", "video", "image and video", "text"])
def test_unpadded_prefill_is_bitwise_the_eager_prefill(tiny_checkpoint, ours_tiny, case):
    """Unpadded, the graph's prefill runs the same operations as the plan's eager prefill: bitwise its logits
    for one prompt. (A batch's last rows reach the output matrix as a gathered copy instead of a strided view of
    the hidden states, and the CPU GEMM rounds the two layouts differently.)"""
    ids, inputs = prompts(ours_tiny.config)[case]
    model = graph_model(tiny_checkpoint, prefill_bucket=1)
    tokens, steps = observed_steps(model, ids, inputs)
    eager_tokens, eager_steps = observed_steps(graph_model(tiny_checkpoint, prefill_graphs=0), ids, inputs)
    assert torch.equal(tokens, eager_tokens)
    if ids.shape[0] == 1:
        assert torch.equal(steps, eager_steps)
    else:
        assert relative_error(steps, eager_steps) <= 1e-6
    ref_tokens, ref_steps = observed_steps(ours_tiny, ids, inputs)
    assert torch.equal(tokens, ref_tokens)
    assert relative_error(steps, ref_steps) <= 1e-5
    assert model.execution.describe()["prefill"]["counts"] == {"run": 1}


@pytest.mark.parametrize("case", ["images", "video", "image and video", "text"])
def test_padded_prefill_gives_the_reference_tokens(tiny_checkpoint, ours_tiny, case):
    ids, inputs = prompts(ours_tiny.config)[case]
    model = graph_model(tiny_checkpoint, prefill_bucket=64)
    tokens, steps = observed_steps(model, ids, inputs)
    ref_tokens, ref_steps = observed_steps(ours_tiny, ids, inputs)
    assert torch.equal(tokens, ref_tokens)
    assert relative_error(steps, ref_steps) <= 1e-5


def test_one_entry_per_shape_with_new_inputs_copied_in(tiny_checkpoint, ours_tiny):
    """A second prompt of the same shape (other text lengths, other pixels, the image elsewhere) reuses the
    first's buffers, and gets its own answer; another grid gets its own entry; capacity bounds them."""
    config = ours_tiny.config
    model = graph_model(tiny_checkpoint, prefill_bucket=64, prefill_graphs=2)
    gen = torch.Generator().manual_seed(35)
    seen = []
    for before, after, grid in ((5, 3, (1, 4, 8)), (9, 12, (1, 4, 8)), (2, 2, (1, 4, 8)), (4, 4, (1, 6, 6)),
                                (3, 3, (1, 4, 4))):
        ids = torch.cat([text_ids(before, gen), image_block(config, grid), text_ids(after, gen)])[None]
        inputs = dict(pixel_values=torch.randn(grid[1] * grid[2], config.vision.patch_dim, generator=gen),
                      image_grid_thw=torch.tensor([grid]))
        tokens, steps = observed_steps(model, ids, inputs, n=6)
        ref_tokens, ref_steps = observed_steps(ours_tiny, ids, inputs, n=6)
        assert torch.equal(tokens, ref_tokens)
        assert relative_error(steps, ref_steps) <= 1e-5
        seen.append(tokens[:, ids.shape[1]:])
    assert not all(torch.equal(seen[0], s) for s in seen[1:3])  # not a stale answer
    prefill = model.execution.describe()["prefill"]
    assert prefill["counts"] == {"run": 5} and prefill["shapes"] == 2  # 3 of one shape, then 2 more: 2 kept


def test_a_cache_told_the_padded_length_is_caught(tiny_checkpoint, ours_tiny, monkeypatch):
    """The planted fault: the padded keys left valid (the cache told the bucket's length). Decoding then
    attends to them, and the comparison with the reference sees it."""
    ids, inputs = prompts(ours_tiny.config)["images"]
    _, ref_steps = observed_steps(ours_tiny, ids, inputs)

    def told_the_padded_length(cache, n, length):
        cache.seen_tokens = length

    monkeypatch.setattr(PrefillGraphs, "keep_real_tokens", staticmethod(told_the_padded_length))
    _, steps = observed_steps(graph_model(tiny_checkpoint, prefill_bucket=64), ids, inputs)
    assert relative_error(steps[:, :1], ref_steps[:, :1]) <= 1e-5  # the prefill itself is right
    assert relative_error(steps[:, 1:], ref_steps[:, 1:]) > 1e-3  # decoding is not


def test_what_is_not_captured_takes_the_reference_prefill_with_the_reason(tiny_checkpoint, ours_tiny):
    config = ours_tiny.config
    a, pa, ga = image_prompt(config, [(1, 4, 8)], seed=36)
    b, pb, gb = image_prompt(config, [(1, 6, 4)], seed=37)
    ids, mask = left_pad(config, [a[0], b[0][:-2]])
    kw = dict(attention_mask=mask, pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.cat([ga, gb]),
              max_new_tokens=5, eos_token_id=[])
    model = graph_model(tiny_checkpoint)
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    assert model.execution.describe()["prefill"]["counts"] == {"a padded batch (the masked path)": 1}

    off = graph_model(tiny_checkpoint, prefill_graphs=0)
    off.generate(a, pixel_values=pa, image_grid_thw=ga, max_new_tokens=2)
    assert off.execution.describe()["prefill"]["counts"] == {"prefill graphs off (prefill_graphs=0)": 1}

    conditional = graph_model(tiny_checkpoint, "attention=sdpa,vision=conditional")
    conditional.generate(a, pixel_values=pa, image_grid_thw=ga, max_new_tokens=2)
    (reason,) = conditional.execution.describe()["prefill"]["counts"]
    assert reason.startswith("vision=conditional")


def test_bad_visual_inputs_get_the_reference_error(tiny_checkpoint, ours_tiny):
    ids, pix, _ = image_prompt(ours_tiny.config, [(1, 4, 8)], seed=38)
    model = graph_model(tiny_checkpoint)
    for kw in (dict(pixel_values=pix, image_grid_thw=torch.tensor([[1, 4, 4]])), dict(pixel_values=pix), {}):
        with pytest.raises(InputError) as ours:
            model.generate(ids, max_new_tokens=2, **kw)
        with pytest.raises(InputError) as ref:
            ours_tiny.generate(ids, max_new_tokens=2, **kw)
        assert str(ours.value) == str(ref.value)
    assert model.execution.describe()["prefill"]["shapes"] == 0
