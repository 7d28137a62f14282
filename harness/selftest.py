"""``python -m harness selftest``: how many planted faults do the import and numerics checks catch?

Each fault of ``harness/fault_catalogue.py`` is planted in a temporary copy of the project (never the
working tree), and the copy is checked in a fresh process with the harness's own checks, in the
order that fails fastest: the mutated module imported in a fresh interpreter (the import suite),
then the reference plan against the golden outputs recorded from transformers, the fault's plans'
property-based contracts and the per-combination numerics cases of ``suites/`` (whole-model
comparison, weight-scaling invariant: the numerics suite), and the reference plan's invariants. A
fault is caught when any check fails (a crash counts: the suite would not pass); the first failing
check is recorded as how. Before any fault, the unmutated copy runs every check on the union of the
faults' plans (the control): a check that already fails there cannot judge a fault and is set aside
(and reported), and a control that crashes or does not import stops the self-test.

The score (share caught, and which slipped through) is stored in the results store as suite
``selftest`` for the dashboard. Exit codes: 0 every fault caught, 1 some slipped through, 2 the
self-test could not run (the control failed, a catalogue entry no longer matches the code).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.fault_catalogue import FAULTS, Fault

REPO_ROOT = Path(__file__).resolve().parent.parent
COPIED = ("qwen3_vl", "harness", "suites", "pyproject.toml")
EXIT_OK, EXIT_SLIPPED, EXIT_ERROR = 0, 1, 2


class SelftestError(Exception):
    """The self-test cannot judge the faults (catalogue out of date, control failing): exit 2."""


@dataclass
class Outcome:
    fault: str
    caught: bool
    how: str  # the first failing check, or why nothing failed
    seconds: float
    why: str = ""
    path: str = ""
    plans: tuple[str, ...] = ()
    planted: bool = True  # False: the catalogue entry no longer matches the code (a catalogue error)


@dataclass
class Report:
    outcomes: list[Outcome]
    control_seconds: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def caught(self) -> int:
        return sum(o.caught for o in self.outcomes)

    @property
    def score(self) -> float:
        planted = len(self.outcomes) - len(self.unplanted)
        return self.caught / planted if planted else 0.0

    @property
    def slipped(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.caught and o.planted]

    @property
    def unplanted(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.planted]


# ---------------------------------------------------------------------------------------------
# Planting


def copy_project(dest: Path, root: Path = REPO_ROOT) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def check_plantable(fault: Fault, root: Path = REPO_ROOT) -> str:
    """'' when ``fault.old`` occurs exactly once in its file, else why it cannot be planted."""
    path = root / fault.path
    if not path.exists():
        return f"{fault.path} does not exist"
    count = path.read_text().count(fault.old)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        return (f"its snippet is {where} in {fault.path} (the code changed: update the catalogue entry "
                f"'{fault.name}' in harness/fault_catalogue.py)")
    return ""


def plant(fault: Fault, copy_root: Path) -> None:
    problem = check_plantable(fault, copy_root)
    if problem:
        raise SelftestError(f"fault '{fault.name}' cannot be planted: {problem}")
    path = copy_root / fault.path
    path.write_text(path.read_text().replace(fault.old, fault.new, 1))


def module_of(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# ---------------------------------------------------------------------------------------------
# The checks, run inside the copy (a fresh process whose qwen3_vl is the mutated one)


def worker(preset: str, plans: Sequence[str], full: bool = False, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Run the numerics checks on this process's ``qwen3_vl``; stop at the first failure unless ``full``.
    Checks named in ``ignore`` (those the unmutated control already fails) do not count.
    Returns {"failures": [message, ...], "keys": [check, ...], "checks": n}."""
    import torch

    import qwen3_vl
    from harness import golden, matrix, numerics, settings, suite
    from harness.workload import benchmark_spec, build_prompt
    from qwen3_vl.checkpoint import hf_state_dict
    from qwen3_vl.hardware.device import target_for
    from qwen3_vl.optim import Plan, reference_plan

    if os.environ.get("HARNESS_SELFTEST_THREADS"):
        torch.set_num_threads(int(os.environ["HARNESS_SELFTEST_THREADS"]))
    config = settings.load()
    failures: list[str] = []
    keys: list[str] = []
    skip = set(ignore)
    checks = 0

    def record(label: str, results) -> bool:
        nonlocal checks
        for case, m in results:
            checks += 1
            key = f"{label} {case}/{m.metric}"
            if m.status == "failed" and key not in skip:
                failures.append(f"{key}: {m.error}"[:400])
                keys.append(key)
        return bool(failures) and not full

    reference = qwen3_vl.from_pretrained(preset, seed=golden.SEED)
    gold = golden.load(preset)
    if gold is None:
        raise RuntimeError(f"no golden outputs for preset '{preset}'")
    if record("golden", golden.compare(golden.record(reference), gold)):
        return {"failures": failures, "keys": keys, "checks": checks}
    weights = hf_state_dict(reference)

    def build(plan, dtype):
        return qwen3_vl.build(reference.config, {k: v.clone() for k, v in weights.items()}, dtype=dtype, plan=plan,
                              seed=golden.SEED)

    models = numerics.Models(build)
    parsed = [Plan.parse(p) for p in plans]
    for plan in parsed:
        dtypes = [d for d in config.numerics_dtypes if not matrix.unavailable_reason(plan, target_for("cpu", d))]
        if record(f"contract {plan.short_id}", numerics.check_plan(plan, models, reference.config, dtypes,
                                                                   config.numerics_examples)):
            return {"failures": failures, "keys": keys, "checks": checks}
    # The per-combination cases of the numerics suites (suites/*.py with PART = "numerics"), as validate
    # runs them: the whole-model comparison, the weight-scaling invariant, and whatever is added there.
    prompt = build_prompt(reference.config, benchmark_spec(config.seed))
    cases, broken = suite.discover()
    if broken:
        raise RuntimeError(f"suite modules do not import: {broken}")
    tracks = [c for c in cases if c.part == "numerics" and c.kind == "track"]
    shared: dict = {}
    for plan in parsed:
        bench = suite.Bench(models(plan, "fp32"), models(reference_plan(), "fp32"), prompt, config.new_tokens,
                            None, shared)
        for case in tracks:
            produced = [item if isinstance(item, tuple) else (case.name, item) for item in case.fn(bench) or []]
            if record(f"{case.suite} {plan.short_id}", produced):
                return {"failures": failures, "keys": keys, "checks": checks}
    record("contract reference", numerics.check_plan(reference_plan(), models, reference.config,
                                                     list(config.numerics_dtypes), config.numerics_examples))
    return {"failures": failures, "keys": keys, "checks": checks}


_WORKER = """
import json, sys, traceback
try:
    from harness import selftest
    ignore = json.loads(open(sys.argv[3]).read()) if sys.argv[3] != "-" else []
    out = selftest.worker(sys.argv[1], sys.argv[4:], full=sys.argv[2] == "full", ignore=ignore)
except BaseException as exc:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    if isinstance(exc, SyntaxError):
        where = f" at {exc.filename}:{exc.lineno}"
    out = {"failures": [f"crash: {type(exc).__name__}{where}: {exc}"[:400]], "checks": 0, "crashed": True}
print("SELFTEST-RESULT " + json.dumps(out), flush=True)
"""


def _run_worker(copy_root: Path, preset: str, plans: Sequence[str], full: bool, timeout: float,
                threads: int | None, ignore: Sequence[str] = ()) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(copy_root), "PYTHONDONTWRITEBYTECODE": "1"}
    if threads:
        env.update(HARNESS_SELFTEST_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    ignore_file = "-"
    if ignore:
        ignore_file = str(copy_root / ".selftest-ignore.json")
        Path(ignore_file).write_text(json.dumps(list(ignore)))
    cmd = [sys.executable, "-c", _WORKER, preset, "full" if full else "first", ignore_file, *plans]
    try:
        proc = subprocess.run(cmd, cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"failures": [f"timeout: the checks did not finish in {timeout:.0f} s"], "checks": 0}
    for line in proc.stdout.splitlines():
        if line.startswith("SELFTEST-RESULT "):
            return json.loads(line[len("SELFTEST-RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"failures": [f"crash: the checking process died (exit {proc.returncode}): {tail}"], "checks": 0}


def _import_failures(copy_root: Path, modules: Sequence[str]) -> list[str]:
    from harness import imports

    return [f"imports {r.describe()}" for r in imports.check_all(list(modules), root=copy_root) if not r.ok]


# ---------------------------------------------------------------------------------------------
# The run


def run_fault(fault: Fault, work: Path, preset: str, timeout: float, threads: int | None,
              ignore: Sequence[str] = ()) -> Outcome:
    started = time.perf_counter()
    copy_root = copy_project(work / fault.name)
    try:
        try:
            plant(fault, copy_root)
        except SelftestError as exc:  # the file changed since the run started
            return Outcome(fault.name, False, str(exc), time.perf_counter() - started, fault.why, fault.path,
                           fault.plans, planted=False)
        failures = _import_failures(copy_root, [module_of(fault.path)])
        if not failures:
            failures = _run_worker(copy_root, preset, fault.plans, False, timeout, threads, ignore)["failures"]
    finally:
        shutil.rmtree(copy_root, ignore_errors=True)
    how = failures[0] if failures else "slipped through: no check failed"
    return Outcome(fault.name, bool(failures), how, time.perf_counter() - started, fault.why, fault.path, fault.plans)


def control(work: Path, faults: Sequence[Fault], preset: str, timeout: float, threads: int | None
            ) -> tuple[float, list[str], list[str]]:
    """Every check the faults will be judged by, on the unmutated copy: (seconds, checks that already
    fail there and so cannot judge a fault, their messages). Import failures or a crash end the run."""
    started = time.perf_counter()
    copy_root = copy_project(work / "control")
    broken = _import_failures(copy_root, sorted({module_of(f.path) for f in faults}))
    if broken:
        raise SelftestError(f"the unmutated project does not import, so planted faults cannot be judged: {broken[0]}")
    plans = sorted({p for f in faults for p in f.plans})
    out = _run_worker(copy_root, preset, plans, True, timeout * 3, threads)
    shutil.rmtree(copy_root, ignore_errors=True)
    if out.get("crashed") or not out.get("checks"):
        raise SelftestError(f"the checks crash on the unmutated project: {out['failures'][0]}")
    return time.perf_counter() - started, out["keys"], out["failures"]


def select(names: Sequence[str]) -> list[Fault]:
    if not names:
        return list(FAULTS)
    known = {f.name: f for f in FAULTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SelftestError(f"unknown fault '{unknown[0]}'; faults are: {', '.join(known)}")
    return [known[n] for n in names]


def run(faults: Sequence[Fault], preset: str = "tiny", jobs: int = 2, timeout: float = 600.0,
        on_outcome=None) -> Report:
    started = time.perf_counter()
    problems = [f"{f.name}: {p}" for f in faults if (p := check_plantable(f))]
    if problems:
        raise SelftestError("catalogue entries no longer match the code: " + "; ".join(problems))
    threads = 1 if jobs > 1 else None
    with tempfile.TemporaryDirectory(prefix="harness-selftest-") as tmp:
        work = Path(tmp)
        control_seconds, known, messages = control(work, faults, preset, timeout, threads)
        notes = [f"already failing on the unmutated project (not used to judge faults): {m}" for m in messages]
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = [pool.submit(run_fault, f, work, preset, timeout, threads, known) for f in faults]
            outcomes = []
            for future in futures:
                outcome = future.result()
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
    return Report(outcomes, control_seconds, time.perf_counter() - started, notes)


def rows(report: Report, preset: str, fingerprint: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    from harness import results

    info = results.RunInfo(run_id=run_id, fingerprint_id=fingerprint["id"], preset=preset, dtype="fp32",
                           git_sha=fingerprint["git"]["sha"], git_dirty=fingerprint["git"]["dirty"])
    out = []
    for o in report.outcomes:
        if not o.planted:
            out.append(results.make_row(info, "cpu", "selftest", o.fault, results.skipped("caught", o.how)))
            continue
        m = results.Measurement("caught", float(o.caught), "fraction", status="ok" if o.caught else "failed",
                                error="" if o.caught else f"slipped through: {o.why}", bound=1.0, better="higher")
        out.append(results.make_row(info, "cpu", "selftest", o.fault, m, params={
            "path": o.path, "plans": list(o.plans), "how": o.how, "seconds": round(o.seconds, 1), "why": o.why},
            repro=f"python -m harness selftest --only {o.fault}"))
    share = report.score
    out.append(results.make_row(info, "cpu", "selftest", "score", results.Measurement(
        "caught_share", share, "fraction", status="ok" if share == 1 else "failed",
        error="" if share == 1 else "slipped through: " + ", ".join(o.fault for o in report.slipped),
        bound=1.0, better="higher"), params={"faults": len(report.outcomes) - len(report.unplanted),
                                             "caught": report.caught},
        repro="python -m harness selftest"))
    out.append(results.make_row(info, "cpu", "selftest", "score", results.Measurement(
        "seconds", report.seconds, "s", better="lower"), params={"control_seconds": round(report.control_seconds, 1)},
        repro="python -m harness selftest"))
    return out


@dataclass
class Options:
    preset: str = "tiny"
    only: Sequence[str] = ()
    jobs: int = 2
    timeout: float = 600.0
    results_dir: str = "results"
    store: bool = True


def main(opts: Options) -> int:
    from harness import fingerprint, results

    faults = select(opts.only)
    if opts.store:
        results.check_writable(opts.results_dir)
    print(f"selftest: {len(faults)} planted fault(s), preset {opts.preset}, {opts.jobs} job(s); control first",
          file=sys.stderr)

    def show(o: Outcome) -> None:
        mark = "caught " if o.caught else "SLIPPED"
        print(f"{mark} {o.fault:<40} {o.seconds:6.1f} s  {o.how[:160]}", flush=True)

    report = run(faults, opts.preset, opts.jobs, opts.timeout, show)
    print(f"control (unmutated copy, every check) ran in {report.control_seconds:.0f} s")
    for note in report.notes:
        print(f"note: {note}")
    planted = len(report.outcomes) - len(report.unplanted)
    print(f"score: {report.caught} of {planted} planted faults caught ({report.score:.0%}) in {report.seconds:.0f} s")
    for o in report.slipped:
        print(f"slipped through: {o.fault} ({o.path}): {o.why}")
    for o in report.unplanted:
        print(f"harness: error: {o.how}", file=sys.stderr)
    if opts.store:
        fp = fingerprint.collect()
        run_id = results.new_run_id() + "-selftest"
        from qwen3_vl.optim import AXES

        path = results.write_run(rows(report, opts.preset, fp, run_id), opts.results_dir, fp, run_id, axes=AXES)
        print(f"results: {path}")
    if report.unplanted:
        return EXIT_ERROR
    return EXIT_OK if not report.slipped else EXIT_SLIPPED
