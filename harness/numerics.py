"""Numerical contracts: every plan against the reference plan, and the invariants every plan must keep.

Rules (the project's bar):

- Exact plans (every option exact): fp32 relative error ``max|ours - ref| / max|ref| <= 1e-5``. In
  fp16/bf16 the FlashAttention rule: the plan's error against an fp32 reference may be at most twice
  the error of the reference plan computed in the same dtype against that fp32 reference.
- Approximate plans: every metric of the declared ``error_budget`` is measured and checked (a plan
  with several approximate options gets their budgets added: errors add to first order). In fp16/bf16
  the budget is widened by twice the reference plan's own figure in that dtype against fp32.
- Invariants, for every plan: causality (changing later tokens never changes earlier logits), batch
  independence, padding invariance, cache equivalence (prefill + decode == one full forward) and
  determinism (the same input twice gives bitwise the same logits). An invariant error must stay
  within ``max(floor(dtype), 2 x the reference plan's own error on the same input)``.

``check_plan`` runs these as a hypothesis property over generated prompts (batch, lengths, images,
padding, cut points, decode steps, dtypes); ``compare_models`` is the whole-model check of one model
against the reference on one fixed prompt (the accuracy suite).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure

from harness.results import Measurement
from harness.workload import (
    TEXT_VOCAB,
    Prompt,
    PromptSpec,
    RowSpec,
    build_prompt,
    extended,
    generate,
    left_padded,
    single_row,
)
from qwen3_vl.model.positions import InputError
from qwen3_vl.optim import Plan, get, reference_plan

EXACT_FP32 = 1e-5
# Error allowed in a check whatever the reference does; fp16 here is fp16 *storage* with fp32 compute.
FLOOR = {"fp32": 1e-5, "fp16": 1e-5, "bf16": 2e-2}
HIGHER_IS_BETTER = frozenset({"top1_agreement", "greedy_match"})
MEASURED = ("logits_rel", "logits_max_abs", "kl", "kl_max", "top1_agreement", "greedy_match")


# ---------------------------------------------------------------------------------------------
# Metrics


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| (inf when shapes differ, nan-safe)."""
    if out.shape != ref.shape:
        return math.inf
    out, ref = out.float(), ref.float()
    err = (out - ref).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-30) if math.isfinite(err) else math.inf


def logit_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """[N, V] logits of a plan vs the reference at the same N positions."""
    out, ref = out.float(), ref.float()
    logp_ref, logp_out = ref.log_softmax(-1), out.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_out)).sum(-1).clamp_min(0)
    return {
        "logits_rel": rel_error(out, ref),
        "logits_max_abs": (out - ref).abs().max().item(),
        "kl": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def plan_budget(plan: Plan) -> tuple[bool, dict[str, float]]:
    """(every option exact, combined budget). Budgets of several approximate options add up: lower-is-
    better metrics sum, agreement metrics lose the sum of their shortfalls. A metric that one of the
    approximate options declares no bound for has none in the combination either (rope=interpolated
    bounds KL and logits but not top-1: with it, kv_cache=hierarchical_kv's top-1 >= 0.95 cannot hold)."""
    budget: dict[str, float] = {}
    approximate = [get(axis, choice.name) for axis, choice in plan.choices if not get(axis, choice.name).exact]
    for opt in approximate:
        for metric, bound in opt.error_budget.items():
            if metric in HIGHER_IS_BETTER:
                budget[metric] = budget.get(metric, 1.0) - (1.0 - bound)
            else:
                budget[metric] = budget.get(metric, 0.0) + bound
    budget = {m: b for m, b in budget.items() if all(m in opt.error_budget for opt in approximate)}
    return not approximate, budget


def _within(metric: str, value: float, bound: float) -> bool:
    if not math.isfinite(value):
        return False
    return value >= bound if metric in HIGHER_IS_BETTER else value <= bound


def bounded_measurement(metric: str, value: float, bound: float | None, unit: str = "", what: str = "") -> Measurement:
    """``value`` with its bound: failed, naming both, when outside it (agreement metrics are lower bounds)."""
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    if bound is None:
        return Measurement(metric, value, unit, better=better)
    ok = _within(metric, value, bound)
    error = "" if ok else f"{what or metric} = {value:.3g}, {'below' if better == 'higher' else 'above'} {bound:.3g}"
    return Measurement(metric, value, unit, status="ok" if ok else "failed", error=error, bound=bound, better=better)


# ---------------------------------------------------------------------------------------------
# Logits a plan and the reference can be compared on


def _forward(model, prompt: Prompt) -> torch.Tensor:
    with torch.inference_mode():
        return model(prompt.input_ids, **prompt.inputs()).float().cpu()


def comparable(ours: torch.Tensor, theirs: torch.Tensor, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Both [N, V]: the logits at every real position, or, when either side returned fewer positions than
    the prompt has (a pruning option keeps only some visual rows), each row's last position only."""
    if ours.shape[1] == theirs.shape[1] == prompt.length:
        return ours[prompt.valid()], theirs[prompt.valid()]
    return ours[:, -1], theirs[:, -1]


def decode_pairs(ours: torch.Tensor, theirs: torch.Tensor, our_tokens: torch.Tensor, their_tokens: torch.Tensor):
    """Step logits of two greedy decodes, [B, N, V] each, flattened to the steps both took from the same
    context: every step up to and including the first one whose chosen tokens differ, per row."""
    keep = torch.ones(our_tokens.shape, dtype=torch.bool)
    differs = (our_tokens != their_tokens).int()
    before = differs.cumsum(1) - differs  # how many differing tokens came strictly before each step
    keep &= before == 0
    return ours[keep], theirs[keep]


# ---------------------------------------------------------------------------------------------
# Whole-model comparison on one prompt (the accuracy suite, per combination)


def _reference_outputs(reference, prompt: Prompt, new_tokens: int, fp32_reference, memo: dict | None) -> dict:
    """What the reference contributes to every comparison on this prompt (computed once per run)."""
    key = ("reference_outputs", id(reference), prompt.spec, new_tokens)
    if memo is not None and key in memo:
        return memo[key]
    tokens, steps, _ = generate(reference, prompt, new_tokens)
    out = {"prefill": _forward(reference, prompt), "tokens": tokens, "steps": steps}
    if fp32_reference is not None:
        out["prefill_fp32"] = _forward(fp32_reference(), prompt)
    if memo is not None:
        memo[key] = out
    return out


def budget_bounds(budget: dict[str, float], noise: dict[str, float]) -> dict[str, float]:
    """An approximate plan's budget in fp16/bf16: the declared bound widened by twice the reference's own
    figure in that dtype against fp32 (``noise``; empty in fp32), the FlashAttention rule applied on top."""
    return {metric: bound - 2 * (1.0 - noise.get(metric, 1.0)) if metric in HIGHER_IS_BETTER
            else bound + 2 * noise.get(metric, 0.0) for metric, bound in budget.items()}


# A few decode steps are too few positions to judge top-1 agreement by; the prefill's positions are not.
DECODE_CHECKED = ("logits_rel", "kl")


def compare_models(model, reference, prompt: Prompt, new_tokens: int, fp32_reference=None, memo: dict | None = None
                   ) -> list[tuple[str, Measurement]]:
    """``model`` vs ``reference`` (the reference plan, same device, dtype and weights) on ``prompt``:
    prefill logits, the step logits of a greedy decode (while both chose the same tokens) and the
    greedy tokens. In fp16/bf16 the verdict is ``prefill_vs_fp32``, against an fp32 reference
    (``fp32_reference()`` builds it): within twice the reference's own error (exact plans), or within the
    budget widened by that (approximate plans). Each value carries the bound it was held to; ``memo``
    keeps the reference's outputs between calls."""
    exact, budget = plan_budget(model.plan)
    dtype = model.target.dtype
    lowp = dtype != "fp32" and fp32_reference is not None
    ref = _reference_outputs(reference, prompt, new_tokens, fp32_reference if lowp else None, memo)
    noise = logit_metrics(*comparable(ref["prefill"], ref["prefill_fp32"], prompt)) if lowp else {}
    bounds = budget_bounds(budget, noise)
    out: list[tuple[str, Measurement]] = []

    def add(case: str, metrics: dict[str, float], checked: tuple[str, ...] | None = None) -> None:
        for metric, value in metrics.items():
            if exact:
                bound = EXACT_FP32 if metric == "logits_rel" and dtype == "fp32" and case != "prefill_vs_fp32" else None
            else:
                bound = bounds.get(metric) if checked is None or metric in checked else None
            out.append((case, bounded_measurement(metric, value, bound, "ratio" if "rel" in metric else "")))

    ours = _forward(model, prompt)
    tokens, steps, _ = generate(model, prompt, new_tokens)
    add("prefill", logit_metrics(*comparable(ours, ref["prefill"], prompt)), () if lowp else None)
    add("decode", logit_metrics(*decode_pairs(steps, ref["steps"], tokens, ref["tokens"])), DECODE_CHECKED)
    match = (tokens == ref["tokens"]).float().mean().item()
    greedy_bound = (1.0 if dtype == "fp32" else None) if exact else bounds.get("greedy_match")
    out.append(("generate", bounded_measurement("greedy_match", match, greedy_bound, "fraction")))
    if lowp:
        out.append(("prefill_vs_fp32", Measurement("reference_rel", noise["logits_rel"], "ratio", better="lower")))
        ours32 = logit_metrics(*comparable(ours, ref["prefill_fp32"], prompt))
        if exact:
            rule = max(FLOOR["fp32"], 2 * noise["logits_rel"])
            out.append(("prefill_vs_fp32", bounded_measurement("logits_rel", ours32["logits_rel"], rule, "ratio",
                                                    "error vs the fp32 reference (2x rule)")))
        else:
            add("prefill_vs_fp32", ours32)
    for metric in sorted(set(budget) - set(MEASURED)):
        out.append(("budget", Measurement(metric, None, status="failed", error=(
            f"the error budget names '{metric}', which the harness does not measure "
            f"(it measures: {', '.join(MEASURED)})"))))
    return out


# ---------------------------------------------------------------------------------------------
# Invariants: each returns the plan's error on one prompt (None when not applicable)


def causality_error(model, prompt: Prompt, suffix: int, full: torch.Tensor) -> float | None:
    """Relative change of the logits before the last ``suffix`` columns when those tokens change."""
    if full.shape[1] != prompt.length:
        return None  # positions are not comparable one to one (pruned rows)
    changed = prompt.input_ids.clone()
    changed[:, -suffix:] = (changed[:, -suffix:] + 1) % TEXT_VOCAB
    other = _forward(model, Prompt(prompt.spec, changed, prompt.attention_mask, prompt.pixel_values,
                                   prompt.image_grid_thw, prompt.real_lengths, prompt.row_image))
    keep = prompt.valid().clone()
    keep[:, -suffix:] = False
    return rel_error(other[keep], full[keep])


def batch_error(model, prompt: Prompt, full: torch.Tensor) -> float | None:
    """Each row alone vs the same row inside the batch."""
    if prompt.batch == 1:
        return None
    worst = 0.0
    for b in range(prompt.batch):
        alone = single_row(prompt, b, model.config.pad_token_id)
        logits = _forward(model, alone)
        if full.shape[1] == prompt.length and logits.shape[1] == alone.length:
            worst = max(worst, rel_error(logits[0], full[b][prompt.valid()[b]]))
        else:  # pruned rows: each row's next-token distribution
            worst = max(worst, rel_error(logits[0, -1], full[b, -1]))
    return worst


def padding_error(model, prompt: Prompt, pad: int, full: torch.Tensor) -> float:
    """The same rows with ``pad`` more pad tokens on the left."""
    padded = left_padded(prompt, pad, model.config.pad_token_id)
    logits = _forward(model, padded)
    if full.shape[1] == prompt.length and logits.shape[1] == padded.length:
        return rel_error(logits[:, pad:][prompt.valid()], full[prompt.valid()])
    return rel_error(logits[:, -1], full[:, -1])


def cache_error(model, prompt: Prompt, steps: int) -> float:
    """A cached greedy decode of ``steps`` tokens vs one full forward over the prompt and those tokens."""
    tokens, step_logits, _ = generate(model, prompt, steps)
    whole = _forward(model, extended(prompt, tokens[:, :-1]))
    return rel_error(step_logits, whole[:, -steps:])


def determinism_error(model, prompt: Prompt, full: torch.Tensor) -> float:
    again = _forward(model, prompt)
    return math.inf if again.shape != full.shape else (again - full).abs().max().item()


INVARIANTS = ("causality", "batch_independence", "padding_invariance", "cache_equivalence", "determinism")


# ---------------------------------------------------------------------------------------------
# Property-based contract of one plan


GRIDS = ((2, 2), (2, 4), (4, 2), (4, 4), (4, 6), (6, 4))


@st.composite
def prompt_specs(draw, max_batch: int = 2) -> PromptSpec:
    rows = []
    for _ in range(draw(st.integers(1, max_batch))):
        grid = draw(st.none() | st.sampled_from(GRIDS))
        rows.append(RowSpec(draw(st.integers(1, 6)), grid, draw(st.integers(1, 5))))
    return PromptSpec(tuple(rows), seed=draw(st.integers(0, 2**16)))


@dataclass
class Worst:
    """The worst value seen for one check across examples, with the bound it was held to."""

    metric: str
    value: float | None = None
    bound: float | None = None
    failures: dict[str, str] = field(default_factory=dict)  # example -> message (a replay is not counted twice)

    def update(self, value: float, bound: float, ok: bool, example: str) -> None:
        if not ok:
            if not self.failures:  # report the first failing example's figures
                self.value, self.bound = value, bound
            self.failures[example] = f"{value:.3g} vs bound {bound:.3g} at {example}"
            return
        if self.failures:
            return
        higher = self.metric in HIGHER_IS_BETTER
        if self.value is None or (value < self.value if higher else value > self.value):
            self.value, self.bound = value, bound


@dataclass
class Pooled:
    """An agreement fraction pooled over every compared position of every example (one short prompt's
    two or three positions say little about top-1 agreement; the pool does)."""

    metric: str
    hits: float = 0.0
    positions: int = 0
    bound_sum: float = 0.0

    def update(self, value: float, bound: float, positions: int) -> None:
        self.hits += value * positions
        self.positions += positions
        self.bound_sum += bound * positions

    def measurement(self) -> Measurement:
        if not self.positions:
            return Measurement(self.metric, None, status="skipped", error="no generated example exercised this check")
        value, bound = self.hits / self.positions, self.bound_sum / self.positions
        ok = _within(self.metric, value, bound)
        error = "" if ok else f"{value:.3g} over {self.positions} positions, below {bound:.3g}"
        return Measurement(self.metric, value, "fraction", status="ok" if ok else "failed", error=error, bound=bound,
                           better="higher")


class Models:
    """Models of one config built on demand per (plan, dtype) from shared weights, kept for reuse."""

    def __init__(self, build: Callable[[Plan, str], object]) -> None:
        self._build = build
        self._cache: dict[tuple[str, str], object] = {}

    def __call__(self, plan: Plan, dtype: str):
        key = (plan.id, dtype)
        if key not in self._cache:
            self._cache[key] = self._build(plan, dtype)
        return self._cache[key]

    def forget(self, plan: Plan) -> None:
        for key in [k for k in self._cache if k[0] == plan.id]:
            del self._cache[key]


def _describe_crash(exc: BaseException) -> str:
    notes = " ".join(getattr(exc, "__notes__", []))
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}: {exc} {notes}".strip()


def check_plan(
    plan: Plan,
    models: Models,
    config,
    dtypes: list[str],
    examples: int = 6,
    shrink: bool = False,
) -> list[tuple[str, Measurement]]:
    """Run the contract of ``plan`` as a hypothesis property; (case, measurement) per check.

    Cases: ``contract_agreement_prefill``/``_decode`` (vs the reference plan; one per budget metric for
    approximate plans, agreement fractions pooled over every position; none for the reference itself)
    and one per invariant. An invariant's bound is ``max(floor(dtype), 2 x the reference's error on the
    same input)`` (determinism: bitwise), widened to the declared ``logits_rel`` budget for approximate
    plans. A crash fails every check; an input the plan declines with ``InputError`` (a declared
    limitation, e.g. no padded batches) skips that check on that input, counted in ``contract_input_support``.
    """
    reference = reference_plan()
    is_reference = plan == reference
    exact, budget = plan_budget(plan)
    approx_metrics = sorted(set(budget) & {"logits_rel", "kl", "top1_agreement"})
    worst: dict[str, Worst] = {name: Worst("max_abs" if name == "determinism" else "rel_error")
                               for name in INVARIANTS}
    pooled: dict[str, Pooled] = {}
    if not is_reference:
        for phase in ("agreement_prefill", "agreement_decode"):
            if exact:
                worst[phase] = Worst("logits_rel")
            for metric in approx_metrics:
                if metric in HIGHER_IS_BETTER:
                    if phase == "agreement_prefill":
                        pooled[f"{phase}:{metric}"] = Pooled(metric)
                elif phase == "agreement_prefill" or metric in DECODE_CHECKED:
                    worst[f"{phase}:{metric}"] = Worst(metric)
    refused: list[str] = []  # inputs the plan declined with an InputError (a declared limitation)

    def invariant(name: str, dtype: str, measure, label: str) -> bool:
        """Measure on the plan; only when above the floor also on the reference (the 2x rule)."""
        try:
            value = measure(models(plan, dtype))
        except InputError as exc:
            refused.append(f"{name} at {label}: {exc}")
            return True
        if value is None:
            return True
        bound = 0.0 if name == "determinism" else FLOOR[dtype]
        if name != "determinism" and value > bound and not is_reference:
            ref_value = measure(models(reference, dtype))
            bound = max(bound, 2 * (ref_value or 0.0))
            if not exact:
                bound = max(bound, budget.get("logits_rel", 0.0))
        ok = value <= bound
        worst[name].update(value, bound, ok, label)
        return ok

    def agreement(dtype: str, prompt: Prompt, steps: int, label: str, full) -> bool:
        model, ref = models(plan, dtype), models(reference, dtype)
        try:
            our_tokens, our_steps, _ = generate(model, prompt, steps)
            full(model)
        except InputError as exc:
            refused.append(f"agreement at {label}: {exc}")
            return True
        ref_tokens, ref_steps, _ = generate(ref, prompt, steps)
        pairs = {"agreement_prefill": comparable(full(model), full(ref), prompt),
                 "agreement_decode": decode_pairs(our_steps, ref_steps, our_tokens, ref_tokens)}
        allowance = EXACT_FP32
        if dtype != "fp32" and exact:
            # FlashAttention rule: the prefill against the fp32 reference, within twice the same-dtype
            # reference's own error; decode steps (whose fp32 context would differ once a token does)
            # against the same-dtype reference, within the same allowance.
            ref32 = models(reference, "fp32")
            allowance = max(FLOOR["fp32"], 2 * rel_error(*comparable(full(ref), full(ref32), prompt)))
            pairs["agreement_prefill"] = comparable(full(model), full(ref32), prompt)
        ok = True
        bounds = budget
        if dtype != "fp32" and not exact:  # the budget on top of the dtype's own error, prefill against fp32
            ref32 = models(reference, "fp32")
            bounds = budget_bounds(budget, logit_metrics(*comparable(full(ref), full(ref32), prompt)))
            pairs["agreement_prefill"] = comparable(full(model), full(ref32), prompt)
        for phase, (a, b) in pairs.items():
            if not exact:
                metrics = logit_metrics(a, b)
                for metric in approx_metrics:
                    if metric in HIGHER_IS_BETTER:
                        if phase == "agreement_prefill":
                            pooled[f"{phase}:{metric}"].update(metrics[metric], bounds[metric], a.shape[0])
                        continue
                    if phase == "agreement_decode" and metric not in DECODE_CHECKED:
                        continue
                    passed = _within(metric, metrics[metric], bounds[metric])
                    worst[f"{phase}:{metric}"].update(metrics[metric], bounds[metric], passed, label)
                    ok &= passed
                continue
            value, bound = rel_error(a, b), allowance
            passed = value <= bound
            worst[phase].update(value, bound, passed, label)
            ok &= passed
        return ok

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else []),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], report_multiple_bugs=False)
    @given(spec=prompt_specs(), dtype=st.sampled_from(dtypes), suffix=st.integers(1, 4),
           steps=st.integers(1, 3), pad=st.integers(1, 3))
    def prop(spec, dtype, suffix, steps, pad):
        label = f"{spec} dtype={dtype} suffix={suffix} steps={steps} pad={pad}"
        prompt = build_prompt(config, spec)
        cut = max(0, min(suffix, min(r.text_after for r in spec.rows), min(prompt.real_lengths) - 1))
        full: dict[int, torch.Tensor] = {}

        def on(m):  # the full-prompt logits of a model, computed once per example
            if id(m) not in full:
                full[id(m)] = _forward(m, prompt)
            return full[id(m)]

        ok = True
        if not is_reference:  # at least two steps: the second is the first read back from the cache
            ok &= agreement(dtype, prompt, steps + 1, label, on)
        if cut:
            ok &= invariant("causality", dtype, lambda m: causality_error(m, prompt, cut, on(m)), label)
        ok &= invariant("cache_equivalence", dtype, lambda m: cache_error(m, prompt, steps + 1), label)
        ok &= invariant("batch_independence", dtype, lambda m: batch_error(m, prompt, on(m)), label)
        ok &= invariant("padding_invariance", dtype, lambda m: padding_error(m, prompt, pad, on(m)), label)
        ok &= invariant("determinism", dtype, lambda m: determinism_error(m, prompt, on(m)), label)
        assert ok, "contract violated"

    crash = ""
    try:
        prop()
    except Exception as exc:
        violated = any(w.failures for w in worst.values())
        if not (violated and isinstance(exc, (AssertionError, FlakyFailure))):
            crash = _describe_crash(exc)  # the plan crashed on some input: that fails every check
    out = []
    for case, w in worst.items():
        if crash:
            out.append((f"contract_{case}", Measurement(w.metric, w.value, status="failed", error=crash)))
        elif w.value is None:
            out.append((f"contract_{case}", Measurement(w.metric, None, status="skipped",
                                                         error="no generated example exercised this check")))
        else:
            first = next(iter(w.failures.values()), "")
            error = "" if not w.failures else f"{len(w.failures)} failing example(s); first: {first}"
            out.append((f"contract_{case}", Measurement(
                w.metric, w.value, "ratio" if w.metric != "max_abs" else "", status="failed" if w.failures else "ok",
                error=error, bound=w.bound, better="higher" if w.metric in HIGHER_IS_BETTER else "lower")))
    for case, p in pooled.items():
        out.append((f"contract_{case}", Measurement(p.metric, None, status="failed", error=crash) if crash
                    else p.measurement()))
    if refused:
        out.append(("contract_input_support", Measurement(
            "refused_checks", len(refused), "", status="skipped",
            error=f"the plan refused {len(refused)} check(s) on generated inputs (InputError); first: {refused[0]}")))
    return out
