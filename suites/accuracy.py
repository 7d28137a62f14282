"""Accuracy: each combination's logits and greedy tokens against the reference plan (whole model).

Runs under ``--suites numerics``. Exact plans must match to fp32 relative error 1e-5 with identical
greedy tokens (in fp16/bf16: at most twice the reference's own error against fp32); approximate plans
are held to their declared error budgets. The figures are stored either way, so error can be plotted
beside latency and memory for every combination.
"""

from __future__ import annotations

from harness.numerics import compare_models

PART = "numerics"


def track_logits_vs_reference(bench):
    """Prefill logits, teacher-forced decode logits and greedy tokens vs the reference plan."""
    if bench.is_reference:
        return []
    return compare_models(bench.model, bench.reference, bench.prompt, bench.new_tokens,
                          fp32_reference=bench.fp32_reference, memo=bench.shared)
