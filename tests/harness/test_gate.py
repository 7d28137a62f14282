"""The gate: like compared with like, thresholds AND significance, noise floors, exit codes, reports.

Synthetic runs (written through the real results store) check each rule; real runs of the tiny
preset on this machine check the acceptance: A/A passes, an injected slowdown (a test-only option
that sleeps) fails naming the case, another fingerprint gives exit 3.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import qwen3_vl
from harness import gate, noise, results
from harness.__main__ import main as cli
from harness.results import Measurement, RunInfo
from harness.settings import Settings
from qwen3_vl.optim import Plan
from qwen3_vl.optim.attention.eager import EagerAttention
from qwen3_vl.optim.plan import Optimization

FP = "f00dfeedf00dfeed"
PLANS = ["attention=sdpa", "kv_cache=quant_int4", "kv_cache=quant_int4,attention=sdpa", "rope=cached",
         "attention=sdpa,rope=cached", "kv_cache=quant_int8"]
CASES = ("prefill", "decode_per_token")
REPO = Path(__file__).resolve().parents[2]


def synthetic_run(run_id: str, *, fp: str = FP, seed: int = 0, slower: dict[str, float] | None = None,
                  rounds: int = 5, plans=PLANS, when: datetime | None = None, extra=()) -> list[dict]:
    """Rows like a latency/memory run: per plan and case, ``rounds`` per-round ratios near 1 (2% noise)
    and absolute times; ``slower`` multiplies a plan's latency by a factor."""
    rng = random.Random(seed)
    info = RunInfo(run_id=run_id, fingerprint_id=fp, preset="tiny", dtype="fp32", git_sha="abc",
                   timestamp=when or datetime(2025, 1, 1, tzinfo=timezone.utc))
    rows = []
    for spec in plans:
        plan = Plan.parse(spec)
        factor = (slower or {}).get(spec, 1.0)
        for case in CASES:
            ratios = [factor * (1.0 + rng.gauss(0, 0.01)) for _ in range(rounds)]
            times = [0.01 * r * (1 + rng.gauss(0, 0.2)) for r in ratios]
            for m in (Measurement("ratio_to_reference", sorted(ratios)[rounds // 2], "x", ratios, better="lower"),
                      Measurement("time", sorted(times)[rounds // 2], "s", times, better="lower")):
                rows.append(results.make_row(info, "cpu", "latency", case, m, plan,
                                             repro=f"python -m harness validate --plan '{plan.id}' --suites latency"))
        rows.append(results.make_row(info, "cpu", "memory", "decode", Measurement("kv_cache_bytes", 40960.0, "B",
                                                                                  better="lower"), plan))
        rows.append(results.make_row(info, "cpu", "accuracy", "prefill", Measurement(
            "logits_rel", 1e-7, "ratio", bound=1e-5, better="lower"), plan))
    rows.extend(r(info) for r in extra)
    return rows


def write(tmp_path: Path, rows: list[dict], fp: str = FP, run_id: str | None = None) -> Path:
    run_id = run_id or rows[0]["run_id"]
    return results.write_run(rows, tmp_path, {"id": fp, "stable": {}}, run_id)


def frame(rows):
    return results.to_frame(rows)


def judge(base_rows, cand_rows, config=None, floors=None) -> gate.GateResult:
    return gate.compare(frame(base_rows), frame(cand_rows), config or gate.GateConfig(), floors)


def regressed(result: gate.GateResult) -> set[tuple[str, str]]:
    return {(c.name, c.plan_short) for c in result.regressions}


# ---------------------------------------------------------------------------------------------
# Decisions


def test_identical_code_passes_and_the_ratio_is_what_is_gated():
    result = judge(synthetic_run("a", seed=1), synthetic_run("b", seed=2))
    assert result.exit_code == gate.EXIT_OK, gate.markdown(result)
    verdicts = {(c.metric, c.verdict) for c in result.comparisons}
    assert ("ratio_to_reference", "unchanged") in verdicts
    times = [c for c in result.comparisons if c.metric == "time"]
    assert times and all(c.verdict == "ungated" and "noise floor" in c.note for c in times)


def test_a_twenty_percent_slowdown_fails_and_names_the_case():
    result = judge(synthetic_run("a", seed=1), synthetic_run("b", seed=2, slower={"rope=cached": 1.2}))
    assert result.exit_code == gate.EXIT_REGRESSION
    assert regressed(result) == {("latency/prefill/ratio_to_reference", "rope=cached"),
                                 ("latency/decode_per_token/ratio_to_reference", "rope=cached")}
    c = result.regressions[0]
    assert 0.15 < c.change < 0.25 and c.p_value < 0.01 and c.axes["rope"] == "cached"
    md = gate.markdown(result)
    assert "latency/decode_per_token/ratio_to_reference" in md and "rope=cached" in md and "p=" in md


def test_a_change_below_the_threshold_is_not_a_regression():
    result = judge(synthetic_run("a", seed=1), synthetic_run("b", seed=2, slower={"rope=cached": 1.05}))
    assert result.exit_code == gate.EXIT_OK
    assert all(c.verdict == "unchanged" for c in result.comparisons if c.metric == "ratio_to_reference")


def test_a_large_change_that_is_not_significant_is_reported_as_noisy():
    base = synthetic_run("a", seed=1, rounds=5)
    cand = synthetic_run("b", seed=2, rounds=5)
    row = next(r for r in cand if r["plan_short"] == "rope=cached" and r["metric"] == "ratio_to_reference")
    row["samples"] = [0.7, 0.9, 1.3, 1.4, 1.5]  # median up 30%, but overlapping the baseline's rounds
    row["value"] = 1.3
    result = judge(base, cand)
    mine = next(c for c in result.comparisons if c.plan_short == "rope=cached" and c.metric == "ratio_to_reference"
                and c.case == row["case"])
    assert mine.verdict == "noisy" and "not significant" in mine.note
    assert result.exit_code == gate.EXIT_OK


def test_too_few_rounds_to_reach_the_p_value_are_said_so():
    config = gate.GateConfig(p_value=0.002)  # 5 vs 5 rounds: the smallest one-sided p is 1/252
    result = judge(synthetic_run("a"), synthetic_run("b", slower={"rope=cached": 1.5}), config)
    c = next(c for c in result.comparisons if c.metric == "ratio_to_reference")
    assert c.verdict == "ungated" and "cannot reach p < 0.002" in c.note


def test_higher_is_better_metrics_count_a_drop_as_worse():
    assert gate.worse_by(10.0, 8.0, "higher") == pytest.approx(0.25)
    assert gate.worse_by(10.0, 12.0, "lower") == pytest.approx(0.2)
    assert gate.worse_by(0.0, 5.0, "lower") == float("inf")
    p_worse, p_better = gate.mann_whitney([10, 11, 12, 13, 14], [5, 6, 7, 8, 9], "higher")
    assert p_worse < 0.01 < p_better


def test_another_fingerprint_is_not_comparable_and_says_how_to_record_one():
    result = judge(synthetic_run("a"), synthetic_run("b", fp="0123456789abcdef"))
    assert result.exit_code == gate.EXIT_NOTHING_COMPARABLE and not result.comparisons
    (n,) = result.not_comparable
    assert "no baseline results for fingerprint 0123456789abcdef" in n.reason and FP in n.reason
    assert "python -m harness validate" in n.reason


def test_other_preset_dtype_and_plans_are_not_comparable_with_reasons():
    base = synthetic_run("a", plans=PLANS[:2])
    cand = synthetic_run("b", plans=PLANS[:3])
    result = judge(base, cand)
    assert result.exit_code == gate.EXIT_OK
    assert any("not measured in the baseline" in n.reason and PLANS[2].split(",")[0] in n.what
               for n in result.not_comparable)
    other = [dict(r, preset="mini") for r in synthetic_run("c")]
    result = judge(base, other)
    assert result.exit_code == gate.EXIT_NOTHING_COMPARABLE
    assert "only for preset(s) tiny" in result.not_comparable[0].reason
    other = [dict(r, dtype="bf16") for r in synthetic_run("d")]
    assert "no dtype bf16" in judge(base, other).not_comparable[0].reason


def test_a_check_that_newly_fails_is_a_regression_and_a_fixed_one_is_not():
    base, cand = synthetic_run("a"), synthetic_run("b")
    row = next(r for r in cand if r["suite"] == "accuracy" and r["plan_short"] == "kv_cache=quant_int8")
    row.update(value=3e-5, status="failed", error="logits_rel = 3e-05, above 1e-05")
    result = judge(base, cand)
    assert result.exit_code == gate.EXIT_REGRESSION
    (c,) = result.regressions
    assert c.verdict == "newly failing" and c.name == "accuracy/prefill/logits_rel" and "above 1e-05" in c.note
    fixed = judge(cand, base)
    assert fixed.exit_code == gate.EXIT_OK and fixed.counts()["fixed"] == 1


def test_attribution_names_the_option_every_slow_combination_shares():
    slow = {p: 1.18 for p in PLANS if "quant_int4" in p}
    result = judge(synthetic_run("a", seed=3), synthetic_run("b", seed=4, slower=slow))
    sentences = [a.sentence() for a in result.attributions]
    assert any(s.startswith("all 2 combination(s) with kv_cache=quant_int4 are 18% slower") for s in sentences), \
        sentences
    assert not any("attention=sdpa" in s for s in sentences)  # half its combinations are fine
    assert "kv_cache=quant_int4" in gate.markdown(result)


# ---------------------------------------------------------------------------------------------
# Noise floors


def test_a_threshold_below_the_measured_noise_is_refused():
    floors = {(FP, "tiny", "cpu", "fp32", "latency", "prefill", "ratio_to_reference"): 0.15}
    result = judge(synthetic_run("a"), synthetic_run("b", slower={"rope=cached": 1.3}), floors=floors)
    prefill = [c for c in result.comparisons if c.case == "prefill" and c.metric == "ratio_to_reference"]
    assert all(c.verdict == "ungated" and "threshold refused: 10.0% is below the measured A/A noise floor 15.0%"
               in c.note and "at least 15.0%" in c.note for c in prefill)
    assert regressed(result) == {("latency/decode_per_token/ratio_to_reference", "rope=cached")}
    config = gate.GateConfig(metrics={"latency/prefill/ratio_to_reference": 0.2})
    result = judge(synthetic_run("a"), synthetic_run("b", slower={"rope=cached": 1.3}), config, floors)
    assert ("latency/prefill/ratio_to_reference", "rope=cached") in regressed(result)


def test_absolute_times_and_single_values_are_gated_only_where_the_noise_floor_allows():
    floors = {(FP, "tiny", "cpu", "fp32", "latency", case, "time"): 0.05 for case in CASES}
    floors[(FP, "tiny", "cpu", "fp32", "memory", "decode", "kv_cache_bytes")] = 0.0
    cand = synthetic_run("b")
    for r in cand:
        if r["metric"] == "kv_cache_bytes" and r["plan_short"] == "rope=cached":
            r["value"] = 40960.0 * 1.5
    result = judge(synthetic_run("a"), cand, floors=floors)
    times = [c for c in result.comparisons if c.metric == "time"]
    assert times and not any(c.verdict == "ungated" for c in times)
    assert ("memory/decode/kv_cache_bytes", "rope=cached") in regressed(result)
    unbounded = {**floors, (FP, "tiny", "cpu", "fp32", "memory", "decode", "kv_cache_bytes"): float("inf")}
    result = judge(synthetic_run("a"), cand, floors=unbounded)
    kv = [c for c in result.comparisons if c.metric == "kv_cache_bytes"]
    assert all(c.verdict == "ungated" and "unbounded" in c.note for c in kv)
    noisy = {k: 0.5 for k in floors}
    result = judge(synthetic_run("a"), synthetic_run("b"), floors=noisy)
    assert all(c.verdict == "ungated" for c in result.comparisons if c.metric == "time")


def test_noise_floor_is_the_worst_spread_between_runs_and_round_trips(tmp_path):
    rows = synthetic_run("r1", seed=1) + synthetic_run("r2", seed=2) + synthetic_run("r3", seed=3)
    found = noise.floors(frame(rows))[FP]
    by_key = {(f.suite, f.case, f.metric): f for f in found}
    kv = by_key[("memory", "decode", "kv_cache_bytes")]
    assert kv.noise == 0.0 and kv.runs == 3 and kv.plans == len(PLANS)
    ratio = by_key[("latency", "prefill", "ratio_to_reference")]
    assert 0 < ratio.noise < 0.1
    assert noise.spread([1.0, 0.0]) == float("inf")
    noise.write(tmp_path, FP, found, ["r1", "r2", "r3"])
    loaded = noise.load_floors([tmp_path])
    assert loaded[(FP, "tiny", "cpu", "fp32", "latency", "prefill", "ratio_to_reference")] == pytest.approx(ratio.noise)


def test_noise_command_derives_floors_from_stored_runs(tmp_path, capsys):
    for i in (1, 2, 3):
        write(tmp_path, synthetic_run(f"aa{i}", seed=i))
    assert cli(["noise", "--from", "aa1", "aa2", "aa3", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "latency/prefill/time" in out and (tmp_path / FP / "noise.json").exists()
    assert cli(["noise", "--from", "aa1", "--results-dir", str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------
# Configuration, references, command line


def test_thresholds_per_metric_and_per_suite(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.harness.gate]\nlatency = 0.2\np_value = 0.02\n[tool.harness.gate.suites.vision]\n'
                    'latency = 0.3\n[tool.harness.gate.metrics]\ntime_p90 = 0.5\n"memory/rss_peak" = 0.25\n')
    config = gate.load_config(path)
    assert config.threshold("latency", "prefill", "ratio_to_reference", "ratio") == 0.2
    assert config.threshold("vision", "first_image", "ratio_to_reference", "ratio") == 0.3
    assert config.threshold("latency", "prefill", "time_p90", "time") == 0.5
    assert config.threshold("memory", "decode", "rss_peak", "memory") == 0.25
    assert config.threshold("memory", "decode", "kv_cache_bytes", "memory") == 0.05
    assert config.threshold("accuracy", "prefill", "kl", "accuracy") is None
    path.write_text("[tool.harness.gate]\nlatencyy = 0.2\n")
    with pytest.raises(gate.GateError, match="unknown key 'latencyy'"):
        gate.load_config(path)
    path.write_text("[tool.harness.gate]\nlatency = '10%'\n")
    with pytest.raises(gate.GateError, match=r"relative change such as 0\.10"):
        gate.load_config(path)


def test_the_project_configuration_loads():
    config = gate.load_config()
    assert 0 < config.latency < 1 and 0 < config.memory < 1


def test_refs_resolve_as_run_id_file_folder_and_git_ref(tmp_path):
    store = tmp_path / "results"
    path = write(store, synthetic_run("run-one"))
    write(store, synthetic_run("run-two", seed=5, when=datetime(2025, 2, 1, tzinfo=timezone.utc)))
    work = tmp_path / "work"
    work.mkdir()
    assert gate.resolve("run-one", store, work).frame["run_id"].unique().tolist() == ["run-one"]
    assert gate.resolve(str(path), store, work).frame["run_id"].unique().tolist() == ["run-one"]
    both = gate.resolve(str(store), store, work).frame
    assert set(both["run_id"]) == {"run-one", "run-two"}
    assert set(gate.latest(both)["run_id"]) == {"run-two"}  # a folder gives each key's latest run
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    write(repo / "results", synthetic_run("committed"))
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)
    git("init", "-q")
    git("add", "results")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    write(repo / "results", synthetic_run("uncommitted"))
    source = gate.resolve("HEAD", repo / "nowhere", work, cwd=repo)
    assert source.frame["run_id"].unique().tolist() == ["committed"] and "git HEAD" in source.label
    with pytest.raises(gate.GateError, match="not a results file, a folder, a run id"):
        gate.resolve("no-such-thing", store, work, cwd=repo)


def test_cli_exit_codes_and_markdown_report(tmp_path, capsys):
    store = tmp_path / "results"
    write(store, synthetic_run("base", seed=1))
    write(store, synthetic_run("same", seed=2))
    write(store, synthetic_run("slow", seed=3, slower={"attention=sdpa": 1.25}))
    other = synthetic_run("elsewhere", fp="aaaaaaaaaaaaaaaa")
    write(store, other, fp="aaaaaaaaaaaaaaaa")
    args = ["--results-dir", str(store)]
    assert cli(["gate", "--baseline", "base", "--candidate", "same", *args]) == 0
    report = tmp_path / "gate.md"
    assert cli(["gate", "--baseline", "base", "--candidate", "slow", "--report", str(report), *args]) == 1
    text = report.read_text()
    assert "FAIL" in text and "attention=sdpa" in text and "| regressed |" in text
    stored = json.loads((store / "gate" / "last.json").read_text())
    assert stored["exit_code"] == 1 and stored["counts"]["regressed"] >= 2
    assert cli(["gate", "--baseline", "base", "--candidate", "elsewhere", *args]) == 3
    err = capsys.readouterr().err
    assert "nothing comparable" in err and "python -m harness validate" in err
    assert cli(["gate", "--baseline", "missing-run", "--candidate", "same", *args]) == 2
    assert "harness: error:" in capsys.readouterr().err


def test_report_escapes_text_from_results():
    base = synthetic_run("a")
    cand = synthetic_run("b")
    row = next(r for r in cand if r["suite"] == "accuracy")
    row.update(status="failed", error="<script>alert(1)</script> | `x`")
    md = gate.markdown(judge(base, cand))
    assert "<script>" not in md and "&lt;script&gt;" in md and "| `x`" not in md


# ---------------------------------------------------------------------------------------------
# Real runs on this machine (tiny preset, CPU)


class SleepyAttention(EagerAttention):
    """Eager attention that sleeps ``delay`` seconds per call: a slowdown the gate must see."""

    delay = 0.0

    def text(self, q, k, v, mask, scale):
        if SleepyAttention.delay:
            time.sleep(SleepyAttention.delay)
        return super().text(q, k, v, mask, scale)


SLEEPY = Optimization(name="sleepy", axis="attention", exact=True, summary="test-only: eager that sleeps",
                      build=lambda model, target: SleepyAttention())


def _validate(store: Path, run_id: str, plans, settings: Settings) -> Path:
    from harness import validate

    opts = validate.Options(preset="tiny", device="cpu", suites=["latency"], results_dir=str(store), plans=plans,
                            run_id=run_id, settings=settings)
    assert validate.main(opts) == 0
    return store


def test_injected_slowdown_from_a_sleeping_option_fails_with_exit_1_naming_the_case(tmp_path, extra_options, capsys):
    extra_options(SLEEPY)
    # 8 rounds: on a loaded machine a round can be descheduled; 8 vs 8 still reaches p < 0.01 with overlap.
    settings = Settings(budget_s=0.0, rounds=8, warmup=1, new_tokens=4, group_size=2)
    store = tmp_path / "results"
    SleepyAttention.delay = 0.0
    try:
        _validate(store, "before", ["attention=sleepy"], settings)
        base = results.load(store)
        decode = base[(base["case"] == "decode_per_token") & (base["metric"] == "time") & (base["plan_short"] ==
                                                                                         "reference")]
        layers = qwen3_vl.config.preset("tiny").text.num_hidden_layers  # one attention call per layer per step
        SleepyAttention.delay = 2 * float(decode["value"].iloc[0]) / layers  # two more steps' time: ~3x
        _validate(store, "after", ["attention=sleepy"], settings)
    finally:
        SleepyAttention.delay = 0.0
    capsys.readouterr()
    assert cli(["gate", "--baseline", "before", "--candidate", "after", "--results-dir", str(store)]) == 1
    out = capsys.readouterr().out
    assert "regressed" in out and "decode_per_token" in out and "attention=sleepy" in out


@pytest.mark.slow
def test_real_aa_runs_do_not_fail_the_gate_and_another_fingerprint_gives_exit_3(tmp_path):
    """Three real runs of the same code, each in its own process: every pair passes the gate with its
    confirmation step (as ``nox -s gate`` runs it). Without it, a loaded machine false-alarms now and
    then (3 of 91 A/A comparisons in the committed campaign, 0 of 91 after confirmation)."""
    store = tmp_path / "results"
    runs = [f"aa{i}" for i in range(3)]
    for run_id in runs:
        proc = subprocess.run([sys.executable, "-m", "harness", "validate", "--preset", "tiny", "--device", "cpu",
                               "--suites", "latency", "--plan", "attention=sdpa",
                               "--results-dir", str(store), "--run-id", run_id, "--budget-s", "0"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    codes = {}
    for a in runs:
        for b in runs:
            if a < b:
                codes[(a, b)] = cli(["gate", "--baseline", a, "--candidate", b, "--results-dir", str(store),
                                     "--no-store", "--confirm"])
    assert set(codes.values()) == {0}, codes
    moved = tmp_path / "other"
    rows = results.load(store)
    rows = rows[rows["run_id"] == "aa2"].drop(columns=["source_file"]).assign(fingerprint_id="0" * 16)
    axes = results.axis_columns(rows)
    results.write_run(rows.to_dict("records"), moved, {"id": "0" * 16}, "aa2-elsewhere", axes=axes)
    assert cli(["gate", "--baseline", "aa0", "--candidate", str(moved), "--results-dir", str(store),
                "--no-store"]) == 3


def test_latest_keeps_the_newest_run_per_key():
    old = synthetic_run("old", when=datetime(2025, 1, 1, tzinfo=timezone.utc))
    new = synthetic_run("new", when=datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(days=1), plans=PLANS[:1])
    picked = gate.latest(frame(old + new))
    assert set(picked[picked["plan_short"] == PLANS[0]]["run_id"]) == {"new"}
    assert set(picked[picked["plan_short"] == PLANS[1]]["run_id"]) == {"old"}


def test_a_newly_registered_axis_does_not_cut_history_in_two():
    """Old runs' plan ids lack the new axis; it is at its reference option, so they still compare."""
    base = synthetic_run("old")
    for row in base:
        row["plan_id"] = ",".join(p for p in gate._split_plan(row["plan_id"]) if not p.startswith("vision="))
    result = judge(base, synthetic_run("new", slower={"rope=cached": 1.3}))
    assert not result.not_comparable
    assert ("latency/prefill/ratio_to_reference", "rope=cached") in regressed(result)
    assert gate.plan_key("attention=sdpa,rope=standard,kv_cache=quant_int4[residual=0]") == \
        "attention=sdpa,kv_cache=quant_int4[residual=0]"


def test_confirmation_dismisses_a_regression_a_fresh_run_does_not_repeat(monkeypatch, tmp_path):
    base = synthetic_run("a", seed=1)
    cand = synthetic_run("b", seed=2, slower={"rope=cached": 1.3, "attention=sdpa": 1.3})
    fresh = synthetic_run("c", seed=3, slower={"rope=cached": 1.3})  # the sdpa slowdown does not come back
    asked = []

    def fake_measure(groups, results_dir, run_id, extra=()):
        asked.append({k: {p: sorted(v) for p, v in parts.items()} for k, parts in groups.items()})
        return [write(results_dir, fresh, run_id=run_id)]

    monkeypatch.setattr(gate, "measure", fake_measure)
    monkeypatch.setattr(gate, "machine_id", lambda: FP)
    result = judge(base, cand)
    assert {p for _, p in regressed(result)} == {"rope=cached", "attention=sdpa"}
    gate.confirm(result, frame(base), gate.GateConfig(), {}, tmp_path)
    assert {p for _, p in regressed(result)} == {"rope=cached"}
    assert all(c.confirmed for c in result.regressions)
    dismissed = [c for c in result.comparisons if c.plan_short == "attention=sdpa" and c.verdict == "noisy"]
    assert dismissed and all("not confirmed by a fresh run" in c.note for c in dismissed)
    (only,) = asked
    wanted = {Plan.parse(p).id for p in ("rope=cached", "attention=sdpa")}
    assert set(only[("tiny", "cpu", "fp32")]["latency"]) == wanted
    monkeypatch.setattr(gate, "machine_id", lambda: "another-machine")
    result = judge(base, cand)
    gate.confirm(result, frame(base), gate.GateConfig(), {}, tmp_path)
    assert result.exit_code == gate.EXIT_REGRESSION  # cannot be re-measured here: it stands, with a note
    assert all("could not be confirmed here" in c.note for c in result.regressions)
