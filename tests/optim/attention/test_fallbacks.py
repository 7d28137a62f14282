"""Every unavailable situation gives the declared fallback and a recorded reason: no CUDA, a GPU
below the needed compute capability (fake targets), a missing flash-attn package, an SDPA-less
torch, and a Pascal profile's kernel set under emulation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import qwen3_vl
from qwen3_vl.optim import registry
from qwen3_vl.optim.attention.sdpa import SdpaAttention, candidate_backends
from qwen3_vl.optim.plan import Fallback, Plan, Target, resolve

PASCAL = Target(device="cuda", dtype="fp16", compute_capability=(6, 1), device_name="fake GTX 1060")
VOLTA_BF16 = Target(device="cuda", dtype="bf16", compute_capability=(7, 0), device_name="fake V100")
HOPPER = Target(device="cuda", dtype="bf16", compute_capability=(9, 0), device_name="fake H100")
HOPPER_FP32 = Target(device="cuda", dtype="fp32", compute_capability=(9, 0), device_name="fake H100")


@pytest.fixture
def flash_attn_installed(monkeypatch):
    """Pretend the flash-attn package is importable (without importing it)."""
    real = importlib.util.find_spec
    fake = lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", fake)


def flash_kv_resolution(target):
    used, fallbacks = resolve(Plan.parse("attention=flash_kv"), target)
    return used["attention"].name, fallbacks


def test_no_cuda_flash_kv_falls_back_to_sdpa_with_reason():
    model = qwen3_vl.from_pretrained("tiny", plan="attention=flash_kv")
    assert model.plan["attention"].name == "sdpa"
    assert model.fallbacks == [Fallback("attention", "flash_kv", "sdpa", "needs device cuda, target is cpu")]
    assert "attention: flash_kv -> sdpa (needs device cuda, target is cpu)" in model.plan_report()


def test_no_cuda_device_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        qwen3_vl.from_pretrained("tiny", device="cuda")


def test_gpu_below_sm80_falls_back(flash_attn_installed):
    pascal_bf16 = Target("cuda", "bf16", (6, 1), "fake GTX 1060")
    assert flash_kv_resolution(pascal_bf16) == (
        "sdpa", [Fallback("attention", "flash_kv", "sdpa", "needs compute capability >= 8.0, GPU has 6.1")])


def test_missing_flash_attn_package_falls_back(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert flash_kv_resolution(HOPPER) == (
        "sdpa", [Fallback("attention", "flash_kv", "sdpa", "package 'flash_attn' is not installed")])


def test_flash_attn_needs_bf16_compute(flash_attn_installed):
    name, [fallback] = flash_kv_resolution(HOPPER_FP32)
    assert name == "sdpa" and fallback.reason == "supports dtypes bf16, not fp32"
    name, [fallback] = flash_kv_resolution(Target("cuda", "fp16", (9, 0)))  # fp16 storage computes in fp32
    assert name == "sdpa" and "not fp16" in fallback.reason
    assert flash_kv_resolution(HOPPER) == ("flash_kv", [])  # everything there: it runs


def test_flash_kv_off_when_emulating_a_profile_without_flash(flash_attn_installed):
    emulated = Target("cuda", "bf16", (9, 0), "fake H100", emulated_profile="cuda-sm70")
    name, [fallback] = flash_kv_resolution(emulated)
    assert name == "sdpa" and fallback.reason == "emulating cuda-sm70, which has no flash kernels"


def test_auto_plan_on_an_h100_without_flash_attn_records_the_skip():
    from qwen3_vl.hardware.profiles import auto_plan, get_profile

    plan, skipped = auto_plan(get_profile("cuda-sm80plus"), HOPPER)
    assert plan["attention"].name == "sdpa"
    assert any(fb.requested == "flash_kv" and "flash_attn" in fb.reason for fb in skipped)


def test_pascal_sdpa_backends_are_efficient_and_math_only():
    names, notes = candidate_backends(PASCAL)
    assert names == ["efficient", "math"]
    assert "flash: needs sm80+, GPU is sm_61" in notes


def test_mem_efficient_below_sm80_refuses_bf16():
    names, notes = candidate_backends(VOLTA_BF16)
    assert names == ["math"]
    assert any("fp16/fp32 only" in n for n in notes)


def test_sm80_fp32_has_no_flash_kernel_but_keeps_efficient():
    names, notes = candidate_backends(HOPPER_FP32)
    assert names == ["efficient", "math"]
    assert any("flash: takes fp16/bf16 only" in n for n in notes)
    assert candidate_backends(HOPPER)[0] == ["flash", "efficient", "cudnn", "math"]


def test_gqa_is_expanded_for_the_mem_efficient_kernel():
    """``enable_gqa`` drops the mem-efficient kernel, so for it KV heads are expanded; the math kernel
    gets native GQA first."""
    attention = SdpaAttention(PASCAL)
    assert list(attention._attempts(grouped=True)) == [("efficient", False), ("math", True), ("math", False)]
    assert list(attention._attempts(grouped=False)) == [("efficient", False), ("math", False)]


def test_sdpa_without_the_torch_api_falls_back_to_eager(monkeypatch):
    monkeypatch.delattr(F, "scaled_dot_product_attention")
    used, fallbacks = resolve(Plan.parse("attention=sdpa"), Target())
    assert used["attention"].name == "eager"
    assert fallbacks == [Fallback("attention", "sdpa", "eager", "torch has no SDPA")]


def test_every_attention_and_rope_option_declares_a_fallback_chain_to_the_reference():
    for axis in ("attention", "rope"):
        reference = registry.reference_option(axis).name
        for opt in registry.options(axis):
            seen, name = [], opt.name
            while name != reference:
                assert name not in seen, f"{axis}: fallback cycle through {name}"
                seen.append(name)
                name = registry.get(axis, name).fallback
                assert name is not None, f"{axis}={seen[-1]} has no fallback"
