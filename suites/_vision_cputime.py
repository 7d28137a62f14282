"""Single-thread CPU time of the vision cases, interleaved in one process, stored in the results store.

Why next to the ``vision``/``vision_pruning`` suites (which the harness times in wall-clock): on the
shared 2-core machine this was written on, other jobs kept the load average at 10-16 and the same
TTFT measured 8 to 37 s wall-clock. The CPU time of a single-threaded run measures the work done and
moves far less. Each round runs every configuration once, in rotating order (``harness.timing``);
wall-clock is stored beside it. The underscore keeps suite discovery away from this file.

    python -m suites._vision_cputime --preset mini --rounds 3 --results-dir results
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import qwen3_vl
from harness import fingerprint, results, timing
from harness.results import Measurement, RunInfo
from harness.suite import Bench
from suites import vision, vision_pruning

RATIOS = (0.5, 0.25, 0.125)


class BothClocks:
    """A suite clock that times the region in wall-clock (the harness clock) and in process CPU time."""

    def __init__(self, wall: timing.Clock, cpu: list[float]) -> None:
        self.wall, self.cpu = wall, cpu

    @contextlib.contextmanager
    def __call__(self, tokens: int = 0):
        start = time.process_time()
        with self.wall(tokens):
            yield
        if self.wall.enabled:
            self.cpu.append(time.process_time() - start)


def configurations(preset: str, seed: int):
    """(case, plan id, model, suite function) to time; the reference plan's first image is every baseline."""
    reference = qwen3_vl.from_pretrained(preset, seed=seed)
    conditional = qwen3_vl.from_pretrained(preset, seed=seed, plan="vision=conditional")
    out = [
        ("first_image", "reference", reference, vision.time_first_image),
        ("first_image", "vision=conditional", conditional, vision.time_first_image),
        ("repeated_image", "vision=conditional", conditional, vision.time_repeated_image),
        ("second_turn", "reference", reference, vision.time_second_turn),
        ("second_turn", "vision=conditional", conditional, vision.time_second_turn),
    ]
    for option in ("prune_fastv", "prune_pre"):
        for ratio in RATIOS:
            plan = f"vision={option}[ratio={ratio}]"
            out.append(("first_image", plan, qwen3_vl.from_pretrained(preset, seed=seed, plan=plan),
                        vision_pruning.time_ttft))
    return reference, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results.check_writable(args.results_dir)
    machine = fingerprint.collect()
    reference, configs = configurations(args.preset, seed=0)
    shared: dict = {}
    cpu: dict[str, list[float]] = {}
    targets = {}
    for case, plan, model, fn in configs:
        key = f"{case}|{plan}"
        cpu[key] = []
        bench = Bench(model, reference, None, 4, shared=shared)
        targets[key] = (lambda b, f, samples: lambda clock: f(b, BothClocks(clock, samples)))(bench, fn, cpu[key])
    timed = timing.interleaved(targets, args.rounds, args.warmup)

    run = RunInfo(args.run_id or results.new_run_id(), machine["id"], args.preset, "fp32",
                  machine["git"]["sha"], machine["git"]["dirty"])
    params = {"threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "image": "448x448",
              "visual_tokens": 196, "load_average": machine["volatile"]["load_average"]}
    rows, baseline = [], cpu["first_image|reference"]
    print(f"{machine['stable']['cpu'].get('model', 'cpu')}, {args.threads} thread(s), preset {args.preset}")
    for case, plan, model, _ in configs:
        key = f"{case}|{plan}"
        if timed[key].error:
            failed = results.failed("cpu_time", timed[key].error)
            rows.append(results.make_row(run, "cpu", "vision_cputime", case, failed, model.plan))
            continue
        base = cpu["second_turn|reference"] if case == "second_turn" else baseline
        ratios = [a / b for a, b in zip(cpu[key], base, strict=False)]
        found = [Measurement("cpu_time", statistics.median(cpu[key]), "s", cpu[key], better="lower"),
                 Measurement("cpu_ratio_to_reference", statistics.median(ratios), "x", ratios, better="lower"),
                 Measurement("time", statistics.median(timed[key].clock.samples), "s", timed[key].clock.samples,
                             better="lower")]
        for m in found:
            rows.append(results.make_row(run, "cpu", "vision_cputime", case, m, model.plan, params))
        print(f"{case:15} {plan:32} cpu {found[0].value:7.2f} s  x{found[1].value:5.2f} vs full   "
              f"wall {found[2].value:7.2f} s")
    path = results.write_run(rows, args.results_dir, machine, run.run_id)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
