"""The gate's false-alarm and detection rates on this machine, measured (run once; not part of CI).

    python scripts/gate_campaign.py measure --runs 10 --results-dir results   # ~1 h on a busy 2-core machine
    python scripts/gate_campaign.py analyze --results-dir results --out results/<fp>/gate_campaign.json

``measure`` makes A/A runs: the same code (a frozen copy of the project, so edits to the working tree
during the campaign change nothing), each run ``python -m harness validate`` in its own process
(latency and memory suites, the tiny preset, the noise command's default plans), run ids
``aa-<stamp>-NN``. ``analyze`` takes the first three runs as the noise floor (``harness noise``) and
gates every pair of the later runs (baseline the earlier): each of those comparisons failing is a
false alarm. Then the same pairs again with the candidate's latency of one combination scaled by 1.10 and
1.20 (values and raw samples; every case of that plan): the share of scaled cases the gate flags
is the detection rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness import gate, noise, results

NOISE_RUNS = 3
SCALED_METRICS = ("time", "time_p90", "ratio_to_reference")


def snapshot(dest: Path) -> Path:
    """A frozen copy of the code, so every A/A run measures the same code while the tree moves on."""
    from harness import selftest

    if dest.exists():
        shutil.rmtree(dest)
    return selftest.copy_project(dest)


def measure(args: argparse.Namespace) -> None:
    code = snapshot(Path(args.snapshot)).resolve()
    env = {**os.environ, "PYTHONPATH": str(code)}
    results_dir = str(Path(args.results_dir).resolve())
    stamp = results.new_run_id().split("-")[0]
    for i in range(args.runs):
        run_id = f"aa-{stamp}-{i + 1:02d}"
        cmd = [sys.executable, "-m", "harness", "validate", "--preset", args.preset, "--device", "cpu", "--suites",
               "latency,memory", "--results-dir", results_dir, "--run-id", run_id, "--budget-s", "0"]
        for plan in noise.default_plans():
            cmd += ["--plan", plan]
        started = datetime.now(timezone.utc)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False, cwd=code,
                              env=env)
        took = (datetime.now(timezone.utc) - started).total_seconds()
        print(f"{run_id}: exit {proc.returncode} in {took:.0f} s", flush=True)
        if proc.returncode not in (0, 1):
            print(proc.stderr[-2000:], file=sys.stderr)


def scaled(frame: pd.DataFrame, plan_id: str, factor: float) -> pd.DataFrame:
    """The candidate with every latency figure of one plan ``factor`` times slower."""
    out = frame.copy()
    hit = (out["plan_id"] == plan_id) & (out["suite"] == "latency")
    for idx in out.index[hit]:
        metric = out.at[idx, "metric"]
        if metric in SCALED_METRICS:
            out.at[idx, "value"] = out.at[idx, "value"] * factor
            out.at[idx, "samples"] = [s * factor for s in out.at[idx, "samples"]]
        elif metric == "tokens_per_s":
            out.at[idx, "value"] = out.at[idx, "value"] / factor
    return out


def _keys(result) -> set[tuple[str, str]]:
    return {(c.name, c.plan_id) for c in result.regressions}


def campaign(by_run, pairs, consecutive, plans, config, floors) -> dict:
    """False alarms over the A/A pairs, and detection of 10%/20% slowdowns injected into one plan; each
    also after a confirmation (the gate's --confirm): the candidate re-measured, here by another run
    of the same code, must regress on the same cases too."""
    order = list(by_run)

    def confirming(a: str, b: str) -> str:
        others = [r for r in order[order.index(b) + 1:] + order[::-1] if r not in (a, b)]
        return others[0]

    false_alarms, confirmed_alarms, details = 0, 0, []
    for a, b in pairs:
        result = gate.compare(by_run[a], by_run[b], config, floors)
        bad = [f"{c.name} {c.plan_short} {gate._pct(c.change)}" for c in result.regressions]
        false_alarms += bool(bad)
        if bad:
            again = gate.compare(by_run[a], by_run[confirming(a, b)], config, floors)
            confirmed_alarms += bool(_keys(result) & _keys(again))
        details.append({"baseline": a, "candidate": b, "consecutive": (a, b) in consecutive, "exit": result.exit_code,
                        "regressions": bad, "gated": sum(c.verdict != "ungated" for c in result.comparisons),
                        "ratios_gated": sum(c.verdict != "ungated" and c.kind == "ratio" for c in result.comparisons),
                        "noisy": sum(c.verdict == "noisy" for c in result.comparisons)})
    detection = {}
    for factor in (1.10, 1.20):
        cases = hits = confirmed = trials = failed_trials = 0
        for a, b in pairs:
            for plan in plans:
                result = gate.compare(by_run[a], scaled(by_run[b], plan, factor), config, floors)
                trials += 1
                failed_trials += result.exit_code == gate.EXIT_REGRESSION
                mine = [c for c in result.comparisons if c.plan_id == plan and c.metric == "ratio_to_reference"]
                cases += len(mine)
                found = {(c.name, c.plan_id) for c in mine if c.verdict == "regressed"}
                hits += len(found)
                if found:
                    again = gate.compare(by_run[a], scaled(by_run[confirming(a, b)], plan, factor), config, floors)
                    confirmed += len(found & _keys(again))
        detection[f"{factor:.2f}"] = {"cases": cases, "detected": hits, "rate": hits / cases if cases else math.nan,
                                      "detected_confirmed": confirmed,
                                      "rate_confirmed": confirmed / cases if cases else math.nan,
                                      "trials": trials, "gate_failed": failed_trials}
    return {"comparisons": len(pairs), "false_alarms": false_alarms, "false_alarm_rate": false_alarms / len(pairs),
            "false_alarms_confirmed": confirmed_alarms,
            "consecutive_comparisons": len(consecutive),
            "consecutive_false_alarms": sum(bool(d["regressions"]) for d in details if d["consecutive"]),
            "detection": detection, "pairs": details}


def analyze(args: argparse.Namespace) -> dict:
    frame = results.load(args.results_dir)
    frame = frame[frame["run_id"].str.startswith("aa-")]
    runs = frame.sort_values("timestamp").drop_duplicates("run_id")["run_id"].tolist()
    if len(runs) < NOISE_RUNS + 2:
        raise SystemExit(f"need at least {NOISE_RUNS + 2} A/A runs, found {len(runs)}")
    config = gate.load_config()
    noise_frame = frame[frame["run_id"].isin(runs[:NOISE_RUNS])]
    floors = {}
    for fp, items in noise.floors(noise_frame).items():
        for f in items:
            floors[(fp, f.preset, f.device, f.dtype, f.suite, f.case, f.metric)] = f.noise
    by_run = {r: frame[frame["run_id"] == r] for r in runs}
    rest = runs[NOISE_RUNS:]
    # Every pair of the runs after the noise runs (each pair is two separate processes of the same code);
    # consecutive pairs alone are the independent subset, reported beside.
    pairs = [(a, b) for i, a in enumerate(rest) for b in rest[i + 1:]]
    consecutive = set(itertools.pairwise(rest))
    plans = sorted(set(frame[(frame["plan_id"] != "") & (frame["suite"] == "latency")
                             & (frame["metric"] == "ratio_to_reference")]["plan_id"]))
    variants = {"with_noise_floor": floors, "without_noise_floor": {}}
    outcome = {name: campaign(by_run, pairs, consecutive, plans, config, found) for name, found in variants.items()}
    fp = sorted(set(frame["fingerprint_id"]))
    from harness import fingerprint

    here = fingerprint.collect()
    # The machine's load when each run started (recorded in its fingerprint's volatile tier).
    loads = {r: results.read_fingerprint(by_run[r]["source_file"].iloc[0])["volatile"].get("load_average")
             for r in runs}
    summary = {
        "fingerprint_id": fp, "cpu": here["stable"]["cpu"]["model"],
        "usable_cpus": here["stable"]["cpu"]["usable_cpus"], "runs": runs, "noise_runs": runs[:NOISE_RUNS],
        "plans": plans, "config": gate.asdict(config), "outcome": outcome, "load_average_at_start": loads,
        "noise_floors": {"/".join(k[4:]): (None if math.isinf(v) else v) for k, v in sorted(floors.items())},
        "analyzed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    shown = ("comparisons", "false_alarms", "false_alarms_confirmed", "consecutive_comparisons",
             "consecutive_false_alarms", "detection")
    brief = {name: {k: o[k] for k in shown} for name, o in outcome.items()}
    print(json.dumps({"cpu": summary["cpu"], "runs": len(runs), **brief}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--runs", type=int, default=24)
    m.add_argument("--preset", default="tiny")
    m.add_argument("--results-dir", default="results")
    m.add_argument("--snapshot", default="/tmp/gate-campaign-code", help="where the frozen copy of the code goes")
    m.set_defaults(func=measure)
    a = sub.add_parser("analyze")
    a.add_argument("--results-dir", default="results")
    a.add_argument("--out")
    a.set_defaults(func=analyze)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
