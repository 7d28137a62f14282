"""``python -m harness validate``: imports, numerics, latency and memory for every combination, stored.

Order of work: check every input first (so a typo costs a second, not a run), fingerprint the machine,
import-check the project, then per device: the golden check of the reference plan, one property-based
contract per registered option, and the per-combination suites (``suites/*.py``) in groups of
combinations measured interleaved with the reference plan. One failing or crashing combination is
recorded as failed and the run goes on. Results are written once, atomically, at the end.

Exit codes: 0 every check passed (skips are not failures), 1 a check failed, 2 the harness could not
run (bad input, no device, unwritable results directory, a harness bug).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import qwen3_vl
from harness import fingerprint as fingerprint_mod
from harness import golden, imports, matrix, memory, numerics, results, suite, timing
from harness.errors import EXIT_ERROR, EXIT_FAILED, EXIT_OK, HarnessError  # noqa: F401  (re-exported)
from harness.results import Measurement, RunInfo
from harness.settings import Settings
from harness.workload import benchmark_spec, build_prompt
from qwen3_vl.checkpoint import hf_state_dict
from qwen3_vl.config import ConfigError
from qwen3_vl.config import preset as preset_config
from qwen3_vl.hardware.device import dtype_name, target_for
from qwen3_vl.optim import AXES, Plan, PlanError, reference_plan

BUILTIN_PARTS = ("imports", "numerics")


@dataclass
class Options:
    preset: str = "tiny"
    mode: str = "full"
    device: str = "auto"
    dtype: str = "fp32"
    shard: str = "1/1"
    suites: Sequence[str] = ("imports", "numerics", "latency", "memory")
    results_dir: str = "results"
    plans: Sequence[str] = ()  # explicit plan ids instead of the matrix
    only: Sequence[str] = ()  # axis=option filters on the matrix
    run_id: str | None = None
    settings: Settings = field(default_factory=Settings)


# ---------------------------------------------------------------------------------------------
# Input checks (all before any expensive work)


@dataclass
class Checked:
    devices: list[str]
    shard: tuple[int, int]
    parts: list[str]
    plans: list[Plan]
    only: list[tuple[str, str]]
    cases: list[suite.SuiteCase]
    broken_suites: dict[str, str]
    run_id: str


def check_options(opts: Options) -> Checked:
    try:
        preset_config(opts.preset)
    except ConfigError as exc:
        raise HarnessError(str(exc)) from None
    if opts.mode not in matrix.MODES:
        raise HarnessError(f"unknown mode '{opts.mode}'; modes are: {', '.join(matrix.MODES)}")
    try:
        shard = matrix.parse_shard(opts.shard)
        dtype_name(opts.dtype)
        run_id = results.check_run_id(opts.run_id or results.new_run_id())
    except ValueError as exc:
        raise HarnessError(str(exc)) from None
    cases, broken = suite.discover()
    known = list(BUILTIN_PARTS) + [p for p in suite.parts(cases) if p not in BUILTIN_PARTS] + list(broken)
    parts = [p.strip() for p in opts.suites if p.strip()]
    unknown = [p for p in parts if p not in known]
    if unknown or not parts:
        raise HarnessError(f"unknown suite '{unknown[0] if unknown else ''}'; suites are: {', '.join(known)}")
    try:
        plans = [Plan.parse(p) for p in opts.plans]
        only = [matrix.parse_option(o) for o in opts.only]
    except PlanError as exc:
        raise HarnessError(str(exc)) from None
    devices = resolve_devices(opts.device, opts.dtype)
    try:
        results.check_writable(opts.results_dir)
    except OSError as exc:
        raise HarnessError(str(exc)) from None
    return Checked(devices, shard, parts, plans, only, [c for c in cases if c.part in parts], broken, run_id)


def resolve_devices(device: str, dtype: str) -> list[str]:
    """``auto``: the CPU, and the first GPU when torch sees one. Anything else must exist."""
    if device == "auto":
        return ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    try:
        return [target_for(device, dtype).device]
    except (ValueError, RuntimeError) as exc:
        raise HarnessError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    opts: Options
    checked: Checked
    info: RunInfo
    console: Console
    progress: Progress
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)
    benchmarks: list[timing.BenchmarkRecord] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.opts.settings

    def add(self, device: str, suite_name: str, case: str, m: Measurement, plan: Plan | None = None,
            params: dict | None = None, fallbacks=(), part: str = "") -> None:
        self.rows.append(results.make_row(self.info, device, suite_name, case, m, plan, params, fallbacks,
                                          self.repro(device, plan, part or suite_name)))

    def repro(self, device: str, plan: Plan | None, part: str) -> str:
        if part == "imports":
            return "python -m harness imports"
        if part == "matrix":
            return f"python -m harness matrix --mode {self.opts.mode} --device {device} --dtype {self.opts.dtype}"
        cmd = f"python -m harness validate --preset {self.opts.preset} --device {device} --dtype {self.opts.dtype}"
        if plan is not None:
            cmd += f" --plan '{plan.id}'"
        return cmd + f" --suites {part}"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deadline(self, devices_left: int) -> float | None:
        """When (in ``elapsed()`` seconds) the next device's work must end: the budget left, shared
        equally by the devices still to run; None without a budget."""
        if self.settings.budget_s <= 0:
            return None
        return self.elapsed() + max(0.0, self.settings.budget_s - self.elapsed()) / max(1, devices_left)

    def note(self, text: str) -> None:
        """A progress line for logs (CI, nox): a terminal shows the live progress bars instead."""
        if not self.console.is_terminal:
            self.console.print(f"[{self.elapsed():5.0f} s] {text}", markup=False, highlight=False)


def _error(exc: BaseException) -> str:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return f"out of memory: {exc}".strip()
    return f"{type(exc).__name__}: {exc}"


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_imports(run: Run) -> None:
    modules = imports.discover()
    run.note(f"imports: {len(modules)} modules, each in a fresh process")
    task = run.progress.add_task("imports", total=len(modules))
    for r in imports.check_all(modules, on_result=lambda _: run.progress.advance(task)):
        m = Measurement("import_seconds", r.seconds, "s") if r.ok else Measurement(
            "import_seconds", None, "s", status="failed", error=f"{r.error_type} at {r.location}: {r.message}")
        run.add("", "imports", r.module, m, part="imports")
    run.progress.remove_task(task)


class DeviceRun:
    """Everything measured on one device: the reference, its weights, and models built from them."""

    def __init__(self, run: Run, device: str, devices_left: int = 1) -> None:
        self.run, self.device = run, device
        # The device's share of the budget; the contracts may use ``numerics_budget_share`` of it, so the
        # per-combination suites always get time too.
        self.started = run.elapsed()
        self.deadline = run.deadline(devices_left)
        self.dtype = run.opts.dtype
        self.target = target_for(device, self.dtype)
        seed = run.settings.seed
        try:
            self.reference = qwen3_vl.from_pretrained(run.opts.preset, dtype=self.dtype, device=device,
                                                      plan=reference_plan(), seed=seed)
        except Exception as exc:
            raise HarnessError(f"cannot build the reference model on {device}: {_error(exc)}") from None
        self.config = self.reference.config
        self.weights = hf_state_dict(self.reference)
        self.prompt = build_prompt(self.config, benchmark_spec(seed))
        self.shared: dict[str, Any] = {}
        self._fp32: Any = None

    def build(self, plan: Plan, dtype: str | None = None):
        weights = {k: v.clone() for k, v in self.weights.items()}  # an option may rewrite weights in place
        return qwen3_vl.build(self.config, weights, dtype=dtype or self.dtype, device=self.device, plan=plan,
                              seed=self.run.settings.seed)

    def fp32_reference(self):
        if self._fp32 is None:
            self._fp32 = self.build(reference_plan(), "fp32")
        return self._fp32

    def bench(self, model) -> suite.Bench:
        return suite.Bench(model, self.reference, self.prompt, self.run.settings.new_tokens,
                           self.fp32_reference if self.dtype != "fp32" else None, self.shared)

    def add(self, suite_name, case, m, plan=None, params=None, fallbacks=(), part=""):
        self.run.add(self.device, suite_name, case, m, plan, params, fallbacks, part)

    def over_budget(self, next_step: float, share: float = 1.0) -> bool:
        """Would a step expected to take ``next_step`` seconds end past ``share`` of this device's budget?"""
        if self.deadline is None:
            return False
        return self.run.elapsed() + next_step > self.started + share * (self.deadline - self.started)


# ---------------------------------------------------------------------------------------------
# Numerics: golden check and per-option contracts


def contract_plans(target, combos: list[matrix.Combination]) -> list[tuple[Plan, str]]:
    """One plan per choice used by ``combos``: the choice with every other axis at the reference (or,
    when that cannot run, the first runnable combination holding it). ``(plan, reason)`` where the
    reason says why nothing holding the choice can run here ("" when it can)."""
    reference = reference_plan()
    out: list[tuple[Plan, str]] = [(reference, "")]
    used = {(axis, choice) for c in combos for axis, choice in c.plan.choices}
    for axis, choice in matrix.registered():
        if choice == reference[axis] or (axis, choice) not in used:
            continue
        plan = reference.with_(**{axis: choice})
        reason = matrix.unavailable_reason(plan, target)
        if reason:
            holding = [c.plan for c in combos if c.runnable and c.plan[axis] == choice]
            if holding:
                plan, reason = holding[0], ""
        out.append((plan, reason))
    return out


def run_numerics(dev: DeviceRun, combos: list[matrix.Combination]) -> None:
    run = dev.run
    index, count = run.checked.shard
    reference = reference_plan()
    if index == 1:
        gold = golden.load(run.opts.preset)
        if gold is None:
            have = ", ".join(p.stem for p in golden.GOLDEN_DIR.glob("*.json"))
            dev.add("numerics", "golden", results.skipped("logits_rel", f"no golden outputs for preset "
                    f"'{run.opts.preset}' (harness/golden/ has: {have})"), reference, part="numerics")
        elif run.settings.seed != golden.SEED:
            dev.add("numerics", "golden", results.skipped("logits_rel", f"golden outputs are for seed {golden.SEED}"),
                    reference, part="numerics")
        else:
            try:
                # the golden outputs come from the seeded fp32 weights: in an fp16/bf16 run, dev.build would
                # start from weights already rounded to that dtype (found on an H200: 2.8e-4 from fp16 weights)
                model = dev.reference if dev.dtype == "fp32" else qwen3_vl.build(
                    dev.config, None, dtype="fp32", device=dev.device, plan=reference, seed=run.settings.seed)
                for case, m in golden.compare(golden.record(model), gold):
                    dev.add("numerics", case, m, reference, part="numerics")
            except Exception as exc:
                dev.add("numerics", "golden", results.failed("logits_rel", _error(exc)), reference, part="numerics")
    todo = matrix.shard(contract_plans(dev.target, combos), index, count)
    task = run.progress.add_task(f"numerics contracts ({dev.device})", total=len(todo))
    models = numerics.Models(dev.build)
    spent: list[float] = []
    for number, (plan, reason) in enumerate(todo, 1):
        run.note(f"numerics ({dev.device}): contract {number}/{len(todo)} {plan.short_id}")
        params = {"examples": run.settings.numerics_examples, "dtypes": list(run.settings.numerics_dtypes)}
        started = time.perf_counter()
        if not reason and dev.over_budget(statistics.mean(spent) if spent else 0.0, run.settings.numerics_budget_share):
            reason = (f"not reached: the contracts' share of the {run.settings.budget_s:.0f} s budget was spent after "
                      f"{number - 1} of {len(todo)}; --budget-s 0 or --shard i/n to run them")
        if reason:
            dev.add("numerics", "contract", results.skipped("status", reason), plan, params, part="numerics")
        else:
            dtypes = [d for d in run.settings.numerics_dtypes
                      if not matrix.unavailable_reason(plan, target_for(dev.device, d))]
            try:
                for case, m in numerics.check_plan(plan, models, dev.config, dtypes, run.settings.numerics_examples,
                                                   run.settings.numerics_shrink):
                    dev.add("numerics", case, m, plan, {**params, "dtypes": dtypes}, part="numerics")
            except Exception as exc:
                dev.add("numerics", "contract", results.failed("status", _error(exc)), plan, params, part="numerics")
            if plan != reference:
                models.forget(plan)
            _free(dev.device)
            spent.append(time.perf_counter() - started)
        run.progress.advance(task)
    run.progress.remove_task(task)


# ---------------------------------------------------------------------------------------------
# Per-combination suites


def _timing_rows(dev: DeviceRun, case: suite.SuiteCase, plan: Plan, timed: timing.Timed,
                 baseline: timing.Timed | None, params: dict, fallbacks) -> None:
    name = case.name
    if timed.error:
        dev.add(case.suite, name, results.failed("time", timed.error), plan, params, fallbacks, case.part)
        return
    samples = timed.clock.samples
    if not samples:
        dev.add(case.suite, name, results.failed("time", "the case timed nothing (no `with clock():`)"), plan, params,
                fallbacks, case.part)
        return
    median = statistics.median(samples)
    rows = [Measurement("time", median, "s", samples, better="lower"),
            Measurement("time_p90", timing.percentile(samples, 90), "s", better="lower")]
    if timed.clock.tokens:
        rows.append(Measurement("tokens_per_s", timed.clock.tokens / median, "tokens/s", better="higher"))
    if baseline is not None and not baseline.error:
        ratios = timing.round_ratios(timed.clock, baseline.clock)
        if ratios:
            rows.append(Measurement("ratio_to_reference", statistics.median(ratios), "x", ratios, better="lower"))
    for m in rows:
        dev.add(case.suite, name, m, plan, params, fallbacks, case.part)
    dev.run.benchmarks.append(timing.BenchmarkRecord(
        group=f"{case.suite}.{case.name}", name=f"{case.name}[{plan.short_id}]",
        fullname=f"suites/{case.suite}.py::{case.kind}_{case.name}[{plan.id}]",
        params={"plan": plan.id, **plan.to_dict(), "device": dev.device, "dtype": dev.dtype},
        samples=samples, extra_info={m.metric: m.value for m in rows if m.metric != "time"},
        options={"rounds": params["rounds"], "warmup": params["warmup"], "interleaved": True,
                 "timer": "cuda events" if timed.clock.cuda else "perf_counter"}))


def run_time_case(dev: DeviceRun, case: suite.SuiteCase, members: dict[str, tuple[Plan, Any]],
                  baseline_samples: dict) -> None:
    """One ``time_`` case over the reference and a group of models, interleaved round by round."""
    s = dev.run.settings
    targets: dict[str, Callable] = {"reference": lambda clock: case.fn(dev.bench(dev.reference), clock)}
    for key, (_, model) in members.items():
        targets[key] = (lambda m: lambda clock: case.fn(dev.bench(m), clock))(model)
    out = timing.interleaved(targets, s.rounds, s.warmup, dev.device)
    params = {"rounds": s.rounds, "warmup": s.warmup, "new_tokens": s.new_tokens, "prompt": repr(dev.prompt.spec),
              "group": [plan.short_id for plan, _ in members.values()]}
    for key, (plan, model) in members.items():
        _timing_rows(dev, case, plan, out[key], out["reference"], params, model.fallbacks)
    base = baseline_samples.setdefault(case, timing.Timed(timing.Clock(dev.device)))
    if out["reference"].error:
        base.error = out["reference"].error
    base.clock.rounds += out["reference"].clock.rounds
    base.clock.tokens = out["reference"].clock.tokens


def run_single_case(dev: DeviceRun, case: suite.SuiteCase, plan: Plan, model) -> None:
    """A ``peakmem_`` or ``track_`` case on one model."""
    params = {"new_tokens": dev.run.settings.new_tokens, "prompt": repr(dev.prompt.spec)}
    fallbacks = model.fallbacks
    try:
        if case.kind == "peakmem":
            extra, measured = memory.peak(lambda: case.fn(dev.bench(model)), dev.device)
            produced = list(measured) + list(extra or [])
        else:
            produced = list(case.fn(dev.bench(model)) or [])
    except Exception as exc:
        dev.add(case.suite, case.name, results.failed("status", _error(exc)), plan, params, fallbacks, case.part)
        _free(dev.device)
        return
    for item in produced:
        sub, m = item if isinstance(item, tuple) else (case.name, item)
        dev.add(case.suite, sub, m, plan, params, fallbacks, case.part)


def _build_group(dev: DeviceRun, group: list[Plan], measure_load: bool) -> dict[str, tuple[Plan, Any]]:
    members: dict[str, tuple[Plan, Any]] = {}
    for plan in group:
        if plan == reference_plan():  # the reference is every group's baseline, already built
            members[plan.id] = (plan, dev.reference)
            continue
        try:
            if measure_load:
                model, measured = memory.peak(lambda p=plan: dev.build(p), dev.device)
                for m in measured:
                    dev.add("memory", "load", m, plan, {}, model.fallbacks, "memory")
            else:
                model = dev.build(plan)
            members[plan.id] = (plan, model)
        except PlanError as exc:  # the matrix found no declared conflict, yet the options refuse each other
            dev.add("build", "build", results.failed("status", (
                f"undeclared conflict: building the plan raised PlanError: {exc} (declare it on the option with "
                "conflicts= or needs= so the matrix skips the combination)")), plan, part="numerics")
        except Exception as exc:
            dev.add("build", "build", results.failed("status", _error(exc)), plan, part="numerics")
            _free(dev.device)
    return members


def run_combinations(dev: DeviceRun, plans: list[Plan], ordered: bool) -> dict[str, Any]:
    """Build each combination (in groups), run every selected suite case on it.

    With ``ordered`` (full mode) a pairwise cover of ``plans`` goes first. No new group starts once the
    run's time budget would be exceeded; the combinations not reached are recorded as skipped, saying
    whether the pairwise cover was complete.
    """
    run = dev.run
    s = run.settings
    reference = reference_plan()
    cases = run.checked.cases
    time_cases = [c for c in cases if c.kind == "time"]
    other_cases = [c for c in cases if c.kind != "time"]
    measure_load = "memory" in run.checked.parts
    cover_size = len(plans)
    if ordered:
        plans, cover_size = matrix.cover_first(plans)
    stats = {"combinations": len(plans), "measured": 0, "cover": cover_size}
    if not cases and not measure_load:
        return stats
    task = run.progress.add_task(f"combinations ({dev.device})", total=len(plans))
    baseline: dict[suite.SuiteCase, timing.Timed] = {}
    size = max(1, s.group_size)
    groups = [plans[i:i + size] for i in range(0, len(plans), size)]
    spent: list[float] = []
    run.note(f"combinations ({dev.device}): {len(plans)} to run in groups of {size}"
             + (f"; a pairwise cover of them first ({cover_size})" if cover_size < len(plans) else ""))
    for number, group in enumerate(groups):
        if number and number % 10 == 0:
            run.note(f"combinations ({dev.device}): {stats['measured']}/{len(plans)} measured")
        if dev.over_budget(statistics.mean(spent[-5:]) if spent else 0.0):
            rest = [p for g in groups[number:] for p in g]
            done = stats["measured"]
            cover = ("the pairwise cover of all of them was complete" if done >= cover_size else
                     f"only {done} of the {cover_size} combinations of the pairwise cover were reached")
            reason = (f"not reached: the {s.budget_s:.0f} s budget was spent after {done} of {len(plans)} "
                      f"combinations ({cover}); --budget-s 0 or --shard i/n to run them")
            for plan in rest:
                dev.add("matrix", "combination", results.skipped("status", reason), plan, part="matrix")
            run.console.print(f"[yellow]budget: {len(rest)} combination(s) on {dev.device} not reached in "
                              f"{s.budget_s:.0f} s (recorded as skipped)[/]")
            stats["budget_skipped"] = len(rest)
            break
        started = time.perf_counter()
        members = _build_group(dev, group, measure_load)
        for case in other_cases:
            for plan, model in members.values():
                run_single_case(dev, case, plan, model)
        timed = {k: v for k, v in members.items() if v[1] is not dev.reference}
        if timed:
            for case in time_cases:
                run_time_case(dev, case, timed, baseline)
        stats["measured"] += len(group)
        del members, timed
        _free(dev.device)
        spent.append(time.perf_counter() - started)
        run.progress.advance(task, len(group))
    for case, timed in baseline.items():
        _timing_rows(dev, case, reference, timed, None, {"rounds": s.rounds, "warmup": s.warmup,
                                                        "new_tokens": s.new_tokens, "baseline": True}, ())
    if reference not in plans[:stats["measured"]]:  # the baseline's own memory and track figures
        for case in other_cases:
            run_single_case(dev, case, reference, dev.reference)
    run.progress.remove_task(task)
    return stats


def run_device(run: Run, device: str, devices_left: int = 1) -> dict[str, Any]:
    dev = DeviceRun(run, device, devices_left)
    if run.checked.plans:
        combos = [matrix.classify(p, dev.target) for p in run.checked.plans]
    else:
        combos = matrix.build(run.opts.mode, dev.target)
    combos = matrix.only(combos, run.checked.only)
    mine = matrix.shard(combos, *run.checked.shard)
    for c in mine:
        if not c.runnable:
            dev.add("matrix", "combination", results.skipped("status", c.reason), c.plan, part="matrix")
    if "numerics" in run.checked.parts:
        run_numerics(dev, combos)
    ordered = run.opts.mode == "full" and not run.checked.plans
    return run_combinations(dev, [c.plan for c in mine if c.runnable], ordered)


# ---------------------------------------------------------------------------------------------
# Summary


def _pick(g, suite_name: str, case: str, metric: str) -> float | None:
    v = g[(g["suite"] == suite_name) & (g["case"] == case) & (g["metric"] == metric)]["value"].dropna()
    return float(v.iloc[0]) if len(v) else None


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def summary_table(frame, limit: int = 40) -> Table:
    """Per combination: checks passed/failed, worst accuracy figure, latency ratios, memory. Combinations
    with a failure are always shown; the others up to ``limit`` rows."""
    table = Table(title="validate: per combination")
    for col in ("device", "plan", "checks", "logits_rel", "prefill x ref", "decode x ref", "decode ms/token",
                "decode mem"):
        table.add_column(col, overflow="fold")
    plans = frame[(frame["plan_id"] != "") & (frame["suite"] != "matrix")]  # skipped combinations are summarised apart
    shown = hidden = 0
    for (device, _), g in plans.groupby(["device", "plan_id"], sort=False):
        failed, ok, skipped = (int((g["status"] == s).sum()) for s in ("failed", "ok", "skipped"))
        if shown >= limit and not failed:
            hidden += 1
            continue
        shown += 1
        rel = g[(g["suite"] == "accuracy") & (g["metric"] == "logits_rel")]["value"].dropna()
        checks = (f"[red]{failed} failed[/] " if failed else "") + f"{ok} ok"
        checks += f", {skipped} skipped" if skipped else ""
        decode_ms = _pick(g, "latency", "decode_per_token", "time")
        mem = _pick(g, "memory", "decode", "cuda_allocated_increase" if device.startswith("cuda") else "rss_increase")
        table.add_row(device, Text(g["plan_short"].iloc[0]), checks, _fmt(rel.max() if len(rel) else None, "{:.2g}"),
                      _fmt(_pick(g, "latency", "prefill", "ratio_to_reference"), "{:.3f}"),
                      _fmt(_pick(g, "latency", "decode_per_token", "ratio_to_reference"), "{:.3f}"),
                      _fmt(None if decode_ms is None else decode_ms * 1e3, "{:.2f}"), _human_bytes(mem))
    if hidden:
        table.caption = f"{hidden} more passing combination(s) not shown; all are in the results file"
    return table


def print_summary(run: Run, frame, path: Path | None) -> None:
    console = run.console
    console.print(summary_table(frame))
    failed = frame[frame["status"] == "failed"]
    if len(failed):
        console.print(f"[red bold]{len(failed)} failed check(s):[/]")
        for _, r in failed.head(30).iterrows():
            where = r["plan_short"] or r["case"]
            line = f" {r['device'] or '-'} {where} {r['suite']}/{r['case']}/{r['metric']}: {r['error']}"
            console.print(Text.assemble(("  FAIL", "red"), line), highlight=False)
        if len(failed) > 30:
            console.print(f"  ... and {len(failed) - 30} more (see the results file)")
    skipped = frame[(frame["suite"] == "matrix") & (frame["status"] == "skipped")]
    if len(skipped):
        reasons = skipped["error"].value_counts()
        console.print(f"{len(skipped)} combination(s) skipped:")
        for reason, n in reasons.head(10).items():
            console.print(f"  {n} x {reason}", markup=False, highlight=False)
    counts = frame["status"].value_counts().to_dict()
    console.print(f"rows: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, {counts.get('skipped', 0)} "
                  f"skipped; {run.elapsed():.0f} s")
    if path is not None:
        console.print(f"results: {path}", markup=False)


def main(opts: Options, console: Console | None = None) -> int:
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    checked = check_options(opts)  # HarnessError propagates: the caller prints one line, exit 2
    fp = fingerprint_mod.collect()
    index, count = checked.shard
    info = RunInfo(run_id=checked.run_id, fingerprint_id=fp["id"], preset=opts.preset, dtype=dtype_name(opts.dtype),
                   git_sha=fp["git"]["sha"], git_dirty=fp["git"]["dirty"], shard=f"{index}/{count}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    run = Run(opts, checked, info, console, progress)
    console.print(f"validate: preset {opts.preset}, {opts.mode} matrix, devices {', '.join(checked.devices)}, "
                  f"dtype {info.dtype}, shard {info.shard}, suites {', '.join(checked.parts)}; fingerprint {fp['id']}",
                  markup=False)
    for name, error in checked.broken_suites.items():
        run.add("", name, "import", results.failed("status", error), part=name)
    with progress:
        if "imports" in checked.parts and index == 1:
            run_imports(run)
        devices = checked.devices
        coverage = {device: run_device(run, device, len(devices) - i) for i, device in enumerate(devices)}
    path = results.write_run(run.rows, opts.results_dir, fp, checked.run_id, info.shard, AXES)
    if run.benchmarks:
        doc = timing.benchmark_json(run.benchmarks, fp)
        bench_path = path.with_suffix(".benchmark.json")
        results.atomic_write(bench_path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    frame = results.to_frame(run.rows, AXES)
    print_summary(run, frame, path)
    for device, st in coverage.items():
        cover = f"; the first {st['cover']} form a pairwise cover" if st["cover"] < st["combinations"] else ""
        console.print(f"{device}: measured {st['measured']} of {st['combinations']} runnable combination(s){cover}")
    return EXIT_FAILED if (frame["status"] == "failed").any() else EXIT_OK

