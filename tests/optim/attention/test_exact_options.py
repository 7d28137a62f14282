"""The exact attention options (sdpa, tiled, flash_kv) against eager: fp32 relative error <= 1e-5
on generated shapes (GQA, head_dim 64/72/128, causal with q_len < kv_len, padding, ragged ViT
segments), the FlashAttention rule in fp16/bf16, and a planted fault the check must catch.

flash_kv's calls into the flash-attn package are checked against a stand-in with the package's
documented semantics (``fake_flash_attn``): this machine has neither the package nor an sm80 GPU."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim.attention.eager import grouped_softmax_attention
from qwen3_vl.optim.attention.flash_kv import FlashKVAttention
from qwen3_vl.optim.attention.sdpa import SdpaAttention
from qwen3_vl.optim.attention.tiled import TiledAttention, tiled_attention

from . import fake_flash_attn
from .cases import (
    DEVICE,
    EAGER,
    EXACT_FP32,
    TARGET,
    TextCase,
    low_precision_ok,
    text_cases,
    text_error,
    vision_cases,
    vision_error,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=text_cases())
def test_sdpa_text(case):
    assert text_error(SdpaAttention(TARGET), case) <= EXACT_FP32


@SETTINGS
@given(case=vision_cases())
def test_sdpa_vision(case):
    assert vision_error(SdpaAttention(TARGET), case) <= EXACT_FP32


@SETTINGS
@given(case=text_cases(), block_q=st.integers(1, 24), block_k=st.integers(1, 40))
def test_tiled_text(case, block_q, block_k):
    assert text_error(TiledAttention(block_q, block_k, block_k), case) <= EXACT_FP32


@SETTINGS
@given(case=vision_cases(), block_q=st.integers(1, 24), block_k=st.integers(1, 40))
def test_tiled_vision(case, block_q, block_k):
    assert vision_error(TiledAttention(block_q, block_k, block_k), case) <= EXACT_FP32


@SETTINGS
@given(case=text_cases())
def test_flash_kv_text(case):
    """Layouts, bottom-right causal alignment, GQA, decode through the kvcache API, padded calls to SDPA."""
    fake_flash_attn.calls.clear()
    assert text_error(FlashKVAttention(TARGET, fake_flash_attn), case) <= EXACT_FP32
    used = set(fake_flash_attn.calls)
    assert used == (set() if case.mask.key_valid is not None else
                    {"flash_attn_func", "flash_attn_with_kvcache"} if case.q.shape[2] == 1 else {"flash_attn_func"})


@SETTINGS
@given(case=vision_cases())
def test_flash_kv_vision(case):
    assert vision_error(FlashKVAttention(TARGET, fake_flash_attn), case) <= EXACT_FP32


@settings(max_examples=15, deadline=None)
@given(case=text_cases(head_dims=(64, 128), max_len=40), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_follows_the_flash_attention_rule(case, dtype):
    for attention in (SdpaAttention(TARGET), TiledAttention(8, 16, 16)):
        ours, eager = low_precision_ok(attention, case, dtype)
        assert ours <= 2 * eager + 1e-3, (attention.name, ours, eager)


def test_tiled_reads_kv_heads_unexpanded():
    """GQA-native: no op of the tiled kernel sees a tensor as large as K expanded to the query heads
    (eager's repeat_kv does, which shows the check can see it)."""
    from torch.profiler import profile

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, 1, 128, generator=gen)
    k, v = torch.randn(2, 1, 8, 300, 128, generator=gen)
    expanded = 16 * 300 * 128

    def largest_input(fn) -> int:
        with profile(record_shapes=True) as prof:
            fn()
        return max(math.prod(shape) for e in prof.events() for shape in e.input_shapes if shape)

    assert largest_input(lambda: tiled_attention(q, k, v, 128**-0.5, True, None, 1, 64)) < expanded
    assert largest_input(lambda: EAGER.text(q, k, v, _mask(None), 128**-0.5)) >= expanded
    ref = EAGER.text(q, k, v, _mask(None), 128**-0.5)
    out = tiled_attention(q, k, v, 128**-0.5, True, None, 1, 64)
    assert (out - ref).abs().max() / ref.abs().max() <= EXACT_FP32


def _mask(key_valid, causal=True):
    from qwen3_vl.model.text import AttentionMask

    return AttentionMask(key_valid, causal)


class WrongScale(TiledAttention):
    """A planted fault: the softmax scale applied twice."""

    def text(self, q, k, v, mask, scale):
        return super().text(q, k, v, mask, scale * scale**0.5)


class OffByOneCausal(TiledAttention):
    """A planted fault: causal alignment top-left instead of bottom-right when q_len < kv_len."""

    def text(self, q, k, v, mask, scale):
        lq, lk = q.shape[2], k.shape[2]
        if lq < lk and mask.causal:
            return super().text(q, k[:, :, :lq], v[:, :, :lq], _mask(None), scale)
        return super().text(q, k, v, mask, scale)


@pytest.mark.parametrize("faulty", [WrongScale(8, 8, 8), OffByOneCausal(8, 8, 8)])
def test_the_contract_catches_planted_faults(faulty):
    """The property above is worth something only if it fails on a broken kernel."""
    failures = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(case=text_cases(head_dims=(16,), max_len=24))
    def prop(case):
        if text_error(faulty, case) > EXACT_FP32:
            failures.append(case)
        assert True

    prop()
    assert failures, f"{type(faulty).__name__} went unnoticed"


def test_sdpa_records_the_backend_that_ran():
    attention = SdpaAttention(TARGET)
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 1, 4, 9, 64, generator=gen).to(DEVICE)
    attention.text(q, k, v, _mask(None), 0.125)
    attention.text(q[:, :, -1:], k, v, _mask(None), 0.125)
    ran = attention.describe()["ran"]
    assert set(ran) == {"prefill", "decode"}
    assert all(backend in attention.candidates for kind in ran.values() for backend in kind)


def test_sdpa_backend_restriction_is_honoured():
    attention = SdpaAttention(TARGET, backends="math")
    assert attention.candidates == ["math"]
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 1, 2, 5, 16, generator=gen).to(DEVICE)
    attention.text(q, k, v, _mask(None), 0.25)
    assert attention.describe()["ran"] == {"prefill": {"math": 1}}
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        SdpaAttention(TARGET, backends="fast")


class _Grouped:
    """``grouped_softmax_attention`` (the captured decode step's attention) with the mask as eager builds it."""

    name = "grouped"

    def text(self, q, k, v, mask, scale):
        return grouped_softmax_attention(q, k, v, mask.allowed(q.shape[2], k.shape[2], q.device), scale)


@SETTINGS
@given(case=text_cases())
def test_grouped_softmax_attention_text(case):
    assert text_error(_Grouped(), case) <= EXACT_FP32


class _HeadsSwapped(_Grouped):
    """A planted fault: query head h paired with KV head h % Hkv instead of h // groups."""

    def text(self, q, k, v, mask, scale):
        b, hq, lq, d = q.shape
        hkv = k.shape[1]
        swap = lambda t, a, c: t.reshape(b, a, c, lq, d).transpose(1, 2).reshape(b, hq, lq, d)
        return swap(super().text(swap(q, hq // hkv, hkv), k, v, mask, scale), hkv, hq // hkv)


def test_grouped_attention_check_catches_heads_paired_wrongly():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen).to(DEVICE) for h, n in ((4, 1), (2, 9), (2, 9)))
    case = TextCase(q, k, v, AttentionMask(None, True), 0.25)
    assert text_error(_Grouped(), case) <= EXACT_FP32
    assert text_error(_HeadsSwapped(), case) > 1e-2
