"""KV options inside the model: a seeded two-row multimodal conversation (padding, two images, 64
greedy decode steps, a second 8-token turn, 8 more steps), teacher-forced with the reference's
tokens so every compared next-token distribution has the same context."""

from __future__ import annotations

import functools

import pytest
import torch

import qwen3_vl
from qwen3_vl.optim import registry

from .drive import compare, conversation, prompt, reference, within_budget

SEED = 0


SINGLE, PADDED = prompt("single"), prompt("padded")


@functools.cache
def run(plan: str, which: str = "single"):
    model = qwen3_vl.from_pretrained("tiny", seed=SEED, plan=plan)
    logits, _, cache = conversation(model, prompt(which), tokens=reference(which)[1])
    return logits, cache


def test_static_is_bitwise_equal_to_the_reference():
    logits, cache = run("kv_cache=static", "padded")
    assert torch.equal(logits, reference("padded")[0])
    assert cache.seen_tokens == PADDED.input_ids.shape[1] + 80


APPROXIMATE = [
    "kv_cache=quant_int8",
    "kv_cache=quant_int4",
    "kv_cache=hierarchical_kv[hot=32;warm=64]",
    "kv_cache=sink_window[window=172]",  # keeps 176 of 206 tokens (the budgets' operating point)
    "kv_cache=h2o[budget=176;recent=88]",
    "kv_cache=cross_layer[retain_below=-1.0]",  # pure merging: the failure case, measured
]


@pytest.mark.parametrize("plan", APPROXIMATE)
def test_measured_error_is_within_the_declared_budget(plan):
    logits, cache = run(plan)
    metrics = compare(logits, reference("single")[0])
    option = registry.get("kv_cache", qwen3_vl.Plan.parse(plan)["kv_cache"].name)
    print(f"{plan}: {metrics}, KV {cache.nbytes()} bytes")
    assert not within_budget(metrics, option.error_budget), within_budget(metrics, option.error_budget)
    assert metrics["kl"] > 0 or metrics["logits_rel"] > 0  # it did compress something


@pytest.mark.parametrize("small,large", [("sink_window[window=60]", "sink_window[window=172]"),
                                         ("h2o[budget=64;recent=32]", "h2o[budget=176;recent=88]")])
def test_a_bigger_budget_gives_a_smaller_error(small, large):
    errors = [compare(run(f"kv_cache={p}")[0], reference("single")[0])["kl"] for p in (small, large)]
    assert errors[0] > 2 * errors[1]
