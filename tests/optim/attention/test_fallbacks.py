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
from qwen3_vl.optim.attention import flash_kv
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


def test_no_cuda_flash_kv_records_its_engine_fallback():
    model = qwen3_vl.from_pretrained("tiny", plan="attention=flash_kv")
    assert model.plan["attention"].name == "flash_kv"
    assert model.fallbacks == [
        Fallback("attention", "flash_kv[engine=flash_attn]", "flash_kv[engine=torch]",
                 "flash-attn needs a CUDA GPU, target is cpu")
    ]
    assert "flash-attn needs a CUDA GPU" in model.plan_report()
    assert model.attention.describe()["engine"] == "torch"


def test_no_cuda_device_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        qwen3_vl.from_pretrained("tiny", device="cuda")


def test_below_sm80_flash_kv_uses_torch_engine_with_reason():
    attention = flash_kv.FlashKVAttention(PASCAL, 64)
    assert attention.engine == "torch"
    assert attention.reason == "flash-attn needs compute capability >= 8.0, GPU has 6.1"


def test_missing_flash_attn_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert flash_kv.flash_attn_unavailable(HOPPER) == "package 'flash_attn' is not installed"


def test_flash_attn_needs_half_precision(flash_attn_installed):
    assert "fp16/bf16" in flash_kv.flash_attn_unavailable(HOPPER_FP32)
    assert flash_kv.flash_attn_unavailable(HOPPER) is None  # everything there: the package engine is used


def test_flash_attn_off_when_emulating_a_profile_without_flash(flash_attn_installed):
    emulated = Target("cuda", "fp16", (6, 1), "fake H100 emulating sm61-laptop", emulated_profile="sm61-laptop")
    assert "emulating sm61-laptop" in flash_kv.flash_attn_unavailable(
        Target("cuda", "bf16", (9, 0), "", emulated_profile="sm61-laptop"))
    assert flash_kv.flash_attn_unavailable(emulated).startswith("flash-attn needs compute capability")


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
