"""Visual token pruning: time to first token and error against the reference at each keep ratio.

Runs under ``--suites vision_pruning`` on ``suites/vision.py``'s prompt (one 448x448 image, 196 visual
tokens), interleaved with the reference plan. ``track_pruning_error`` holds a pruning plan to its
option's error budget, measured at the text positions after the image (the positions both models
compute) and over 4 decode steps of the reference's greedy tokens. Example, stored through the harness::

    python -m harness validate --preset mini --device cpu --suites vision_pruning \\
        --plan 'vision=prune_fastv[ratio=0.5]' --plan 'vision=prune_pre[ratio=0.5]'
"""

from __future__ import annotations

from harness.numerics import HIGHER_IS_BETTER
from harness.results import Measurement
from suites.vision import fresh_image_ttft, pruning_error, shared_prompt

PART = "vision_pruning"


def time_ttft(bench, clock) -> None:
    """TTFT for an image not seen before: ViT, pruning, prefill of the kept tokens, the first token."""
    fresh_image_ttft(bench, clock)


def track_pruning_error(bench):
    """KL, top-1 agreement and relative logits error vs the reference, against the option's budget."""
    from qwen3_vl.optim import get

    option = get("vision", bench.model.plan["vision"].name)
    if bench.is_reference or option.exact:
        return []
    measured = pruning_error(bench.model, bench.reference, shared_prompt(bench))
    out = []
    for name, value in measured.items():
        phase, _, metric = name.partition("_")
        bound = option.error_budget.get(metric)
        better = "higher" if metric in HIGHER_IS_BETTER else "lower"
        ok = bound is None or (value >= bound if better == "higher" else value <= bound)
        error = "" if ok else f"{metric} = {value:.3g} vs budget {bound:.3g}"
        out.append((f"pruning_{phase}", Measurement(metric, value, "ratio" if "rel" in metric else "",
                                                    status="ok" if ok else "failed", error=error,
                                                    bound=bound, better=better)))
    kept = getattr(bench.model.vision, "kept", None)
    if kept:
        out.append(("pruning_prefill", Measurement("visual_tokens_kept", float(kept[0]), "tokens")))
    return out
