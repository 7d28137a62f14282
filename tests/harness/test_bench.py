"""The side-by-side benchmark (harness/bench.py) on the tiny preset: what it stores and refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from harness import bench, results

PLANS = ["reference", "attention=sdpa,kv_cache=static,execution=cpu_packed", "quant=int8_weight"]


def test_plans_side_by_side_store_speed_error_and_llama_rows(tmp_path):
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps([
        {"model_type": "qwen3vl ?B Q8_0", "n_prompt": 115, "n_gen": 0, "avg_ts": 800.0, "n_threads": 2},
        {"model_type": "qwen3vl ?B Q8_0", "n_prompt": 0, "n_gen": 32, "avg_ts": 110.0, "n_threads": 2}]))
    # One warm-up round: a cold first-token round (lazy kernel setup) once measured longer than a warm
    # six-token one, and the bench then rightly refused the decode time as unresolvable.
    argv = ["--preset", "tiny", "--device", "cpu", "--threads", "1", "--rounds", "2", "--warmup", "1",
            "--new-tokens", "10", "--image-size", "64", "--results-dir", str(tmp_path / "r"),
            "--markdown", str(tmp_path / "t.md"), "--llama-bench", str(llama)]
    for plan in PLANS:
        argv += ["--plan", plan]
    assert bench.main(argv) == 0
    df = results.load(tmp_path / "r")
    value = df.set_index(["case", "metric"]).value
    for plan in PLANS:
        assert value[(plan, "greedy_tokens_equal_to_first")] >= (10 if plan != "quant=int8_weight" else 0)
        assert (plan, "decode_ms_per_token") in value.index and (plan, "ttft_ms") in value.index
        # a prompt of a new length: its first request, then that length once prepared
        assert value[(plan, "ttft_new_shape_ms")] > 0 and value[(plan, "ttft_new_shape_again_ms")] > 0
    # the exact plan agrees with the reference teacher-forced; the quantized one is measurably off
    assert value[(PLANS[1], "logits_rel")] <= 1e-5 and value[(PLANS[1], "top1_agreement")] == 1.0
    assert value[(PLANS[2], "logits_rel")] > 1e-4
    # each error is stored with what the plan declares: exactness, or the quant option's budget
    bound = df.set_index(["case", "metric"]).bound
    assert bound[(PLANS[1], "logits_rel")] == 1e-5 and bound[(PLANS[2], "kl")] == 0.002
    row = df[(df.case == PLANS[2]) & (df.metric == "kl")].iloc[0]
    assert row.status == ("ok" if row.value <= 0.002 else "failed")
    # the floor of a screened greedy plan counts the int8 screen it reads, not the fp32 output matrix
    floor = {p: value[(p, "decode_efficiency")] * value[(p, "decode_ms_per_token")] for p in PLANS[:2]}
    assert 0.2 < floor[PLANS[1]] / floor[PLANS[0]] < 0.5  # tiny: the output matrix is most of its text weights
    assert value[("llama.cpp Q8_0", "decode_tokens_per_s")] == 110.0
    table = (tmp_path / "t.md").read_text()
    assert "llama.cpp Q8_0, 2 threads (llama-bench)" in table and "110.0 (tg32)" in table


@pytest.mark.parametrize("content, message", [("not json", "cannot read llama-bench JSON"),
                                              ('{"a": 1}', "is not llama-bench JSON"),
                                              ('[{"n_gen": 0}]', "lacks n_prompt/n_gen/avg_ts")])
def test_bad_llama_bench_json_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert bench.main(["--preset", "tiny", "--llama-bench", str(path), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_python_m_harness_bench_is_the_bench(tmp_path, capsys):
    """``python -m harness bench`` (the issue's spelling) runs harness.bench with its own arguments."""
    from harness.__main__ import main

    path = tmp_path / "bad.json"
    path.write_text("not json")
    assert main(["bench", "--preset", "tiny", "--llama-bench", str(path), "--results-dir", str(tmp_path)]) == 2
    assert "cannot read llama-bench JSON" in capsys.readouterr().err


def test_kv_error_part_stores_each_approximate_kv_option_with_its_bound(tmp_path):
    from suites import bench_memory_quant

    assert bench_memory_quant.main(["--parts", "kv_error", "--results-dir", str(tmp_path)]) == 0
    df = results.load(tmp_path)
    err = df[df.case == "kv_error"]
    assert set(err.kv_cache) == {p.split("=", 1)[1] for p in bench_memory_quant.KV_APPROXIMATE}
    kl = err[err.metric == "kl"]
    assert len(kl) == len(bench_memory_quant.KV_APPROXIMATE) and kl.bound.notna().all()
    assert (kl.value > 0).all()  # every option compressed something on this conversation
    assert (kl.status == (kl.value <= kl.bound).map({True: "ok", False: "failed"})).all()


def test_a_plan_that_cannot_be_built_here_is_skipped_with_its_reason(tmp_path, capsys):
    argv = ["--preset", "tiny", "--device", "cpu", "--threads", "1", "--rounds", "1", "--warmup", "0",
            "--new-tokens", "2", "--image-size", "0", "--prompt-tokens", "8", "--results-dir", str(tmp_path / "r"),
            "--plan", "reference", "--plan", "execution=cpu_packed[kernel=nope]"]
    assert bench.main(argv) == 0
    assert "skipped execution=cpu_packed[kernel=nope]: cpu_packed kernel 'nope' unknown" in capsys.readouterr().err
    assert set(results.load(tmp_path / "r").case) == {"reference", "floor"}
    assert bench.main([*argv[:-4], "--plan", "execution=cpu_packed[kernel=nope]"]) == 2


def test_an_engine_whose_capture_failed_is_stored_as_failed_not_as_the_options_speed(tmp_path, monkeypatch, capsys):
    """A graph option that fell back to eager decoding at run time (here: the eager option made to report a failed
    capture) produces tokens, but its times are the fallback's: its rows are stored as failed with the cause."""
    from qwen3_vl.optim.execution.eager import EagerExecution

    monkeypatch.setattr(EagerExecution, "describe",
                        lambda self: {"option": "eager", "capture_error": "InductorError: the cause"})
    argv = ["--preset", "tiny", "--device", "cpu", "--threads", "1", "--rounds", "1", "--warmup", "0",
            "--new-tokens", "4", "--image-size", "0", "--prompt-tokens", "8", "--results-dir", str(tmp_path / "r"),
            "--plan", "reference", "--plan", "attention=sdpa,kv_cache=static,execution=cpu_packed"]
    assert bench.main(argv) == 0
    df = results.load(tmp_path / "r")
    ref = df[df.case == "reference"]
    assert set(ref.status) == {"failed"} and set(ref.metric) == {"decode_ms_per_token"}
    assert ref.error.iloc[0] == "eager: the decode step was not captured and decoded eagerly: InductorError: the cause"
    assert set(df[df.case == PLANS[1]].status) == {"ok"}
    assert "the decode step was not captured" in capsys.readouterr().out


def test_prompt_kernels_that_did_not_take_their_inputs_make_the_engine_not_as_planned():
    from types import SimpleNamespace

    def model(info):
        return SimpleNamespace(execution=SimpleNamespace(describe=lambda: {"option": "compile", **info}))

    assert bench.not_as_planned(model({"prefill_qk": {"layers": 4, "unfit_calls": 0}})) is None
    assert bench.not_as_planned(model({"prefill_qk": {"layers": 4, "unfit_calls": 2}})) == (
        "compile: prefill_qk's kernels did not take 2 call(s), which ran the plain ops")


@pytest.mark.parametrize("stuck", [False, True])
def test_exit_within_ends_a_stuck_teardown_with_its_stacks(stuck):
    # a planted teardown that sleeps past the grace: the process ends early, status 1, the hanging frame printed
    hook = "import atexit, time; atexit.register(time.sleep, 30); " if stuck else ""
    code = f"{hook}from harness.bench import exit_within; exit_within(0, grace_s=1.0)"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    if stuck:
        assert done.returncode == 1 and "Timeout" in done.stderr
    else:
        assert done.returncode == 0 and done.stderr == ""
