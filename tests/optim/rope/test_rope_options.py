"""RoPE options against ``standard``: cached is bitwise equal (3D ids with rope_delta after
images, positions up to the full context, vision rows/cols); approximated stays within its declared
bound of the exact value; interpolated is bitwise standard at factor 1, matches transformers' YaRN
frequencies and acts on all three M-RoPE axes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen3_vl
from qwen3_vl.config import preset
from qwen3_vl.model.positions import mrope_positions
from qwen3_vl.optim.rope.approximated import MAX_ABS_ERROR, ApproximatedRope
from qwen3_vl.optim.rope.cached import CachedRope
from qwen3_vl.optim.rope.interpolated import METHODS, InterpolatedRope, yarn_frequencies
from qwen3_vl.optim.rope.standard import StandardRope

from ...model.prompts import image_prompt

CONFIGS = {name: preset(name) for name in ("tiny", "mini", "2b")}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def positions_3d(draw):
    """[3, B, L] ids: text runs plus image blocks (H/W offsets, then the rope_delta jump), anywhere in
    the context, and arbitrary ids."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    start = draw(st.sampled_from([0, 1000, 32768, 262100]))
    if draw(st.booleans()):
        return torch.randint(0, 262144, (3, batch, length), generator=torch.Generator().manual_seed(draw(
            st.integers(0, 2**31 - 1))))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    text = torch.arange(start, start + 5).expand(3, -1)
    t_ids = torch.full((h * w,), start + 5)
    hh = start + 5 + torch.arange(h).repeat_interleave(w)
    ww = start + 5 + torch.arange(w).repeat(h)
    after = start + 5 + max(h, w) + torch.arange(length).expand(3, -1)  # text after the image: rope_delta
    row = torch.cat([text, torch.stack([t_ids, hh, ww]), after], dim=1)
    return row[:, None].expand(3, batch, -1).contiguous()


@settings(max_examples=25, deadline=None)
@given(pos=positions_3d(), name=st.sampled_from(sorted(CONFIGS)), dtype=st.sampled_from(DTYPES))
def test_cached_is_bitwise_standard(pos, name, dtype):
    cached, standard = CachedRope(CONFIGS[name]), StandardRope(CONFIGS[name])
    for ours, ref in zip(cached.text(pos, dtype), standard.text(pos, dtype), strict=True):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)


def test_cached_tables_are_shared_across_steps_and_grow():
    rope = CachedRope(CONFIGS["tiny"])
    rope.text(torch.arange(10).expand(3, 1, -1), torch.float32)
    table = rope.text_table.cos
    rope.text(torch.arange(10, 20).expand(3, 1, -1), torch.float32)
    assert rope.text_table.cos is table  # the next decode steps reuse it
    rope.text(torch.full((3, 1, 1), 5000), torch.float32)
    assert rope.text_table.cos.shape[0] > 5000
    with pytest.raises(ValueError, match=">= 0"):
        rope.text(torch.full((3, 1, 1), -1), torch.float32)


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(0, 500), min_size=1, max_size=50), name=st.sampled_from(sorted(CONFIGS)))
def test_cached_vision_is_bitwise_standard(rows, name):
    r = torch.tensor(rows)
    c = r.flip(0)
    for ours, ref in zip(CachedRope(CONFIGS[name]).vision(r, c), StandardRope(CONFIGS[name]).vision(r, c),
                         strict=True):
        assert torch.equal(ours, ref)


def test_cached_positions_of_a_real_image_prompt_include_rope_delta():
    config = CONFIGS["tiny"]
    ids, _, grid = image_prompt(config, [(1, 8, 12), (1, 4, 6)])
    pos, delta = mrope_positions(ids, config, None, grid)
    assert int(delta[0]) != 0  # the prompt does exercise the rope_delta jump
    for ours, ref in zip(CachedRope(config).text(pos, torch.float32), StandardRope(config).text(pos, torch.float32),
                         strict=True):
        assert torch.equal(ours, ref)


def _exact_cos_sin(config, positions):
    t = config.text
    inv = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=torch.float64) / t.head_dim))
    rope = CachedRope(config)
    per_slot = positions.permute(1, 2, 0).double()[..., rope.slot_axis]
    angles = per_slot * inv
    return angles.cos(), angles.sin()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top=st.sampled_from([300, 32768, 262144, 2**24 - 1]),
       split=st.sampled_from([256, 4096]))
def test_approximated_within_declared_bound_of_exact(seed, top, split):
    config = CONFIGS["2b"]
    pos = torch.randint(0, top, (3, 1, 64), generator=torch.Generator().manual_seed(seed))
    cos, sin = ApproximatedRope(config, split=split).text(pos, torch.float32)
    exact_cos, exact_sin = _exact_cos_sin(config, pos)
    half = cos.shape[-1] // 2
    assert (cos[..., :half].double() - exact_cos).abs().max() <= MAX_ABS_ERROR
    assert (sin[..., :half].double() - exact_sin).abs().max() <= MAX_ABS_ERROR


def test_approximated_bound_would_catch_a_sloppy_table():
    """Planted fault: fp16 tables (the 'low precision table' idea) break the declared bound."""
    config = CONFIGS["2b"]
    rope = ApproximatedRope(config)
    for name in ("cos_lo", "sin_lo"):
        setattr(rope.text_table, name, getattr(rope.text_table, name).half().float())
    pos = torch.randint(0, 32768, (3, 1, 64), generator=torch.Generator().manual_seed(0))
    cos, _ = rope.text(pos, torch.float32)
    exact, _ = _exact_cos_sin(config, pos)
    assert (cos[..., : cos.shape[-1] // 2].double() - exact).abs().max() > MAX_ABS_ERROR


def test_approximated_vision_close_to_standard():
    config = CONFIGS["2b"]
    r = torch.arange(0, 200)
    for ours, ref in zip(ApproximatedRope(config).vision(r, r.flip(0)), StandardRope(config).vision(r, r.flip(0)),
                         strict=True):
        assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_interpolated_at_factor_one_is_bitwise_standard(method):
    config = CONFIGS["2b"]
    pos = torch.randint(0, 262144, (3, 2, 33), generator=torch.Generator().manual_seed(1))
    for dtype in DTYPES:
        ours = InterpolatedRope(config, method=method, factor=1.0).text(pos, dtype)
        for a, b in zip(ours, StandardRope(config).text(pos, dtype), strict=True):
            assert torch.equal(a, b)


def test_linear_interpolation_divides_positions():
    config = CONFIGS["2b"]
    pos = torch.randint(0, 1000, (3, 1, 20), generator=torch.Generator().manual_seed(2)) * 4
    ours = InterpolatedRope(config, method="linear", factor=4.0).text(pos, torch.float32)
    ref = StandardRope(config).text(pos // 4, torch.float32)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_ntk_scales_the_base():
    config = CONFIGS["2b"]
    d = config.text.head_dim
    rope = InterpolatedRope(config, method="ntk", factor=8.0)
    theta = config.text.rope_theta * 8.0 ** (d / (d - 2))
    expected = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    assert torch.allclose(rope.inv_freq, expected, rtol=1e-6)
    assert rope.inv_freq[0] == 1.0 and rope.inv_freq[-1] < StandardRope(config).inv_freq[-1]


def test_yarn_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = CONFIGS["2b"].text
    hf_config = transformers.Qwen3Config(
        head_dim=config.head_dim, rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 65536,
                      "rope_theta": config.rope_theta},
    )
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    ours, ours_factor = yarn_frequencies(config.rope_theta, config.head_dim, 4.0, 65536)
    assert torch.allclose(ours, inv.float(), rtol=1e-6)
    assert math.isclose(ours_factor, attention_factor, rel_tol=1e-9)


def test_interpolation_applies_to_all_three_axes():
    config = CONFIGS["2b"]
    pos = torch.zeros(3, 1, 4, dtype=torch.long)
    for axis in range(3):
        moved = pos.clone()
        moved[axis] = 50000
        ours = InterpolatedRope(config, method="linear", factor=2.0).text(moved, torch.float32)[0]
        ref = StandardRope(config).text(moved, torch.float32)[0]
        assert not torch.equal(ours, ref), f"axis {axis} unchanged"


def test_bad_parameters():
    with pytest.raises(ValueError, match="method"):
        InterpolatedRope(CONFIGS["tiny"], method="rotate")
    with pytest.raises(ValueError, match="factor"):
        InterpolatedRope(CONFIGS["tiny"], factor=0.5)
    with pytest.raises(ValueError, match="split"):
        ApproximatedRope(CONFIGS["tiny"], split=0)


def test_approximate_rope_options_stay_within_budget_on_tiny():
    """The declared logits budgets hold on a fixed image prompt."""
    from qwen3_vl.optim import get

    reference = qwen3_vl.from_pretrained("tiny", seed=4)
    ids, pixels, grid = image_prompt(reference.config, [(1, 8, 8)], seed=4)
    ref = reference(ids, pixel_values=pixels, image_grid_thw=grid).float()
    for plan in ("rope=approximated[split=8]", "rope=interpolated"):
        model = qwen3_vl.from_pretrained("tiny", seed=4, plan=plan)
        out = model(ids, pixel_values=pixels, image_grid_thw=grid).float()
        budget = get("rope", plan.split("=")[1].split("[")[0]).error_budget
        logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= budget["logits_rel"]
        assert (logp.exp() * (logp - logq)).sum(-1).mean().item() <= budget["kl"]
        if "top1_agreement" in budget:
            assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= budget["top1_agreement"]
