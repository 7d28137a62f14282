"""cpu_packed's screened argmax: greedy tokens bitwise those of the full logits, through an int8 copy of
the output matrix, on planted near-ties; and a bound made too tight is caught."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen3_vl
from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim.execution.cpu_packed import pack_linear
from qwen3_vl.optim.execution.screened_argmax import ScreenedArgmax

from .test_cpu_packed import BASE, batch_prompt

pytestmark = pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None, reason=str(cpu_gemv.unavailable_reason()))


def near_tie_head(rows: int, k: int, dtype: torch.dtype, spread: float, seed: int):
    """An avx2-packed output matrix whose rows are one row plus noise ``spread`` times its size: for small
    spreads the logits nearly tie, far closer than int8 rounding can tell apart."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, generator=gen)
    weight = base + spread * torch.randn(rows, k, generator=gen)
    head = Linear(k, rows, bias=False)
    head.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    pack_linear(head, "avx2", {}, keep_weight=False)
    return head


def full_argmax(head, hidden: torch.Tensor, banned: list[int]) -> torch.Tensor:
    logits = head(hidden).float()
    logits[:, banned] = -float("inf")
    return logits.argmax(-1)


@settings(max_examples=60, deadline=None)
@given(rows=st.sampled_from([8, 64, 1024]), k=st.sampled_from([16, 37, 256]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       spread=st.sampled_from([0.0, 1e-7, 1e-5, 1e-3, 1.0]), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       batch=st.integers(1, 3), banned=st.lists(st.integers(0, 7), max_size=3), seed=st.integers(0, 2**16))
def test_tokens_are_the_full_logits_argmax(rows, k, dtype, spread, scale, batch, banned, seed):
    head = near_tie_head(rows, k, dtype, spread, seed)
    hidden = scale * torch.randn(batch, k, generator=torch.Generator().manual_seed(seed + 1))
    screened = ScreenedArgmax(head)
    assert torch.equal(screened(hidden, banned), full_argmax(head, hidden, banned))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recomputed_rows_are_bitwise_the_full_logits(dtype):
    head = near_tie_head(1024, 256, dtype, 1.0, 0)
    hidden = torch.randn(1, 256)
    rows = torch.tensor([0, 5, 6, 17, 512, 1023])
    assert torch.equal(ScreenedArgmax(head)._exact(hidden, rows), head(hidden)[0, rows].float())


def test_a_bound_too_tight_is_caught():
    """The planted fault: no bound (only the int8 scores decide). On near-ties it picks other tokens than
    the full logits, so the property above can fail."""
    wrong = 0
    for seed in range(20):
        head = near_tie_head(1024, 256, torch.float32, 1e-3, seed)
        hidden = torch.randn(1, 256, generator=torch.Generator().manual_seed(seed))
        screened = ScreenedArgmax(head)
        assert torch.equal(screened(hidden), full_argmax(head, hidden, []))
        screened.bound.zero_()
        wrong += not torch.equal(screened(hidden), full_argmax(head, hidden, []))
    assert wrong >= 5


def test_non_finite_hidden_states_take_the_full_product():
    head = near_tie_head(64, 32, torch.float32, 1.0, 3)
    hidden = torch.randn(2, 32)
    hidden[1, 4] = float("nan")
    screened = ScreenedArgmax(head)
    assert torch.equal(screened(hidden), full_argmax(head, hidden, []))
    assert screened.full == 1


def test_greedy_generation_is_bitwise_with_and_without_it(tiny_checkpoint):
    on, off = (qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE},execution=cpu_packed[screened_argmax={s}]")
               for s in ("true", "false"))
    ids, inputs = batch_prompt(on.config)
    eos = [int(t) for t in off.generate(ids, **inputs, max_new_tokens=3, eos_token_id=[])[:, -2:].flatten()]
    for kwargs in ({"eos_token_id": []}, {"eos_token_id": eos, "min_new_tokens": 6}):  # banned ids before min
        assert torch.equal(on.generate(ids, **inputs, max_new_tokens=16, **kwargs),
                           off.generate(ids, **inputs, max_new_tokens=16, **kwargs))
    sampled = [m.generate(ids, **inputs, max_new_tokens=8, do_sample=True, seed=5, eos_token_id=[]) for m in (on, off)]
    assert torch.equal(*sampled)  # sampling reads the full logits
    info = on.execution.describe()["screened_argmax"]
    assert info.startswith("int8 copy of the output matrix") and " 0 greedy rows" not in info
    assert off.execution.describe()["screened_argmax"] == "off"


def test_observers_that_need_logits_still_get_them(tiny_checkpoint):
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE},execution=cpu_packed")
    ids, inputs = batch_prompt(model.config)
    seen, times = [], []

    def timer(logits):
        times.append(logits)

    timer.needs_logits = False
    model.step_observers.append(timer)
    tokens = model.generate(ids, **inputs, max_new_tokens=6, eos_token_id=[])
    assert [t is None for t in times] == [False] + [True] * 5  # the prefill's logits, then hidden-only steps
    model.step_observers.append(lambda logits: seen.append(logits[:, -1]))
    assert torch.equal(model.generate(ids, **inputs, max_new_tokens=6, eos_token_id=[]), tokens)
    assert torch.equal(torch.stack(seen, 1).argmax(-1), tokens[:, ids.shape[1]:])


@pytest.mark.parametrize("plan, reason", [
    ("execution=cpu_packed[kernel=mkldnn]", "not on our avx2 kernel"),
    ("quant=int8_weight,execution=cpu_packed", "not on our avx2 kernel"),
])
def test_off_with_the_reason_where_it_cannot_serve(tiny_checkpoint, plan, reason):
    from qwen3_vl.optim.execution.cpu_packed import available_kernels

    if "mkldnn" in plan and "mkldnn" not in available_kernels(torch.float32):
        pytest.skip("oneDNN's linear is not in this PyTorch build")
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE},{plan}")
    assert reason in model.execution.describe()["screened_argmax"]


def test_bf16_compute_is_refused_with_the_reason(tiny_checkpoint):
    # our kernel named: "auto" takes oneDNN for bf16 where the CPU has AVX-512 BF16, and then the reason is that one
    model = qwen3_vl.from_pretrained(tiny_checkpoint, dtype="bf16", plan=f"{BASE},execution=cpu_packed[kernel=avx2]")
    if model.execution.describe()["kernel"] != "avx2":
        pytest.skip("our AVX2 kernels do not build on this machine")
    assert "bfloat16 logits" in model.execution.describe()["screened_argmax"]
