"""Command line: ``python -m harness fingerprint|matrix|imports|validate|golden|gate|noise|selftest|dashboard``.

Exit codes (every command): 0 success, 1 a check failed, 2 the harness could not run as asked (bad
input, missing device, unwritable results directory) with one line on stderr saying why. ``gate``
adds 3: nothing comparable (no baseline with the same fingerprint, preset, device, dtype and plan).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from harness.errors import EXIT_ERROR, EXIT_FAILED, EXIT_OK, HarnessError


def _fingerprint(args: argparse.Namespace) -> int:
    from harness.fingerprint import collect

    fp = collect()
    print(fp["id"] if args.id_only else json.dumps(fp, indent=2, sort_keys=True, default=str))
    return EXIT_OK


def _matrix(args: argparse.Namespace) -> int:
    from harness import matrix
    from qwen3_vl.hardware.device import target_for
    from qwen3_vl.optim import PlanError

    try:
        target = target_for(args.device, args.dtype)
        index, count = matrix.parse_shard(args.shard)
        filters = [matrix.parse_option(o) for o in args.only]
        combos = matrix.only(matrix.build(args.mode, target), filters)
    except (ValueError, PlanError) as exc:  # PlanError is a ValueError; named for the reader
        raise HarnessError(str(exc)) from None
    mine = matrix.shard(combos, index, count)
    if args.json:
        print(json.dumps([{"plan_id": c.plan.id, "plan": c.plan.short_id, "status": c.status, "reason": c.reason}
                          for c in mine], indent=1))
    else:
        for c in mine:
            status = "run" if c.runnable else f"skipped: {c.reason}"
            print(f"{c.plan.short_id:<60} {status}\n    {c.plan.id}")
    runnable = sum(c.runnable for c in mine)
    print(f"{args.mode} matrix on {target.device}/{target.dtype}, shard {index}/{count}: {runnable} combination(s) "
          f"to run, {len(mine) - runnable} skipped (an unavailable option is listed once)", file=sys.stderr)
    return EXIT_OK


def _imports(args: argparse.Namespace) -> int:
    from harness import imports

    root = Path(args.root).resolve()
    if not root.is_dir():
        raise HarnessError(f"--root '{args.root}' is not a directory")
    modules = imports.discover(root) if not args.modules else args.modules
    if not modules:
        raise HarnessError(f"no modules of {', '.join(imports.PACKAGES)} under {root}")
    failed = 0
    for r in imports.check_all(modules, root=root):
        failed += not r.ok
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.describe()}")
    print(f"{len(modules) - failed} of {len(modules)} module(s) import", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from harness import settings, validate

    try:
        config = settings.load()
    except ValueError as exc:
        raise HarnessError(str(exc)) from None
    if args.budget_s is not None:
        config = config.replace(budget_s=args.budget_s)
    opts = validate.Options(
        preset=args.preset, mode=args.mode, device=args.device, dtype=args.dtype, shard=args.shard,
        suites=args.suites.split(","), results_dir=args.results_dir, plans=args.plan, only=args.only,
        run_id=args.run_id, settings=config,
    )
    return validate.main(opts)


def _golden(args: argparse.Namespace) -> int:
    from harness import golden

    if args.write:
        try:
            print(golden.write(args.preset))
        except RuntimeError as exc:
            raise HarnessError(str(exc)) from None
        return EXIT_OK
    import qwen3_vl

    gold = golden.load(args.preset)
    if gold is None:
        raise HarnessError(f"no golden outputs for preset '{args.preset}' (write them with --write)")
    failed = 0
    for case, m in golden.compare(golden.record(qwen3_vl.from_pretrained(args.preset, seed=golden.SEED)), gold):
        failed += m.status == "failed"
        print(f"{m.status:<6} {case} {m.metric} = {m.value:.3g}" + (f"  ({m.error})" if m.error else ""))
    return EXIT_FAILED if failed else EXIT_OK


def _gate(args: argparse.Namespace) -> int:
    from harness import gate

    if args.measure and args.candidate:
        raise HarnessError("give --candidate REF or --measure, not both")
    opts = gate.Options(baseline=args.baseline, candidate=args.candidate, measure=args.measure,
                        results_dir=args.results_dir, report=args.report, confirm=args.confirm,
                        store=not args.no_store)
    try:
        return gate.main(opts)
    except gate.GateError as exc:
        raise HarnessError(str(exc)) from None


def _noise(args: argparse.Namespace) -> int:
    from harness import gate, noise

    opts = noise.Options(runs=args.runs, preset=args.preset, device=args.device, dtype=args.dtype,
                         suites=args.suites, plans=args.plan, results_dir=args.results_dir, from_runs=args.from_runs,
                         keep=args.keep)
    try:
        return noise.main(opts)
    except (gate.GateError, OSError, RuntimeError) as exc:
        raise HarnessError(str(exc)) from None


def _selftest(args: argparse.Namespace) -> int:
    from harness import selftest

    opts = selftest.Options(preset=args.preset, only=args.only, jobs=args.jobs, timeout=args.timeout,
                            results_dir=args.results_dir, store=not args.no_store)
    try:
        return selftest.main(opts)
    except (selftest.SelftestError, OSError) as exc:
        raise HarnessError(str(exc)) from None


def _dashboard(args: argparse.Namespace) -> int:
    from harness import dashboard

    try:
        path = dashboard.main(args.results, args.out, args.gate_report)
    except (FileNotFoundError, OSError) as exc:
        raise HarnessError(str(exc)) from None
    print(f"dashboard: {path} (open it from disk; it is self-contained)")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    fp = sub.add_parser("fingerprint", help="print this machine's hardware/software fingerprint as JSON")
    fp.add_argument("--id-only", action="store_true", help="print only the fingerprint id")
    fp.set_defaults(func=_fingerprint)

    mx = sub.add_parser("matrix", help="list every combination with its plan id and status")
    mx.add_argument("--mode", default="full", choices=["full", "pairwise"])
    mx.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    mx.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    mx.add_argument("--shard", default="1/1", help="i/n: only the i-th of n disjoint parts (1-based)")
    mx.add_argument("--only", action="append", default=[], metavar="AXIS=OPTION",
                    help="keep combinations using this option (repeatable)")
    mx.add_argument("--json", action="store_true")
    mx.set_defaults(func=_matrix)

    im = sub.add_parser("imports", help="import every module in a fresh process; exit 1 on any failure")
    im.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                    help="project root holding qwen3_vl/, harness/, suites/ (default: this checkout)")
    im.add_argument("modules", nargs="*", help="dotted module names (default: all found under --root)")
    im.set_defaults(func=_imports)

    va = sub.add_parser("validate", help="run the suites over the matrix and store the results")
    va.add_argument("--preset", default="tiny")
    va.add_argument("--mode", default="full", choices=["full", "pairwise"])
    va.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), cpu, cuda or cuda:N")
    va.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    va.add_argument("--shard", default="1/1", help="i/n: run only the i-th of n disjoint parts (1-based)")
    va.add_argument("--suites", default="imports,numerics,latency,memory", help="comma-separated")
    va.add_argument("--results-dir", default="results")
    va.add_argument("--plan", action="append", default=[], metavar="PLAN_ID",
                    help="validate this plan instead of the matrix (repeatable)")
    va.add_argument("--only", action="append", default=[], metavar="AXIS=OPTION",
                    help="keep matrix combinations using this option (repeatable)")
    va.add_argument("--run-id", default=None, help="name the run (shards of one fleet run share it)")
    va.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget; over it latency runs on the pairwise subset (0: no budget)")
    va.set_defaults(func=_validate)

    go = sub.add_parser("golden", help="check the reference plan against the stored transformers outputs")
    go.add_argument("--preset", default="tiny")
    go.add_argument("--write", action="store_true", help="re-record them from transformers (needs transformers)")
    go.set_defaults(func=_golden)

    ga = sub.add_parser("gate", help="compare a candidate with a baseline: exit 0 pass, 1 regression, 2 error, "
                                     "3 nothing comparable")
    ga.add_argument("--baseline", required=True, metavar="REF",
                    help="run id, results file, folder, or git ref whose committed results/ is used")
    ga.add_argument("--candidate", metavar="REF", help="as --baseline")
    ga.add_argument("--measure", action="store_true",
                    help="measure the candidate now: this checkout, the baseline's plans for this machine")
    ga.add_argument("--results-dir", default="results", help="where run ids are looked up and runs are stored")
    ga.add_argument("--report", metavar="FILE", help="write a Markdown report (for a pull-request comment)")
    ga.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=None,
                    help="re-measure suspect cases on this checkout before failing (default: [tool.harness.gate])")
    ga.add_argument("--no-store", action="store_true", help="do not keep the report as <results-dir>/gate/last.*")
    ga.set_defaults(func=_gate)

    no = sub.add_parser("noise", help="measure this machine's A/A noise floor and store it beside the results")
    no.add_argument("--runs", type=int, default=3, help="A/A runs, each in its own process (default 3)")
    no.add_argument("--preset", default="tiny")
    no.add_argument("--device", default="cpu")
    no.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    no.add_argument("--suites", default="latency,memory")
    no.add_argument("--plan", action="append", default=[], metavar="PLAN_ID",
                    help="plans to measure (repeatable; default: a small fixed set)")
    no.add_argument("--results-dir", default="results")
    no.add_argument("--from", dest="from_runs", nargs="+", default=[], metavar="RUN_ID",
                    help="derive the floor from these stored A/A runs instead of measuring")
    no.add_argument("--keep", action="store_true", help="keep the A/A runs in --results-dir")
    no.set_defaults(func=_noise)

    st = sub.add_parser("selftest", help="plant each catalogued fault in a copy of the project; exit 1 if any "
                                         "slips through the import and numerics checks")
    st.add_argument("--preset", default="tiny")
    st.add_argument("--only", nargs="+", default=[], metavar="FAULT", help="only these faults (names)")
    st.add_argument("--jobs", type=int, default=2, help="faults checked in parallel (default 2)")
    st.add_argument("--timeout", type=float, default=600.0, help="seconds per fault before it counts as a hang")
    st.add_argument("--results-dir", default="results")
    st.add_argument("--no-store", action="store_true", help="do not store the score in the results")
    st.set_defaults(func=_selftest)

    da = sub.add_parser("dashboard", help="build a static, self-contained HTML dashboard from the stored results")
    da.add_argument("--results", default="results", help="the results folder (every run and machine in it)")
    da.add_argument("--out", default="site", help="output folder (index.html is written there)")
    da.add_argument("--gate-report", default=None, help="the gate's JSON report (default: <results>/gate/last.json)")
    da.set_defaults(func=_dashboard)

    # listed for --help; main() hands its arguments to harness.bench's own parser
    sub.add_parser("bench", help="this project's plans against transformers (and llama.cpp) side by side, in one "
                                 "process: python -m harness bench --help")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser
        from harness import bench

        return bench.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("harness: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception:  # a bug in the harness, not a failed check: exit 2 with the traceback
        traceback.print_exc()
        print("harness: error: the harness itself failed (traceback above)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["bench"]:  # the same exit watchdog as python -m harness.bench
        from harness.bench import exit_within

        exit_within(code)
    sys.exit(code)
