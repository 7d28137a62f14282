"""Plans: ids, parsing, validation, and resolution with recorded fallbacks."""

from __future__ import annotations

import json

import pytest

from qwen3_vl.optim import registry
from qwen3_vl.optim.plan import (
    Choice,
    Optimization,
    Plan,
    PlanError,
    Requirements,
    Target,
    make_plan,
    resolve,
)


def test_reference_plan_id_is_stable():
    plan = registry.reference_plan()
    assert plan.id.startswith("attention=eager,rope=standard,kv_cache=dynamic,memory=resident,quant=none,vision=full")
    assert plan.short_id == "reference"
    assert Plan.parse(plan.id) == plan == Plan.parse("reference") == Plan.parse("")


def test_plans_are_hashable_and_serialisable():
    plan = registry.reference_plan()
    assert len({plan, Plan.parse(plan.id)}) == 1
    assert make_plan(json.loads(plan.to_json())) == plan


def test_choice_parameters_round_trip():
    choice = Choice.parse("block_sparse[window=64;density=0.5;sinks=(1 2);on=true]")
    assert choice.kwargs == {"density": 0.5, "window": 64, "sinks": (1, 2), "on": True}
    assert Choice.parse(str(choice)) == choice


@pytest.mark.parametrize(("text", "message"), [
    ("attentio=eager", "unknown axis 'attentio'; axes are: attention"),
    ("attention=fast", "unknown option 'fast' for axis 'attention'; options are: eager"),
    ("attention=eager[tile=4]", r"attention=eager has no parameter 'tile' \(parameters: none\)"),
    ("execution=compile[gemv=False]", "execution=compile parameter 'gemv' takes true or false; got 'False'"),
    ("execution=compile[fold=true,gemv=false]", r"separated by .;., not .,. \(e.g. compile\[a=1;b=2\]\)"),
    ("execution=compile[bucket=2.5]", "execution=compile parameter 'bucket' takes an integer; got '2.5'"),
    ("attention", "expected axis=option"),
    ("attention=eager,attention=eager", "given twice"),
    ("attention=Eager!", "cannot parse option"),
])
def test_bad_plans_say_what_is_wrong(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.parse(text)


@pytest.fixture()
def fake_attention(monkeypatch):
    """Two extra attention options: 'needs_gpu' falls back to 'picky', which falls back to eager."""
    options = dict(registry._load())
    build = lambda model, target: None
    options[("attention", "picky")] = Optimization(
        "picky", "attention", True, "test", build, requires=Requirements(dtypes=("fp32",)), fallback="eager")
    options[("attention", "needs_gpu")] = Optimization(
        "needs_gpu", "attention", True, "test", build,
        requires=Requirements(devices=("cuda",), min_compute_capability=(8, 0)), fallback="picky")
    options[("attention", "stranded")] = Optimization(
        "stranded", "attention", True, "test", build, requires=Requirements(devices=("cuda",)))
    options[("attention", "clashing")] = Optimization(
        "clashing", "attention", True, "test", build, conflicts=("rope=standard",))
    monkeypatch.setattr(registry, "_OPTIONS", options)


def test_fallback_chain_is_recorded(fake_attention):
    plan = Plan.parse("attention=needs_gpu")
    used, records = resolve(plan, Target(device="cpu", dtype="bf16"))
    assert used["attention"] == Choice("eager")
    assert [(r.requested, r.used) for r in records] == [("needs_gpu", "picky"), ("picky", "eager")]
    assert "needs device cuda, target is cpu" in records[0].reason
    assert "supports dtypes fp32, not bf16" in records[1].reason


def test_compute_capability_requirement(fake_attention):
    pascal = Target(device="cuda:0", dtype="fp32", compute_capability=(6, 1))
    used, records = resolve(Plan.parse("attention=needs_gpu"), pascal)
    assert used["attention"] == Choice("picky")
    assert "needs compute capability >= 8.0, GPU has 6.1" in records[0].reason
    used, records = resolve(Plan.parse("attention=needs_gpu"), Target("cuda:0", "fp32", (9, 0)))
    assert used["attention"] == Choice("needs_gpu") and records == []


def test_chain_without_fallback_is_an_error(fake_attention):
    with pytest.raises(PlanError, match=r"stranded is unavailable .* and has no fallback left"):
        resolve(Plan.parse("attention=stranded"), Target())


def test_conflicts_are_refused(fake_attention):
    with pytest.raises(PlanError, match="attention=clashing conflicts with rope=standard"):
        resolve(Plan.parse("attention=clashing"), Target())


def test_exactness_declarations_are_enforced():
    build = lambda model, target: None
    with pytest.raises(PlanError, match="must declare an error budget"):
        Optimization("x", "attention", False, "s", build)
    with pytest.raises(PlanError, match="exact option declares no error budget"):
        Optimization("x", "attention", True, "s", build, error_budget={"kl": 1e-3})


def test_every_registered_option_is_well_formed():
    for opt in registry.all_options():
        assert opt.summary, opt.name
        assert opt.exact or opt.error_budget, opt.name
        if opt.fallback is not None:
            registry.get(opt.axis, opt.fallback)
        for entry in opt.conflicts:
            axis, name = entry.split("=")
            registry.get(axis, name)
        for variant in opt.variants:
            assert set(variant) <= set(opt.defaults), (opt.name, variant)


def test_failure_text_keeps_the_cause_at_the_end_of_a_long_message():
    from qwen3_vl.optim.plan import failure_text

    assert failure_text(ValueError("short\nmessage")) == "ValueError: short\nmessage"
    assert failure_text(KeyError()) == "KeyError"
    long = RuntimeError("\n".join(["generic first line", *("x" * 50 for _ in range(100)), "the cause"]))
    text = failure_text(long, limit=300)
    assert len(text) <= 300
    assert text.startswith("RuntimeError: generic first line\n...\n") and text.endswith("\nthe cause")
