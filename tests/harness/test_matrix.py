"""The combination matrix: everything the registry allows, skip reasons kept, pairwise coverage, shards."""

from __future__ import annotations

import itertools
import json

import pytest

from harness import matrix
from qwen3_vl.optim import Optimization, Plan, PlanError, Requirements, Target, reference_plan
from qwen3_vl.optim.attention.eager import EagerAttention

from . import faults


def option(name, axis="attention", **kw):
    return Optimization(name=name, axis=axis, exact=True, summary="test", build=lambda m, t: EagerAttention(), **kw)


@pytest.fixture
def small_registry(references_only, extra_options):
    """attention: eager, fast (CUDA only), swept (two variants), clashing (conflicts with kv_cache=swapped);
    kv_cache: dynamic, swapped; every other axis only its reference."""
    extra_options(
        option("fast", requires=Requirements(devices=("cuda",))),
        option("swept", defaults={"block": 16}, variants=({"block": 16}, {"block": 32})),
        option("clashing", conflicts=("kv_cache=swapped",)),
        faults.SWAPPED_CACHE,
    )


CPU = Target("cpu")


def test_full_product_with_reasons(small_registry):
    combos = matrix.full(CPU)
    # attention=fast cannot run on a CPU: listed once, not once per kv_cache choice; then
    # eager, swept, swept[block=32], clashing  x  dynamic, swapped
    assert len(combos) == 1 + 4 * 2
    by_id = {c.plan.short_id: c for c in combos}
    assert by_id["reference"].runnable
    assert "needs device cuda" in by_id["attention=fast"].reason
    assert "rules out 2 combinations" in by_id["attention=fast"].reason
    assert "conflicts with kv_cache=swapped" in by_id["attention=clashing,kv_cache=swapped"].reason
    assert by_id["attention=clashing"].runnable
    assert "attention=swept[block=32]" in by_id  # the default variant is spelled as the bare name
    assert "attention=swept" in by_id


def test_options_added_later_appear_without_harness_changes(small_registry, extra_options):
    before = len(matrix.full(CPU))
    extra_options(option("brand_new"))
    assert len(matrix.full(CPU)) == before + 2  # one more attention choice times two kv_cache choices


def test_pairwise_covers_every_feasible_pair(small_registry):
    combos = matrix.full(CPU)
    runnable = [c.plan for c in combos if c.runnable]
    chosen = [c.plan for c in matrix.pairwise(CPU) if c.runnable]
    assert chosen[0] == reference_plan()
    needed = set().union(*(set(itertools.combinations(p.choices, 2)) for p in runnable))
    covered = set().union(*(set(itertools.combinations(p.choices, 2)) for p in chosen))
    assert needed <= covered
    assert chosen == [c.plan for c in matrix.pairwise(CPU) if c.runnable]  # deterministic


def test_pairwise_on_the_real_registry_is_much_smaller_and_complete():
    runnable = [c.plan for c in matrix.full(CPU) if c.runnable]
    cover = matrix.cover(runnable)
    needed = set().union(*(set(itertools.combinations(p.choices, 2)) for p in runnable))
    covered = set().union(*(set(itertools.combinations(p.choices, 2)) for p in cover))
    assert needed == covered
    assert len(cover) <= max(len(runnable), 1)


def test_shards_are_disjoint_complete_and_balanced(small_registry):
    combos = matrix.full(CPU)
    parts = [matrix.shard(combos, i, 3) for i in (1, 2, 3)]
    ids = [c.plan.id for part in parts for c in part]
    assert sorted(ids) == sorted(c.plan.id for c in combos) and len(set(ids)) == len(ids)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0] == matrix.shard(combos, 1, 3)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1/0", "a/b", "2", ""])
def test_bad_shard_specs(spec):
    with pytest.raises(ValueError, match="invalid shard"):
        matrix.parse_shard(spec)


def test_option_filter(small_registry):
    assert matrix.parse_option("attention=swept") == ("attention", "swept")
    kept = matrix.only(matrix.full(CPU), [("attention", "swept")])
    assert {c.plan["attention"].name for c in kept} == {"swept"} and len(kept) == 4
    with pytest.raises(PlanError, match="options are"):
        matrix.parse_option("attention=nope")
    with pytest.raises(PlanError, match="axes are"):
        matrix.parse_option("nope=eager")


def test_the_matrix_command_lists_plans_with_status_and_reasons(capsys):
    """``python -m harness matrix``: every combination with its plan id and run / skipped: reason."""
    from harness.__main__ import main as cli

    assert cli(["matrix", "--mode", "pairwise", "--device", "cpu", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    runnable = [c for c in listed if c["status"] == "run"]
    skipped = [c for c in listed if c["status"] != "run"]
    assert runnable[0]["plan_id"] == reference_plan().id  # the reference plan first
    assert len(runnable) > 20 and all(Plan.parse(c["plan_id"]).id == c["plan_id"] for c in runnable)
    assert skipped and all(c["reason"] for c in skipped)
    assert any("needs device cuda" in c["reason"] or "cuda" in c["reason"] for c in skipped)
    assert cli(["matrix", "--shard", "2/1"]) == 2
