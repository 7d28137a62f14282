"""The combination matrix: every plan the registry allows, with a reason for each one that cannot run.

Everything comes from the registry (``qwen3_vl.optim``): the axes, each axis's options, each option's
``variants`` (parameter sets to sweep), its declared ``conflicts``/``needs`` (``conflicts_of``) and its
availability on the target (``Optimization.unavailable``). An option registered tomorrow shows up here
with no change. An option unavailable on the target is listed once with its reason and the number of
combinations it rules out (not once per combination: on a CPU that was 180 000 of 200 000 lines).

Modes: ``full`` is the Cartesian product; ``pairwise`` is a covering array that contains every
feasible pair of choices from two different axes at least once (greedy set cover over the valid
combinations, deterministic), plus the reference plan. ``shard(i, n)`` splits either list
round-robin in a fixed order, so a fleet of machines runs disjoint parts of one matrix.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qwen3_vl.optim import (
    AXES,
    Choice,
    Plan,
    PlanError,
    Target,
    conflicts_of,
    get,
    make_plan,
    options,
    reference_plan,
)

MODES = ("full", "pairwise")


@dataclass(frozen=True)
class Combination:
    plan: Plan
    status: str  # "run" or "skipped"
    reason: str = ""

    @property
    def runnable(self) -> bool:
        return self.status == "run"


def choices(axis: str) -> list[Choice]:
    """Every choice of one axis: each option once per declared variant (parameters equal to the
    option's defaults are dropped, so the default variant is spelled as the bare option name).
    Each is validated against the registry once (an unknown parameter raises ``PlanError``)."""
    out: list[Choice] = []
    for opt in options(axis):
        for variant in opt.variants or ({},):
            params = tuple(sorted((k, v) for k, v in variant.items() if opt.defaults.get(k, object()) != v))
            choice = Choice(opt.name, params)
            if choice not in out:
                make_plan({axis: choice})
                out.append(choice)
    return out


def _availability(target: Target, cache: dict | None, axis: str, name: str) -> str:
    """Why option ``axis=name`` cannot run on ``target`` ("" when it can); memoised in ``cache``: an
    option's availability depends on the target alone, and probes may be slow."""
    key = (axis, name)
    if cache is None or key not in cache:
        why = get(axis, name).unavailable(target)
        reason = f"{axis}={name} unavailable on {target.device}/{target.dtype}: {why}" if why else ""
        if cache is None:
            return reason
        cache[key] = reason
    return cache[key]


def unavailable_reason(plan: Plan, target: Target, cache: dict | None = None) -> str:
    """Why the plan cannot run on ``target`` (conflicts first, then availability); "" when it can."""
    reasons = conflicts_of(plan)
    for axis, choice in plan.choices:
        why = _availability(target, cache, axis, choice.name)
        if why:
            reasons.append(why)
    return "; ".join(reasons)


def classify(plan: Plan, target: Target, cache: dict | None = None) -> Combination:
    reason = unavailable_reason(plan, target, cache)
    return Combination(plan, "skipped" if reason else "run", reason)


def full(target: Target) -> list[Combination]:
    """Every combination in registry order, each marked run or skipped with its reason.

    An option unavailable on the target rules out every combination holding it, so it is listed once,
    as its own plan (every other axis at the reference), with the number of combinations it rules out;
    the product of the available choices follows, each combination checked for conflicts.
    """
    per_axis = [choices(axis) for axis in AXES]
    cache: dict = {}
    available = [[c for c in cs if not _availability(target, cache, a, c.name)] for a, cs in zip(AXES, per_axis,
                                                                                                strict=True)]
    total = math.prod(len(cs) for cs in per_axis)
    out = []
    reference = reference_plan()
    for axis, cs, ok in zip(AXES, per_axis, available, strict=True):
        for choice in cs:
            if choice in ok:
                continue
            ruled_out = total // len(cs)
            reason = f"{_availability(target, cache, axis, choice.name)} (rules out {ruled_out} combinations)"
            out.append(Combination(reference.with_(**{axis: choice}), "skipped", reason))
    # Choices are validated once in ``choices``; a plan of one valid choice per axis needs no make_plan.
    for combo in itertools.product(*available):
        out.append(classify(Plan(tuple(zip(AXES, combo, strict=True))), target, cache))
    return out


def cover(plans: Sequence[Plan], first: Plan | None = None) -> list[Plan]:
    """A subset of ``plans`` holding every pair of choices that occurs in ``plans`` at least once.

    Greedy set cover (take the plan covering most uncovered pairs, the earliest on ties), evaluated
    lazily with a heap: a plan's count only shrinks, so a popped count that is still current is the
    maximum. Deterministic for a given list. ``first`` (when in ``plans``) is taken before the rest.
    """
    ids: dict[tuple[str, Choice], int] = {}  # every (axis, choice) as a small int, every pair as one int
    pair_sets = []
    for plan in plans:
        items = sorted(ids.setdefault(item, len(ids)) for item in plan.choices)
        pair_sets.append({a * 1_000_003 + b for a, b in itertools.combinations(items, 2)})
    uncovered = set().union(*pair_sets) if pair_sets else set()
    chosen: list[int] = []
    if first is not None and first in plans:
        chosen.append(plans.index(first))
        uncovered -= pair_sets[chosen[0]]
    heap = [(-len(pairs & uncovered), i) for i, pairs in enumerate(pair_sets) if i not in chosen]
    heapq.heapify(heap)
    while uncovered and heap:
        score, i = heapq.heappop(heap)
        current = len(pair_sets[i] & uncovered)
        if current == 0:
            continue
        if current != -score:
            heapq.heappush(heap, (-current, i))
            continue
        chosen.append(i)
        uncovered -= pair_sets[i]
    return [plans[i] for i in chosen]


def pairwise(target: Target) -> list[Combination]:
    """A covering array: every pair of choices that occurs in some runnable combination occurs in one
    selected combination. The reference plan comes first; skipped combinations of the full product
    are listed after the selection, so every skip reason stays visible."""
    everything = full(target)
    runnable = [c for c in everything if c.runnable]
    by_plan = {c.plan: c for c in runnable}
    selected = [by_plan[p] for p in cover([c.plan for c in runnable], first=reference_plan())]
    return selected + [c for c in everything if not c.runnable]


def cover_first(plans: Sequence[Plan]) -> tuple[list[Plan], int]:
    """``plans`` reordered so that a pairwise cover of them comes first; (order, size of the cover).
    A run cut short by its time budget then still holds every pair of choices."""
    head = cover(plans, first=reference_plan())
    taken = set(head)
    return head + [p for p in plans if p not in taken], len(head)


def build(mode: str, target: Target) -> list[Combination]:
    if mode not in MODES:
        raise ValueError(f"unknown matrix mode '{mode}'; modes are: {', '.join(MODES)}")
    return full(target) if mode == "full" else pairwise(target)


# ---------------------------------------------------------------------------------------------
# Selection: sharding and filters


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` with 1 <= i <= n -> (i, n)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not match:
        raise ValueError(f"invalid shard '{spec}': expected i/n, e.g. 1/4")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"invalid shard '{spec}': need 1 <= i <= n (shards are numbered from 1)")
    return index, count


def shard(items: Sequence, index: int, count: int) -> list:
    """Items index-1, index-1+count, ...: round-robin over a fixed order, so shards are disjoint,
    cover everything and get the same amount of work to within one item."""
    return list(items[index - 1 :: count])


def parse_option(spec: str) -> tuple[str, str]:
    """``"axis=option"`` checked against the registry (PlanError names the valid ones)."""
    if "=" not in spec:
        raise PlanError(f"cannot parse option filter '{spec}': expected axis=option, e.g. attention=sdpa")
    axis, name = (s.strip() for s in spec.split("=", 1))
    get(axis, Choice.parse(name).name)  # raises PlanError for an unknown axis or option
    return axis, name


def only(combos: Iterable[Combination], filters: Sequence[tuple[str, str]]) -> list[Combination]:
    """Combinations whose plan uses every ``(axis, option)`` filter (option with or without params)."""
    def keep(plan: Plan) -> bool:
        return all(str(plan[a]) == o or plan[a].name == o for a, o in filters)

    return [c for c in combos if keep(c.plan)]


def registered() -> list[tuple[str, Choice]]:
    """Every (axis, choice) the matrix sweeps, in registry order."""
    return [(axis, choice) for axis in AXES for choice in choices(axis)]

