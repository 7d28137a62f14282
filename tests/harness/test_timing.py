"""Interleaved timing: order rotates, warm-up is not recorded, a failing target is dropped, ratios are
per round, and the JSON is pytest-benchmark's own format."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest

from harness import timing


def test_rounds_rotate_and_warmup_is_excluded():
    calls = []

    def target(name, seconds):
        def run(clock):
            calls.append(name)
            with clock():
                time.sleep(seconds)
        return run

    out = timing.interleaved({"a": target("a", 0.001), "b": target("b", 0.02), "c": target("c", 0.001)},
                             rounds=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"] and calls[6:9] == ["c", "a", "b"]
    assert [len(r) for r in out["a"].clock.rounds] == [1, 1, 1]  # the warm-up round is gone
    ratios = timing.round_ratios(out["b"].clock, out["a"].clock)
    assert len(ratios) == 3 and statistics.median(ratios) > 2  # a sleep never undershoots; it may overshoot


def test_several_regions_per_call_and_token_counts():
    def decode(clock):
        for _ in range(4):
            with clock(tokens=2):
                pass

    out = timing.interleaved({"d": decode}, rounds=2, warmup=0)
    assert len(out["d"].clock.samples) == 8 and out["d"].clock.tokens == 2


def test_a_failing_target_is_dropped_the_others_go_on():
    seen = []

    def bad(clock):
        raise RuntimeError("out of memory")

    def good(clock):
        seen.append(1)
        with clock():
            pass

    out = timing.interleaved({"bad": bad, "good": good}, rounds=3, warmup=1)
    assert "out of memory" in out["bad"].error and len(seen) == 4 and len(out["good"].clock.samples) == 3


def test_percentile():
    assert timing.percentile([1, 2, 3, 4, 5], 50) == 3
    assert timing.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)


def test_benchmark_json_is_read_by_pytest_benchmark(tmp_path):
    record = timing.BenchmarkRecord(group="latency.prefill", name="prefill[reference]",
                                    fullname="suites/latency.py::time_prefill[reference]", params={"plan": "reference"},
                                    samples=[0.01, 0.012, 0.011], extra_info={"ratio_to_reference": 1.0})
    doc = timing.benchmark_json([record], {"id": "f" * 16})
    assert doc["benchmarks"][0]["stats"]["median"] == 0.011 and doc["benchmarks"][0]["stats"]["data"]
    path = tmp_path / "0001_run.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "prefill[reference]" in proc.stdout
