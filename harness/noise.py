"""``python -m harness noise``: this machine's A/A noise floor, measured and stored.

The same code is measured several times, each run in its own process (the noise that matters to the
gate is between processes, not between rounds of one process). For every (preset, device, dtype,
suite, case, metric) the floor is the largest relative difference ``max/min - 1`` between any two
runs, worst over the plans measured: a change smaller than that is what identical code does here.
It is stored as ``<results>/<fingerprint_id>/noise.json``; the gate reads it to decide which metrics
can be gated at their thresholds (absolute times on a shared runner usually cannot; in-run ratios
usually can) and refuses thresholds below it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from harness import results

NOISE_FILE = "noise.json"
GROUP = ("fingerprint_id", "preset", "device", "dtype", "suite", "case", "metric")


def spread(values: Sequence[float]) -> float:
    """max/min - 1 of positive values (0 when all equal; inf when one is 0 and another is not)."""
    values = [abs(float(v)) for v in values]
    hi, lo = max(values), min(values)
    if hi == lo:
        return 0.0
    return math.inf if lo == 0 else hi / lo - 1


def per_plan(frame: pd.DataFrame) -> pd.DataFrame:
    """The spread of each (group, plan) over the runs that measured it (ok rows only, two runs or more)."""
    ok = frame[(frame["status"] == "ok") & frame["value"].notna()]
    rows = []
    for key, g in ok.groupby([*GROUP, "plan_id"], sort=True, dropna=False):
        runs = g.drop_duplicates("run_id", keep="last")
        if len(runs) < 2:
            continue
        rows.append({**dict(zip([*GROUP, "plan_id"], key, strict=True)), "plan_short": g["plan_short"].iloc[0],
                     "spread": spread(runs["value"].tolist()), "runs": len(runs)})
    return pd.DataFrame(rows, columns=[*GROUP, "plan_id", "plan_short", "spread", "runs"])


@dataclass
class Floor:
    preset: str
    device: str
    dtype: str
    suite: str
    case: str
    metric: str
    noise: float  # the worst spread over plans
    runs: int
    plans: int
    per_plan: dict[str, float] = field(default_factory=dict)


def floors(frame: pd.DataFrame) -> dict[str, list[Floor]]:
    """{fingerprint id: floors}: per group the worst spread over its plans."""
    spreads = per_plan(frame)
    out: dict[str, list[Floor]] = {}
    for key, g in spreads.groupby(list(GROUP), sort=True, dropna=False):
        fp, preset, device, dtype, suite_name, case, metric = key
        out.setdefault(fp, []).append(Floor(preset, device, dtype, suite_name, case, metric, float(g["spread"].max()),
                                            int(g["runs"].min()), len(g),
                                            {(s or "reference"): float(v) for s, v in zip(g["plan_short"], g["spread"],
                                                                                         strict=True)}))
    return out


def _encode(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _decode(x: Any) -> float:
    return math.inf if x == "inf" else float(x)


def write(results_dir: Path, fingerprint_id: str, found: list[Floor], runs: Sequence[str]) -> Path:
    folder = Path(results_dir) / fingerprint_id
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "fingerprint_id": fingerprint_id,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": list(runs),
        "definition": "largest max/min - 1 of a value between any two A/A runs (separate processes), "
                      "worst over the plans measured",
        "floors": [{**f.__dict__, "noise": _encode(f.noise),
                    "per_plan": {k: _encode(v) for k, v in f.per_plan.items()}} for f in found],
    }
    path = folder / NOISE_FILE
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    results.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    for f in doc.get("floors", []):
        f["noise"] = _decode(f["noise"])
    return doc


def load_floors(roots: Iterable[Path]) -> dict[tuple, float]:
    """{(fingerprint, preset, device, dtype, suite, case, metric): noise} from every ``noise.json`` under
    ``roots`` (a root holds fingerprint folders); the most recent measurement of a fingerprint wins."""
    docs: dict[str, dict] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(root.glob(f"*/{NOISE_FILE}")):
            try:
                doc = read(path)
            except (OSError, ValueError, KeyError) as exc:
                print(f"harness: warning: skipping unreadable noise file {path}: {exc}", file=sys.stderr)
                continue
            fp = doc.get("fingerprint_id", path.parent.name)
            if fp not in docs or doc.get("measured_at", "") > docs[fp].get("measured_at", ""):
                docs[fp] = doc
    out: dict[tuple, float] = {}
    for fp, doc in docs.items():
        for f in doc["floors"]:
            out[(fp, f["preset"], f["device"], f["dtype"], f["suite"], f["case"], f["metric"])] = f["noise"]
    return out


def floor_for(found: dict[tuple, float], row: Any) -> float | None:
    return found.get(tuple(row[k] for k in GROUP))


# ---------------------------------------------------------------------------------------------
# The command


def default_plans(count: int = 3) -> list[str]:
    """A small fixed set: the first non-reference option of the first ``count`` axes that have one."""
    from qwen3_vl.optim import AXES, options

    plans = []
    for axis in AXES:
        others = [o for o in options(axis) if not o.reference]
        if others:
            plans.append(f"{axis}={others[0].name}")
        if len(plans) == count:
            break
    return plans


@dataclass
class Options:
    runs: int = 3
    preset: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"
    suites: str = "latency,memory"
    plans: Sequence[str] = ()
    results_dir: str = "results"
    from_runs: Sequence[str] = ()
    keep: bool = False


def measure_runs(opts: Options, results_dir: Path) -> list[str]:
    """``opts.runs`` validate runs of the same code, each in its own process."""
    stamp = results.new_run_id()
    run_ids = []
    plans = list(opts.plans) or default_plans()
    for i in range(opts.runs):
        run_id = f"{stamp}-aa{i + 1}"
        cmd = [sys.executable, "-m", "harness", "validate", "--preset", opts.preset, "--device", opts.device,
               "--dtype", opts.dtype, "--suites", opts.suites, "--results-dir", str(results_dir), "--run-id", run_id,
               "--budget-s", "0"]
        for plan in plans:
            cmd += ["--plan", plan]
        print(f"noise: A/A run {i + 1} of {opts.runs}: {' '.join(cmd[1:])}", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode not in (0, 1):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"A/A run {i + 1} failed (exit {proc.returncode}): {tail}")
        run_ids.append(run_id)
    return run_ids


def report(found: list[Floor], config) -> list[str]:
    """One line per floor: the noise and whether the configured threshold can be gated at it."""
    lines = []
    for f in sorted(found, key=lambda f: (f.suite, f.case, f.metric)):
        kind = ("ratio" if f.metric == "ratio_to_reference" else "time" if f.metric.startswith(("time", "tokens"))
                else "memory")
        threshold = config.threshold(f.suite, f.case, f.metric, kind)
        if threshold is None:
            verdict = "informational"
        elif f.noise > threshold:
            verdict = f"threshold {threshold:.0%} REFUSED (below the noise); gate needs >= {min(f.noise, 99):.0%}"
        else:
            verdict = f"gated at {threshold:.0%}"
        noise = "inf" if math.isinf(f.noise) else f"{f.noise:.1%}"
        lines.append(f"{f.suite}/{f.case}/{f.metric} [{f.device}/{f.dtype}]: noise {noise} over {f.runs} runs x "
                     f"{f.plans} plan(s): {verdict}")
    return lines


def main(opts: Options) -> int:
    from harness import fingerprint, gate

    config = gate.load_config()
    results_dir = Path(opts.results_dir)
    if opts.from_runs:
        if len(opts.from_runs) < 2:
            raise gate.GateError("--from needs at least two run ids (A/A runs of the same code)")
        files = [f for r in opts.from_runs for f in gate.run_files(results_dir, r)]
        missing = [r for r in opts.from_runs if not gate.run_files(results_dir, r)]
        if missing:
            raise gate.GateError(f"no run '{missing[0]}' under '{results_dir}'")
        frame = results.load(files)
        run_ids = list(opts.from_runs)
    else:
        if opts.runs < 2:
            raise gate.GateError("--runs must be at least 2 (the noise is the difference between runs)")
        results.check_writable(results_dir)
        with tempfile.TemporaryDirectory(prefix="harness-noise-") as tmp:
            where = results_dir if opts.keep else Path(tmp)
            run_ids = measure_runs(opts, where)
            frame = results.load([f for r in run_ids for f in gate.run_files(where, r)])
    found = floors(frame)
    if not found:
        raise gate.GateError("no value was measured in two runs or more: nothing to derive a noise floor from")
    here = fingerprint.collect()["id"]
    for fp, items in found.items():
        path = write(results_dir, fp, items, run_ids)
        print(f"noise floor of fingerprint {fp}{' (this machine)' if fp == here else ''}: {path}")
        for line in report(items, config):
            print(f"  {line}")
    return 0
