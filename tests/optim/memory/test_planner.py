"""The memory planner: budgets, the minimum, monotonicity, and the --memory-budget command line."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen3_vl
from qwen3_vl.__main__ import main
from qwen3_vl.optim.memory.planner import (
    GiB,
    MemoryBudgetError,
    MiB,
    parse_bytes,
    plan_memory,
    plan_with_budget,
)
from qwen3_vl.optim.plan import PlanError


@functools.cache
def mini_on_meta(plan: str = "reference"):
    """The mini shape without weights: the planner only reads tensor sizes."""
    import torch

    from qwen3_vl.model.qwen3_vl import Qwen3VL
    from qwen3_vl.optim.plan import Plan

    with torch.device("meta"):
        model = Qwen3VL(qwen3_vl.config.preset("mini"))
    model.plan = Plan.parse(plan)
    return model


def test_sizes_parse():
    assert parse_bytes("4GiB") == 4 * GiB
    assert parse_bytes("512 MiB") == 512 * MiB
    assert parse_bytes("2.5GB") == 2_500_000_000
    assert parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="cannot read '4 parsecs' as a memory size"):
        parse_bytes("4 parsecs")


@settings(max_examples=40, deadline=None)
@given(budget_mib=st.integers(1, 4096), context=st.sampled_from([256, 4096]))
def test_the_plan_fits_the_budget_or_names_the_minimum(budget_mib, context):
    model = mini_on_meta()
    budget = budget_mib * MiB
    try:
        plan = plan_memory(model, budget, context=context, prefill=512, image_patches=1024)
    except MemoryBudgetError as exc:
        assert "the minimum is" in str(exc) and "two streaming buffers" in str(exc)
        smallest = plan_memory(model, None, context=context, prefill=512, image_patches=1024)
        slack = max(64 * MiB, budget // 20)
        assert budget < smallest.fixed_bytes + smallest.workspace_bytes + smallest.kv_reserve_bytes + \
            smallest.buffer_bytes + slack
        return
    assert plan.device_bytes <= budget
    assert sorted(plan.resident_layers + plan.streamed_layers) == list(range(12))


def test_more_budget_keeps_more_layers_resident():
    model = mini_on_meta()
    counts = []
    for mib in (1200, 1400, 1700, 2100, 4000):
        plan = plan_memory(model, mib * MiB, context=1024, prefill=512, image_patches=1024)
        counts.append(len(plan.resident_layers))
    assert counts == sorted(counts) and counts[0] < counts[-1] == 12
    assert not plan.streamed_layers and plan.buffer_bytes == 0  # everything fits: nothing streams


def test_hierarchical_kv_needs_only_its_hot_window_on_the_device():
    flat = plan_memory(mini_on_meta(), None, context=32768)
    tiered = plan_memory(mini_on_meta("kv_cache=hierarchical_kv"), None, context=32768, kv_name="hierarchical_kv")
    assert tiered.kv_hot_tokens == 512 and tiered.kv_reserve_bytes < flat.kv_reserve_bytes / 8
    assert "hierarchical hot window 512 tokens" in tiered.report()


def test_memory_budget_flag_picks_the_offload_option():
    assert "memory=offload_disk[budget=4GiB]" in plan_with_budget(None, "4GiB", "cpu")
    assert "memory=offload_cpu[budget=2GiB]" in plan_with_budget("kv_cache=static", "2GiB", "cuda")
    assert "kv_cache=static" in plan_with_budget("kv_cache=static", "2GiB", "cuda")
    with pytest.raises(PlanError, match="explicit --plan"):
        plan_with_budget("auto", "2GiB", "cpu")


def test_a_budget_too_small_is_one_clear_error(capsys):
    code = main(["generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                 "--memory-budget", "1MiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "a device budget of 1.00 MiB is too small" in err and "the minimum is" in err
