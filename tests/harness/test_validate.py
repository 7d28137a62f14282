"""``python -m harness validate`` end to end on a small model: results stored, a crashing combination
recorded as failed without stopping the run, shards that merge, and one clear line for bad input."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from rich.console import Console

from harness import matrix, results, validate
from harness.__main__ import main as cli
from qwen3_vl.optim import Optimization, Plan, Target, reference_plan

from . import faults
from .conftest import copy_of_reference


def run(tmp_path, preset, settings, **kw) -> int:
    opts = validate.Options(preset=preset, device="cpu", results_dir=str(tmp_path), settings=settings, **kw)
    with open(tmp_path / "console.txt", "a") as log:
        return validate.main(opts, Console(file=log, width=200))


def test_a_small_run_stores_every_suite(tmp_path, small_preset, fast_settings, extra_options):
    extra_options(faults.HONEST_COPY)
    code = run(tmp_path, small_preset, fast_settings, suites=["numerics", "latency", "memory"],
               plans=["reference", "attention=honest_copy"])
    assert code == validate.EXIT_OK, (tmp_path / "console.txt").read_text()
    frame = results.load(tmp_path)
    assert set(frame["suite"]) >= {"numerics", "accuracy", "latency", "memory"}
    assert not (frame["status"] == "failed").any()
    skipped = frame[frame["status"] == "skipped"]
    assert list(skipped["case"]) == ["golden"] and "no golden outputs" in skipped.iloc[0]["error"]
    honest = frame[frame["plan_short"] == "attention=honest_copy"]
    ratio = honest[(honest["case"] == "decode_per_token") & (honest["metric"] == "ratio_to_reference")]
    assert len(ratio) == 1 and len(ratio.iloc[0]["samples"]) == fast_settings.rounds
    decode = honest[(honest["case"] == "decode_per_token") & (honest["metric"] == "time")].iloc[0]
    assert len(decode["samples"]) == fast_settings.rounds * (fast_settings.new_tokens - 1)
    assert honest[(honest["suite"] == "memory") & (honest["metric"] == "kv_cache_bytes")]["value"].min() > 0
    assert (honest["attention"] == "honest_copy").all() and (honest["repro"].str.contains("--plan")).all()
    reference = frame[(frame["plan_short"] == "reference") & (frame["suite"] == "latency")]
    assert set(reference["case"]) == {"vision_encode", "prefill", "decode_per_token", "generate"}
    assert list(tmp_path.rglob("*.benchmark.json"))


def test_a_crashing_combination_is_recorded_and_the_run_goes_on(tmp_path, small_preset, fast_settings,
                                                                extra_options):
    def out_of_memory(model, target):
        raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    extra_options(Optimization(name="oom", axis="attention", exact=True, summary="test-only", build=out_of_memory),
                  faults.WRONG_SCALE)
    code = run(tmp_path, small_preset, fast_settings, suites=["numerics", "memory"],
               plans=["attention=oom", "attention=wrong_scale", "reference"])
    assert code == validate.EXIT_FAILED
    frame = results.load(tmp_path)
    oom = frame[(frame["plan_short"] == "attention=oom") & (frame["status"] == "failed")]
    assert oom["error"].str.contains("out of memory").any()
    wrong = frame[frame["plan_short"] == "attention=wrong_scale"]
    assert (wrong[wrong["suite"] == "accuracy"]["status"] == "failed").any()
    assert (wrong[wrong["suite"] == "memory"]["status"] == "ok").all()  # measured despite the others failing


def test_shards_merge_into_the_whole_run(tmp_path, small_preset, fast_settings, extra_options):
    extra_options(faults.HONEST_COPY, faults.scaled("other_copy", 1.0))
    plans = ["reference", "attention=honest_copy", "attention=other_copy"]
    for shard in ("1/2", "2/2"):
        assert run(tmp_path, small_preset, fast_settings, suites=["memory"], plans=plans, shard=shard,
                   run_id="fleet") == validate.EXIT_OK
    frame = results.load(tmp_path)
    assert set(frame["shard"]) == {"1/2", "2/2"} and set(frame["run_id"]) == {"fleet"}
    assert set(frame["plan_short"]) == {"reference", "attention=honest_copy", "attention=other_copy"}


def test_budget_runs_the_pairwise_cover_first_and_records_the_rest(tmp_path, small_preset, fast_settings,
                                                                   references_only, extra_options, monkeypatch):
    extra_options(*(copy_of_reference(axis, f"copy{i}") for axis in ("attention", "rope", "kv_cache") for i in (1, 2)))
    cover = len(matrix.cover([c.plan for c in matrix.full(Target("cpu"))], first=reference_plan()))
    groups = 0  # a fake clock: every group of one combination takes 10 s

    def build_group(*args):
        nonlocal groups
        groups += 1
        return build(*args)

    build = validate._build_group
    monkeypatch.setattr(validate, "_build_group", build_group)
    monkeypatch.setattr(validate.Run, "elapsed", lambda self: 10.0 * groups)
    settings = fast_settings.replace(budget_s=10.0 * cover - 5, group_size=1)
    assert run(tmp_path, small_preset, settings, suites=["memory"]) == validate.EXIT_OK
    frame = results.load(tmp_path)
    skipped = frame[(frame["suite"] == "matrix") & (frame["status"] == "skipped")]
    measured = set(frame[(frame["suite"] == "memory") & (frame["case"] == "decode")]["plan_id"])
    assert len(measured) == cover < 27 and len(skipped) + len(measured) == 27
    assert skipped["error"].str.contains(f"budget was spent after {cover} of 27").all()
    assert skipped["error"].str.contains("pairwise cover of all of them was complete").all()
    varying = ("attention", "rope", "kv_cache")
    pairs = {pair for plan_id in measured
             for pair in itertools.combinations([c for c in Plan.parse(plan_id).choices if c[0] in varying], 2)}
    assert len(pairs) == 3 * 3 * 3  # every pair of choices of the three 3-way axes was measured


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--only", "attention=nope"], "unknown option 'nope' for axis 'attention'"),
    (["--plan", "attention=eager,bogus=1"], "unknown axis 'bogus'"),
    (["--plan", "attention=nope"], "unknown option 'nope' for axis 'attention'"),
    (["--shard", "3/2"], "invalid shard '3/2'"),
    (["--suites", "imports,speed"], "unknown suite 'speed'"),
    (["--device", "cuda:7"], "cuda"),
    (["--results-dir", "/proc/version/results"], "not writable"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert cli(["validate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harness: error:") and message in err[0]


def test_the_command_line_exit_code():
    proc = subprocess.run([sys.executable, "-m", "harness", "validate", "--shard", "0/1"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "shards are numbered from 1" in proc.stderr


def test_golden_check_of_an_fp16_run_uses_the_fp32_weights(tmp_path):
    """The golden outputs come from transformers on the seeded fp32 weights; an fp16 run's own weights
    are rounded to fp16, 2.8e-4 away (found on an H200), so the check must rebuild from fp32."""
    proc = subprocess.run([sys.executable, "-m", "harness", "validate", "--preset", "tiny", "--device", "cpu",
                           "--dtype", "fp16", "--suites", "numerics", "--plan", "reference",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    df = results.load(tmp_path)
    golden = df[df.case.str.startswith("golden")]
    assert len(golden) >= 4 and (golden.status == "ok").all()
    assert golden[golden.metric == "logits_rel"].value.max() <= 1e-5
