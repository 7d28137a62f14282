"""``plan="auto"`` from measured results: the fastest exact plan stored for this machine.

The results store (``harness.results``: parquet files under ``results/<fingerprint id>/``) holds
what ``python -m harness.bench`` and the latency suite measured. When this machine's fingerprint
has stored decode timings, ``plan="auto"`` takes the fastest exact plan of the most recent run
that measured one (plans of one run were timed interleaved, so they compare fairly; runs made at
different times and loads do not), on the preset closest to the model being built when the store
has timings of it (the best plan for ``tiny`` need not be the best for ``mini``). Only exact plans
qualify (approximate options are asked for by name, as with the profiles), and only plans that
run on the target as they are (no fallback).

Reading the store needs the harness extras (pandas, pyarrow, psutil, py-cpuinfo); without them,
or without stored results, the caller falls back to the hardware profile. Which path chose the
plan, and why, is returned as a sentence.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen3_vl.optim.plan import Plan, PlanError, Target, resolve

# (suite, case or None for any, metric) -> seconds per unit of the metric's value
DECODE_METRICS = {("bench", None, "decode_ms_per_token"): 1e-3, ("latency", "decode_per_token", "time"): 1.0}


def default_results_dir() -> Path:
    env = os.environ.get("QWEN3_VL_RESULTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "results"


def _exact_and_runs(plan: Plan, target: Target) -> bool:
    from qwen3_vl.optim.registry import get

    try:
        used, fallbacks = resolve(plan, target)
    except PlanError:
        return False
    return not fallbacks and all(get(axis, choice.name).exact for axis, choice in used.choices)


def closest_preset(config) -> str:
    """The preset equal to ``config``, else the one with the nearest text parameter count."""
    from qwen3_vl.config import PRESETS, parameter_count

    for name, candidate in PRESETS.items():
        if candidate == config:
            return name
    size = parameter_count(config)["text"]
    return min(PRESETS, key=lambda name: abs(parameter_count(PRESETS[name])["text"] - size))


def best_measured_plan(frame, target: Target, dtype: str, preset: str | None = None) -> tuple[Plan | None, str]:
    """The fastest exact plan of the latest run in ``frame`` (a ``harness.results.load`` table) with
    decode timings for ``target``'s device type and ``dtype`` (of ``preset`` when it has some, else
    of any preset); (None, why not) when there is none."""
    if frame is None or len(frame) == 0:
        return None, "no stored results"
    rows = frame[(frame["status"] == "ok") & (frame["plan_id"] != "") & (frame["dtype"] == dtype)
                 & (frame["device"].str.split(":").str[0] == target.device_type)]
    candidates = []
    for (suite, case, metric), seconds in DECODE_METRICS.items():
        hit = rows[(rows["suite"] == suite) & (rows["metric"] == metric)]
        if case is not None:
            hit = hit[hit["case"] == case]
        candidates.append(hit.assign(seconds=hit["value"] * seconds))
    import pandas as pd

    rows = pd.concat(candidates)
    if len(rows) == 0:
        return None, f"no stored decode timings for {target.device_type} {dtype}"
    usable = {}
    for plan_id in rows["plan_id"].unique():
        try:
            plan = Plan.parse(plan_id)
        except PlanError:  # an option this build no longer has
            continue
        if _exact_and_runs(plan, target):
            usable[plan_id] = plan
    rows = rows[rows["plan_id"].isin(list(usable))]
    if len(rows) == 0:
        return None, f"no stored exact plan that runs on {target.device_type} as measured"
    if preset is not None and (rows["preset"] == preset).any():
        rows = rows[rows["preset"] == preset]
    latest = rows.sort_values("timestamp")["run_id"].iloc[-1]
    run = rows[rows["run_id"] == latest].groupby("plan_id")["seconds"].median().sort_values()
    best = run.index[0]
    on = rows["preset"].iloc[0]
    return usable[best], (f"measured: run {latest} timed {len(run)} exact plan(s) on {on}, fastest "
                          f"{run.iloc[0] * 1e3:.1f} ms/token")


def measured_plan(target: Target, dtype: str, results_dir: str | Path | None = None,
                  config=None) -> tuple[Plan | None, str]:
    """``best_measured_plan`` over the stored results of this machine's fingerprint."""
    try:
        import pandas  # noqa: F401  (a harness extra; the store is parquet read through it)

        from harness import fingerprint, results
    except ImportError as exc:
        return None, f"the results store cannot be read here ({exc.name} is not installed)"
    folder = Path(results_dir) if results_dir is not None else default_results_dir()
    fingerprint_id = fingerprint.collect()["id"]
    if not (folder / fingerprint_id).is_dir():
        return None, f"no stored results for this machine's fingerprint {fingerprint_id} in {folder}"
    try:
        frame = results.load(folder / fingerprint_id)
    except (OSError, ValueError) as exc:
        return None, f"stored results for {fingerprint_id} unreadable: {exc}"
    plan, why = best_measured_plan(frame, target, dtype, None if config is None else closest_preset(config))
    return plan, f"{why} (fingerprint {fingerprint_id})"
