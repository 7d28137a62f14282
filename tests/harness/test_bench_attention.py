"""``harness.bench_attention``: one option failing, even with an empty message, leaves the others measured."""

from __future__ import annotations

import torch

from harness import bench_attention
from qwen3_vl.config import preset
from qwen3_vl.optim import registry
from qwen3_vl.optim.plan import Choice, Target


class Broken:
    """An attention whose every call fails with a message-less error (as some CUDA errors come)."""

    def text(self, *args, **kwargs):
        raise RuntimeError()


def test_a_failing_option_is_a_row_with_its_error_and_the_others_run(monkeypatch):
    monkeypatch.setattr(bench_attention, "memory_in_fresh_process", lambda case, option: {})
    config = preset("tiny")
    case = bench_attention.make_case("decode64", config, torch.float32, "cpu")
    built = {"eager": (Choice("eager"), registry.get("attention", "eager").build(None, Target("cpu")), []),
             "sdpa": (Choice("sdpa"), Broken(), [])}
    rows = {row["option"]: row for row in bench_attention.bench_case(case, built, 2, 1, "cpu", 1e-5)}
    assert rows["sdpa"]["error"] == "RuntimeError"
    assert rows["eager"]["rel_err"] == 0 and rows["eager"]["samples"] and rows["eager"]["exact_ok"]
