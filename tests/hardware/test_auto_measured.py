"""plan="auto" on CPU from stored measurements (a synthetic results store), and the profile fallback."""

from __future__ import annotations

import dataclasses
import sys

import pytest

import qwen3_vl.config

pytest.importorskip("pandas")

from harness import fingerprint, results
from qwen3_vl.hardware import measured
from qwen3_vl.hardware.auto import choose
from qwen3_vl.optim.plan import Plan, Target

FP = {"id": "feedfacefeedface", "stable": {"cpu": {"model": "test CPU"}}}
PACKED = "attention=sdpa,kv_cache=static,execution=cpu_packed"
STATIC = "attention=sdpa,kv_cache=static"


def bench_rows(run_id: str, timings: dict[str, float], dtype="fp32", device="cpu", suite="bench",
               metric="decode_ms_per_token", case=None, preset="mini") -> list[dict]:
    run = results.RunInfo(run_id, FP["id"], preset, dtype)
    return [results.make_row(run, device, suite, case or plan_id, results.Measurement(metric, value, "ms"),
                             Plan.parse(plan_id))
            for plan_id, value in timings.items()]


def frame(*row_lists):
    return results.to_frame([r for rows in row_lists for r in rows])


def test_fastest_exact_plan_of_the_latest_run():
    older = bench_rows("20260101T000000Z-aaaaaa", {STATIC: 10.0, "reference": 50.0})  # older: not compared
    latest = bench_rows("20260102T000000Z-bbbbbb", {
        PACKED: 30.0, STATIC: 40.0, "reference": 60.0,
        "attention=sdpa,quant=int8_weight": 9.0,  # approximate: never chosen by auto
        "attention=sdpa,kv_cache=static,execution=cuda_graph": 5.0,  # would fall back on CPU: not as measured
    })
    latest += bench_rows("20260102T000000Z-bbbbbb", {PACKED: 1.0}, dtype="bf16")  # another dtype
    plan, why = measured.best_measured_plan(frame(older, latest), Target("cpu"), "fp32")
    assert plan == Plan.parse(PACKED)
    assert why.startswith("measured") and "20260102T000000Z-bbbbbb" in why and "30.0 ms" in why


def test_timings_of_the_models_preset_come_first():
    run = "20260105T000000Z-eeeeee"
    rows = bench_rows(run, {STATIC: 1.0, PACKED: 2.0}, preset="tiny") + bench_rows(run, {STATIC: 40.0, PACKED: 30.0})
    assert measured.best_measured_plan(frame(rows), Target("cpu"), "fp32", "mini")[0] == Plan.parse(PACKED)
    assert measured.best_measured_plan(frame(rows), Target("cpu"), "fp32", "tiny")[0] == Plan.parse(STATIC)
    assert measured.closest_preset(qwen3_vl.config.preset("mini")) == "mini"
    bigger_mini = dataclasses.replace(qwen3_vl.config.preset("mini"), image_token_id=7)
    assert measured.closest_preset(bigger_mini) == "mini"  # not a preset: the nearest in text size


def test_latency_suite_rows_count_and_failed_rows_do_not():
    rows = bench_rows("20260103T000000Z-cccccc", {STATIC: 0.020}, suite="latency", metric="time",
                      case="decode_per_token")
    rows += bench_rows("20260103T000000Z-cccccc", {PACKED: 0.030}, suite="latency", metric="time",
                       case="decode_per_token")
    failed = bench_rows("20260103T000000Z-cccccc", {"attention=eager": 0.001}, suite="latency", metric="time",
                        case="decode_per_token")
    failed[0].update(status="failed")
    plan, _ = measured.best_measured_plan(frame(rows, failed), Target("cpu"), "fp32")
    assert plan == Plan.parse(STATIC)


@pytest.mark.parametrize("rows", [[], bench_rows("20260104T000000Z-dddddd", {PACKED: 1.0}, device="cuda:0"),
                                  bench_rows("20260104T000000Z-dddddd", {"quant=int8_weight": 1.0})])
def test_nothing_usable_says_why(rows):
    plan, why = measured.best_measured_plan(frame(rows), Target("cpu"), "fp32")
    assert plan is None and why.startswith("no stored")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "collect", lambda: FP)
    return tmp_path


def test_auto_on_cpu_takes_the_stored_plan(store):
    rows = bench_rows(results.new_run_id(), {PACKED: 30.0, STATIC: 40.0})
    results.write_run(rows, store, FP, rows[0]["run_id"])
    choice = choose("cpu", "fp32", "auto", results_dir=store)
    assert choice.plan == Plan.parse(PACKED)
    assert choice.plan_source.startswith("measured") and FP["id"] in choice.plan_source
    assert "auto plan: measured" in choice.report()


def test_auto_falls_back_to_the_profile_without_stored_results(store):
    choice = choose("cpu", "fp32", "auto", results_dir=store)
    assert choice.plan["execution"].name == "cpu_packed"  # the CPU profiles' preference
    assert choice.plan_source.startswith(f"profile {choice.profile.name}") and "no stored results" in choice.plan_source


def test_auto_falls_back_to_the_profile_without_pandas(store, monkeypatch):
    rows = bench_rows(results.new_run_id(), {STATIC: 1.0})
    results.write_run(rows, store, FP, rows[0]["run_id"])
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` fails as where it is not installed
    choice = choose("cpu", "fp32", "auto", results_dir=store)
    assert choice.plan_source.startswith("profile") and "pandas is not installed" in choice.plan_source
    assert choice.plan["execution"].name == "cpu_packed"
