"""The self-test: every catalogued fault still plants, planting never touches the working tree, caught
faults are caught by the check that should catch them, a harmless change is reported as slipping
through, and the score is stored with the results. (The whole catalogue runs in ``nox -s selftest``.)"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from harness import results, selftest
from harness.__main__ import main as cli
from harness.fault_catalogue import FAULTS, Fault
from qwen3_vl.optim import Plan

REPO = Path(__file__).resolve().parents[2]


def _tree_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO / "qwen3_vl").rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_every_catalogued_fault_still_plants_and_names_real_plans(fault):
    assert selftest.check_plantable(fault) == "", selftest.check_plantable(fault)
    assert fault.old != fault.new and fault.why
    for plan in fault.plans:
        Plan.parse(plan)  # an unknown option or parameter raises


def test_catalogue_covers_the_shared_model_and_the_options():
    names = {f.name for f in FAULTS}
    assert len(names) == len(FAULTS)
    for wanted in ("rope_section_order", "gelu_variant_merger", "deepstack_wrong_decoder_layer", "dropped_k_norm",
                   "decode_position_off_by_one", "softmax_scale_without_sqrt", "int8_weight_per_tensor_scale",
                   "syntax_error_after_line_continuation"):
        assert wanted in names
    axes = {p.split("=")[0] for f in FAULTS for p in f.plans}
    assert {"attention", "rope", "kv_cache", "quant", "vision"} <= axes


def test_planting_changes_only_the_copy(tmp_path):
    before = _tree_digest()
    copy = selftest.copy_project(tmp_path / "copy")
    fault = FAULTS[0]
    selftest.plant(fault, copy)
    assert fault.new in (copy / fault.path).read_text()
    assert fault.new not in (REPO / fault.path).read_text()
    assert _tree_digest() == before


def test_an_entry_that_no_longer_matches_is_an_error_not_a_skip(tmp_path, capsys):
    stale = Fault("stale", "qwen3_vl/model/text.py", "this text is not in the file", "x", "stale entry")
    assert "not found" in selftest.check_plantable(stale)
    with pytest.raises(selftest.SelftestError, match="stale"):
        selftest.run([stale])
    assert cli(["selftest", "--only", "no_such_fault", "--no-store"]) == 2
    assert "unknown fault 'no_such_fault'" in capsys.readouterr().err


HARMLESS = Fault("harmless_comment", "qwen3_vl/model/text.py", "DeepStack feature ``k`` is added after layer ``k``.",
                 "DeepStack feature ``k`` is added after layer ``k`` (reworded).", "a docstring edit: not a bug")


@pytest.mark.slow
def test_faults_are_caught_by_the_right_check_and_a_harmless_edit_slips_through(tmp_path):
    picked = {f.name: f for f in FAULTS}
    faults = [picked["syntax_error_after_line_continuation"], picked["gelu_variant_merger"],
              picked["sdpa_prefill_not_causal"], HARMLESS]
    before = _tree_digest()
    report = selftest.run(faults, jobs=2)
    assert _tree_digest() == before
    how = {o.fault: o for o in report.outcomes}
    assert how["syntax_error_after_line_continuation"].how.startswith("imports qwen3_vl.model.positions: SyntaxError")
    assert re.search(r"qwen3_vl/model/positions\.py:\d+", how["syntax_error_after_line_continuation"].how)
    assert how["gelu_variant_merger"].how.startswith("golden golden_")
    assert how["sdpa_prefill_not_causal"].how.startswith("contract attention=sdpa")
    assert [o.fault for o in report.slipped] == ["harmless_comment"]
    assert report.score == pytest.approx(3 / 4)
    fp = {"id": "0123456789abcdef", "git": {"sha": "abc", "dirty": False}}
    rows = selftest.rows(report, "tiny", fp, "st-1")
    path = results.write_run(rows, tmp_path, fp, "st-1")
    frame = results.load(path)
    score = frame[(frame["case"] == "score") & (frame["metric"] == "caught_share")].iloc[0]
    assert score["value"] == pytest.approx(0.75) and score["status"] == "failed"
    assert "harmless_comment" in score["error"]
    slipped = frame[frame["case"] == "harmless_comment"].iloc[0]
    assert slipped["status"] == "failed" and slipped["value"] == 0


def test_weight_scaling_invariant_passes_per_channel_quant_and_catches_per_tensor(monkeypatch, tiny_weights):
    """The check added because per-tensor int8 scales slipped through every other check on tiny."""
    import torch

    import qwen3_vl
    import qwen3_vl.optim.quant.int8_weight as int8
    from harness import suite
    from harness.workload import benchmark_spec, build_prompt
    from suites import weight_scaling

    config, weights = tiny_weights
    prompt = build_prompt(config, benchmark_spec())
    reference = qwen3_vl.build(config, {k: v.clone() for k, v in weights.items()})

    def residual(plan: str):
        model = qwen3_vl.build(config, {k: v.clone() for k, v in weights.items()}, plan=plan)
        return dict(weight_scaling.track_channel_scale_equivariance(suite.Bench(model, reference, prompt, 2)))

    assert residual("attention=sdpa") == {}  # nothing replaced: nothing to check
    for plan in ("quant=int8_weight", "quant=int4_weight[kernel=dequant]"):
        m = residual(plan)["channel_scale_equivariance"]
        assert m.status == "ok" and m.value < 1e-5, (plan, m)

    def per_tensor(w):
        scale = (w.abs().amax() / 127).clamp(min=1e-12).expand(w.shape[0]).contiguous()
        return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale

    monkeypatch.setattr(int8, "quantize_int8", per_tensor)
    m = residual("quant=int8_weight")["channel_scale_equivariance"]
    assert m.status == "failed" and m.value > 0.01 and "not per output channel" in m.error


def test_kv_scaling_invariant_passes_every_cache_and_catches_per_tensor_kv_scales(monkeypatch, tiny_weights):
    """The check added because per-tensor KV-cache scales slipped through every other check on tiny."""
    import torch

    import qwen3_vl
    import qwen3_vl.optim.kv_cache.kivi as kivi
    from harness import matrix, suite
    from harness.workload import benchmark_spec, build_prompt
    from suites import kv_scaling

    config, weights = tiny_weights
    prompt = build_prompt(config, benchmark_spec())
    reference = qwen3_vl.build(config, {k: v.clone() for k, v in weights.items()})

    def check(plan: str):
        model = qwen3_vl.build(config, {k: v.clone() for k, v in weights.items()}, plan=plan)
        return dict(kv_scaling.track_kv_scale_equivariance(suite.Bench(model, reference, prompt, 2)))

    for choice in matrix.choices("kv_cache"):
        for m in check(f"kv_cache={choice}").values():
            assert m.status == "ok", (choice, m)

    def per_tensor(x, bits, dim, valid=None):
        levels = 2**bits - 1
        lo, hi = x.amin().expand_as(x.amin(dim, keepdim=True)), x.amax().expand_as(x.amax(dim, keepdim=True))
        scale = ((hi - lo) / levels).clamp(min=1e-6).half()
        codes = torch.round((x - lo.half().float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
        return codes, scale, lo.half()

    monkeypatch.setattr(kivi, "quantize", per_tensor)
    m = check("kv_cache=quant_int8[residual=0]")["kv_scale_equivariance"]
    assert m.status == "failed" and "per key channel" in m.error
