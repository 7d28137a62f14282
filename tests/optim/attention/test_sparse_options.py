"""block_sparse and dynamic_sparse: equal to dense when every block is kept, the sparse kernel
itself exact when handed every block, the kept fraction follows the density, the calibrated router
beats the parameter-free one, and router files round-trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen3_vl
from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim.attention.block_gather import BlockLayout, gathered_attention, static_selection
from qwen3_vl.optim.attention.block_sparse import BlockSparseAttention
from qwen3_vl.optim.attention.dynamic_sparse import (
    DynamicSparseAttention,
    Router,
    calibrate,
    collect,
    load_router,
    router_kl,
    save_router,
)

from .cases import DEVICE, EAGER, EXACT_FP32, TARGET, rel_error, text_cases, vision_cases, vision_error

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=text_cases(), block=st.integers(1, 16))
def test_gathered_kernel_with_every_block_equals_dense(case, block):
    """The sparse machinery (layout, gather, masks) is exact when the selection drops nothing."""
    layout = BlockLayout.of(case.q.shape[2], case.k.shape[2], block)
    idx, keep = static_selection(layout, case.mask.causal, 1.0, 1, 0)
    out = gathered_attention(case.q, case.k, case.v, case.scale, case.mask.causal, case.mask.key_valid, layout, idx,
                             keep)
    assert rel_error(out, EAGER.text(case.q, case.k, case.v, case.mask, case.scale)) <= EXACT_FP32


@SETTINGS
@given(case=text_cases(), block=st.integers(1, 16))
def test_block_sparse_at_density_one_is_dense_bitwise(case, block):
    attention = BlockSparseAttention(TARGET, block, 1.0, 1, 0)
    out = attention.text(case.q, case.k, case.v, case.mask, case.scale)
    assert torch.equal(out, EAGER.text(case.q, case.k, case.v, case.mask, case.scale))


@SETTINGS
@given(case=text_cases(), block=st.integers(1, 16))
def test_dynamic_sparse_at_density_one_is_dense_bitwise(case, block):
    d, hkv = case.q.shape[-1], case.k.shape[1]
    attention = DynamicSparseAttention(TARGET, Router.parameter_free(1, hkv, d, block), 1.0, 1)
    out = attention.text(case.q, case.k, case.v, case.mask, case.scale)
    assert torch.equal(out, EAGER.text(case.q, case.k, case.v, case.mask, case.scale))


@settings(max_examples=15, deadline=None)
@given(case=text_cases(max_len=90), block=st.integers(2, 8), density=st.floats(0.05, 0.95))
def test_sparse_outputs_are_finite_and_sparse(case, block, density):
    d, hkv = case.q.shape[-1], case.k.shape[1]
    for attention in (BlockSparseAttention(TARGET, block, density, 1, 3),
                      DynamicSparseAttention(TARGET, Router.parameter_free(1, hkv, d, block), density, 1)):
        out = attention.text(case.q, case.k, case.v, case.mask, case.scale)
        assert out.shape == case.q.shape and torch.isfinite(out).all()
        info = attention.describe()
        if info["dense_calls"] == 0:  # a sparse call: kept blocks within the density budget
            layout = BlockLayout.of(case.q.shape[2], case.k.shape[2], block)
            assert info["kept_fraction"] <= layout.blocks_per_row(density) * layout.nqb / layout.visible_blocks(
                case.mask.causal).sum().item() + 1e-9


@settings(max_examples=10, deadline=None)
@given(case=vision_cases())
def test_sparse_options_keep_the_vit_exact(case):
    for attention in (BlockSparseAttention(TARGET, 4, 0.25, 1, 0),
                      DynamicSparseAttention(TARGET, Router.parameter_free(1, 1, 16, 4), 0.25, 1)):
        assert vision_error(attention, case) <= EXACT_FP32


def test_static_selection_keeps_diagonal_sinks_globals_then_neighbours():
    layout = BlockLayout.of(40, 40, 4)  # 10 query blocks, 10 key blocks
    idx, keep = static_selection(layout, True, 0.4, 1, 3)  # 4 blocks per row
    last = set(idx[0, 0, -1][keep[0, 0, -1]].tolist())
    assert last == {9, 0, 3, 6}  # own block, sink 0, globals 3 and 6 (9 is its own), then none left
    idx, keep = static_selection(layout, True, 0.4, 1, 0)
    assert set(idx[0, 0, -1].tolist()) == {9, 0, 8, 7}  # own, sink, then the nearest
    assert keep[0, 0, 0].sum() == 1  # the first block sees only itself


def test_error_shrinks_as_density_grows():
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 4, 128, 64, generator=gen) * 3).to(DEVICE)
    k, v = torch.randn(2, 1, 2, 128, 64, generator=gen).to(DEVICE)
    mask = AttentionMask(None, True)
    ref = EAGER.text(q, k, v, mask, 0.125)
    errors = [rel_error(BlockSparseAttention(TARGET, 8, density, 1, 0).text(q, k, v, mask, 0.125), ref)
              for density in (0.125, 0.25, 0.5, 0.75, 1.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] == 0 and errors[0] > 1e-3


# ---------------------------------------------------------------------------------------------
# The router


@pytest.fixture(scope="module")
def tiny():
    return qwen3_vl.from_pretrained("tiny", seed=5)


def test_calibration_distils_the_dense_block_mass(tiny):
    """Fitted on seeded prompts, the router is closer (KL) to the dense model's block attention mass
    than the parameter-free start, on prompts it was not fitted on."""
    router = calibrate(tiny, block=4, tokens=48, samples=2, steps=40, seed=0)
    assert all(after < before for before, after in zip(router.meta["kl_before"], router.meta["kl_after"],
                                                       strict=True))
    held_out = [torch.randint(0, 1000, (56,), generator=torch.Generator().manual_seed(99))]
    data = collect(tiny, 4, held_out)
    t = tiny.config.text
    start = Router.parameter_free(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 4)
    layout = BlockLayout.of(56, 56, 4)
    for layer, [(qp, kf, mass)] in enumerate(data):
        fitted = router_kl(router.layers[layer], qp, kf, mass, layout)
        baseline = router_kl(start.layers[layer], qp, kf, mass, layout)
        assert fitted < 0.8 * baseline, (layer, float(fitted), float(baseline))


def test_router_selects_per_layer_through_hooks(tiny):
    model = qwen3_vl.from_pretrained("tiny", seed=5, plan="attention=dynamic_sparse[block=4;calibration_tokens=32;"
                                                          "steps=5]")
    seen = []
    original = model.attention.select

    def spy(*args, **kwargs):
        seen.append(model.attention.layer)
        return original(*args, **kwargs)

    model.attention.select = spy
    model(torch.randint(0, 900, (1, 30), generator=torch.Generator().manual_seed(0)))
    assert seen == list(range(tiny.config.text.num_hidden_layers))
    # Re-applying another plan retires the hooks: they no longer touch the old runtime.
    old = model.attention
    model.apply_plan(qwen3_vl.Plan.parse("reference"), model.target)
    old.layer = -1
    model(torch.randint(0, 900, (1, 30), generator=torch.Generator().manual_seed(0)))
    assert old.layer == -1


def test_router_file_round_trip_and_mismatch(tiny, tmp_path):
    path = tmp_path / "router.safetensors"
    plan = f"attention=dynamic_sparse[block=4;calibration_tokens=32;steps=5;router={path}]"
    first = qwen3_vl.from_pretrained("tiny", seed=5, plan=plan)  # calibrates and writes the file
    assert path.exists()
    second = qwen3_vl.from_pretrained("tiny", seed=5, plan=plan)  # loads it
    for a, b in zip(first.attention.router.layers, second.attention.router.layers, strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(ValueError, match="block 4"):
        qwen3_vl.from_pretrained("tiny", seed=5, plan=plan.replace("block=4", "block=8"))
    t = tiny.config.text
    save_router(Router.parameter_free(2, t.num_key_value_heads, t.head_dim, 4), path)
    with pytest.raises(ValueError, match="4-layer router"):
        load_router(path, t.num_hidden_layers, t.num_key_value_heads, t.head_dim)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="density"):
        BlockSparseAttention(TARGET, 4, 0.0, 1, 0)
    with pytest.raises(ValueError, match="block"):
        BlockSparseAttention(TARGET, 0, 0.5, 1, 0)
    with pytest.raises(ValueError, match="density"):
        DynamicSparseAttention(TARGET, Router.parameter_free(1, 1, 16, 4), 1.5, 1)
