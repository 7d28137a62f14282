"""execution=cpu_packed: exact on the CPU (greedy tokens identical to the reference, logits within
the fp32 bound), for every kernel that runs here, with images, padding and quantized or H2O plans."""

from __future__ import annotations

import pytest
import torch

import qwen3_vl
from qwen3_vl.hardware.huge_pages import unavailable_reason as huge_pages_reason
from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim.execution import cpu_packed
from qwen3_vl.optim.execution.cpu_packed import LeanDecoderLayer, PackedLinear, available_kernels
from qwen3_vl.optim.plan import Plan, Target, conflicts_of, resolve
from qwen3_vl.optim.quant import int8_weight

from ...model.prompts import image_prompt, left_pad, relative_error

BASE = "attention=sdpa,kv_cache=static"
FP32_KERNELS = available_kernels(torch.float32)


def batch_prompt(config):
    a, pa, ga = image_prompt(config, [(1, 4, 8)], seed=31)
    b, pb, gb = image_prompt(config, [(1, 6, 4)], seed=32)
    ids, mask = left_pad(config, [a[0], b[0][:-2]])
    return ids, dict(attention_mask=mask, pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.cat([ga, gb]))


def generate(model, ids, inputs, n=24):
    return model.generate(ids, **inputs, max_new_tokens=n, eos_token_id=[])


@pytest.fixture(scope="module")
def prompt(ours_tiny):
    return batch_prompt(ours_tiny.config)


@pytest.mark.parametrize("kernel", FP32_KERNELS)
def test_fp32_kernels_give_the_reference_tokens_and_logits(tiny_checkpoint, ours_tiny, prompt, kernel):
    ids, inputs = prompt
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE},execution=cpu_packed[kernel={kernel}]")
    assert torch.equal(generate(model, ids, inputs), generate(ours_tiny, ids, inputs))
    assert torch.equal(generate(model, ids, inputs), generate(ours_tiny, ids, inputs))  # a second call too
    assert relative_error(model(ids, **inputs), ours_tiny(ids, **inputs)) <= 1e-5
    info = model.execution.describe()
    layers = ours_tiny.config.text.num_hidden_layers
    assert info["kernel"] == kernel and info["fused_layers"] == info["lean_layers"] == layers
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    # q/k/v, o, gate/up and down per layer plus the output matrix; the vision tower untouched
    assert len(packed) == (0 if kernel == "none" else 4 * layers + 1) == info["packed_layers"]
    assert not any(isinstance(m, PackedLinear) for m in model.visual.modules())
    assert all(isinstance(layer, LeanDecoderLayer) for layer in model.language_model.layers)


@pytest.mark.skipif(huge_pages_reason() is not None, reason=str(huge_pages_reason()))
@pytest.mark.parametrize("plan", ["", ",quant=int8_weight"])
def test_weights_in_huge_pages_give_bitwise_the_same_results(tiny_checkpoint, prompt, plan):
    ids, inputs = prompt
    on, off = (qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE}{plan},execution=cpu_packed[huge_pages={h}]")
               for h in ("true", "false"))
    assert torch.equal(generate(on, ids, inputs), generate(off, ids, inputs))
    assert torch.equal(on(ids, **inputs), off(ids, **inputs))
    assert "MiB in 2 MiB pages" in on.execution.describe()["huge_pages"]
    assert off.execution.describe()["huge_pages"] == "off"
    assert on.lm_head.weight.data_ptr() % (2 << 20) == 0


@pytest.mark.parametrize("kernel", [k for k in available_kernels(torch.float16) if k != "none"])
def test_fp16_storage_is_exact_against_the_fp16_reference(tiny_checkpoint, prompt, kernel):
    ids, inputs = prompt
    ref = qwen3_vl.from_pretrained(tiny_checkpoint, dtype="fp16")
    plan = f"{BASE},execution=cpu_packed[kernel={kernel}]"
    model = qwen3_vl.from_pretrained(tiny_checkpoint, dtype="fp16", plan=plan)
    assert model.execution.describe()["kernel"] == kernel
    stored = getattr(model.lm_head, "packed", None) if kernel == "avx2" else model.lm_head.weight
    assert stored.dtype == torch.float16  # still 2 bytes a weight in memory
    assert torch.equal(generate(model, ids, inputs), generate(ref, ids, inputs))
    assert relative_error(model(ids, **inputs), ref(ids, **inputs)) <= 1e-5


def test_bf16_within_the_bf16_rule(tiny_checkpoint, ours_tiny, prompt):
    """The harness's rule for exact plans in bf16: error against fp32 at most twice the reference's own,
    with whichever kernel this CPU packs bf16 for (oneDNN's needs AVX-512 or AVX-NE-CONVERT)."""
    ids, inputs = prompt
    ref = qwen3_vl.from_pretrained(tiny_checkpoint, dtype="bf16")
    model = qwen3_vl.from_pretrained(tiny_checkpoint, dtype="bf16", plan=f"{BASE},execution=cpu_packed")
    assert model.execution.describe()["kernel"] == available_kernels(torch.bfloat16)[0]
    fp32 = ours_tiny(ids, **inputs)
    assert relative_error(model(ids, **inputs), fp32) <= 2 * relative_error(ref(ids, **inputs), fp32)


@pytest.mark.parametrize("kernel", [k for k in FP32_KERNELS if k != "none"])
def test_a_wrong_packed_weight_is_caught(tiny_checkpoint, ours_tiny, kernel):
    """Planted fault: the packed output matrix scaled by 1.001; a one-row decode step reads the
    packed copy, so its logits leave the exact bound."""
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE},execution=cpu_packed[kernel={kernel}]")

    def one_step(m):
        token, position = torch.tensor([[5]]), torch.zeros(3, 1, 1, dtype=torch.long)
        return m.step(m.language_model.embed_tokens(token), position, None, m.new_cache(1, 4))

    assert relative_error(one_step(model), one_step(ours_tiny)) <= 1e-5
    if kernel == "mkl":
        model.lm_head.packed.mul_(1.001)
    elif kernel == "mkldnn":
        model.lm_head.packed.copy_((model.lm_head.packed.to_dense() * 1.001).to_mkldnn())
    else:  # avx2 reads fp32 weights where they are
        model.lm_head.weight.mul_(1.001)
    assert relative_error(one_step(model), one_step(ours_tiny)) > 1e-5


@pytest.mark.parametrize("other", ["quant=int8_weight", "kv_cache=h2o"])
def test_options_it_leaves_alone_keep_their_results(tiny_checkpoint, prompt, other):
    """Quantized layers keep their kernels (nothing to pack; int8's q/k/v and gate/up are fused); H2O
    watches the queries, so its layers run the reference code. Either way: the same tokens as the
    plan without cpu_packed."""
    ids, inputs = prompt
    plan = f"attention=sdpa,{other}"
    ref = qwen3_vl.from_pretrained(tiny_checkpoint, plan=plan)
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{plan},execution=cpu_packed")
    assert torch.equal(generate(model, ids, inputs, 12), generate(ref, ids, inputs, 12))


@pytest.mark.parametrize("kernel", ["dequant", "avx2", "fbgemm"])
def test_int8_projections_fuse_where_their_rows_concatenate(tiny_checkpoint, prompt, kernel):
    """int8 codes and per-row scales concatenate exactly, so q/k/v and gate/up become one module each
    (logits within float reassociation of the unfused plan); fbgemm's prepacked weights cannot, and stay."""
    if kernel not in int8_weight.available_kernels("cpu"):
        pytest.skip(f"int8 kernel {kernel} does not run here")
    ids, inputs = prompt
    plan = f"attention=sdpa,quant=int8_weight[kernel={kernel}]"
    ref = qwen3_vl.from_pretrained(tiny_checkpoint, plan=plan)
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{plan},execution=cpu_packed")
    fused = model.execution.describe()["fused_layers"]
    assert fused == (0 if kernel == "fbgemm" else ref.config.text.num_hidden_layers)
    assert relative_error(model(ids, **inputs), ref(ids, **inputs)) <= 1e-5
    assert torch.equal(generate(model, ids, inputs, 12), generate(ref, ids, inputs, 12))


def test_threads_apply_during_decode_and_are_restored(tiny_checkpoint, prompt, monkeypatch):
    ids, inputs = prompt
    before = torch.get_num_threads()
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{BASE},execution=cpu_packed[threads=1]")
    seen = []
    original = model.step
    monkeypatch.setattr(model, "step", lambda *a, **k: (seen.append(torch.get_num_threads()), original(*a, **k))[1])
    generate(model, ids, inputs, 4)
    assert seen[1:] == [1, 1, 1]  # decode steps (the first call is the prefill)
    assert torch.get_num_threads() == before


def test_unavailable_on_cuda_falls_back_with_the_reason():
    used, fallbacks = resolve(Plan.parse(f"{BASE},execution=cpu_packed"), Target("cuda", compute_capability=(8, 0)))
    assert used["execution"].name == "eager"
    assert fallbacks and fallbacks[0].axis == "execution" and "cpu" in fallbacks[0].reason


def test_bad_parameters_and_combinations_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="fp16_chunks"):
        qwen3_vl.from_pretrained(tiny_checkpoint, plan="execution=cpu_packed[kernel=fp16_chunks]")
    with pytest.raises(ValueError, match="unknown"):
        qwen3_vl.from_pretrained(tiny_checkpoint, plan="execution=cpu_packed[kernel=avx9]")
    # packing replaces the weights a memory option would stream
    assert "memory=resident" in conflicts_of(Plan.parse("memory=offload_disk,execution=cpu_packed"))[0]


def test_bf16_without_onednn_bf16_takes_our_kernel_or_nothing(tiny_checkpoint, monkeypatch):
    """An AVX2 CPU (the i5-10210U) has no oneDNN bf16 path: auto takes our AVX2 kernel where it
    builds, else leaves bf16 weights unpacked, and asking for mkldnn names what runs instead."""
    monkeypatch.setattr(cpu_packed, "_mkldnn_packs", lambda storage: storage != torch.bfloat16)
    ours = ["avx2"] if cpu_gemv.unavailable_reason() is None else []
    assert available_kernels(torch.bfloat16) == [*ours, "none"]
    model = qwen3_vl.from_pretrained(tiny_checkpoint, dtype="bf16", plan=f"{BASE},execution=cpu_packed")
    assert model.execution.describe()["kernel"] == [*ours, "none"][0]
    with pytest.raises(ValueError, match=r"available: (avx2, )?none"):
        qwen3_vl.from_pretrained(tiny_checkpoint, dtype="bf16", plan=f"{BASE},execution=cpu_packed[kernel=mkldnn]")


@pytest.mark.parametrize("kernel", ["auto", "none"])
def test_fastv_scores_through_the_lean_layers(tiny_checkpoint, ours_tiny, kernel):
    """FastV scores layer K-1's attention from a hook on its module; the lean layer runs that layer's
    reference code while hooked, and the score reads the fused q/k/v projection (found by validate:
    'layer 1's attention did not run through its module', then a missing q_proj)."""
    ids, pixels, grid = image_prompt(ours_tiny.config, [(1, 8, 12), (1, 8, 12)], seed=3)
    inputs = {"pixel_values": pixels, "image_grid_thw": grid}
    plan = "attention=sdpa,vision=prune_fastv[ratio=0.25]"
    ref = qwen3_vl.from_pretrained(tiny_checkpoint, plan=plan)
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"{plan},execution=cpu_packed[kernel={kernel}]")
    assert torch.equal(generate(model, ids, inputs, 8), generate(ref, ids, inputs, 8))
    assert model.vision.kept == ref.vision.kept and model.vision.kept[0] < int((ids == ref.config.image_token_id).sum())


@pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None, reason=str(cpu_gemv.unavailable_reason()))
@pytest.mark.parametrize("attention, ours", [("sdpa", True), ("eager", True), ("block_sparse", False)])
def test_decode_rows_take_our_attention_and_activation_only_under_exact_attention(tiny_checkpoint, prompt,
                                                                                  monkeypatch, attention, ours):
    """Decode steps of the lean layer call ``causal_attention`` instead of the attention option only
    when that option is exact (an approximate one is what the plan asked to measure), and
    ``silu_mul`` for the fused MLP; prefill keeps the option's own path."""
    calls = {"causal_attention": 0, "silu_mul": 0}
    for name in calls:
        real = getattr(cpu_gemv, name)
        monkeypatch.setattr(cpu_gemv, name, lambda *a, _real=real, _name=name: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a))
    ids, inputs = prompt
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan=f"attention={attention},kv_cache=static,"
                                                          "execution=cpu_packed")
    steps, layers = 6, model.config.text.num_hidden_layers
    generate(model, ids, inputs, steps + 1)
    assert calls["causal_attention"] == (steps * layers if ours else 0)
    assert calls["silu_mul"] == steps * layers


@pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None, reason=str(cpu_gemv.unavailable_reason()))
@pytest.mark.parametrize("rows", [1, 100, cpu_packed.GEMV_PREFILL_ROWS + 3])
def test_fp32_rows_on_both_sides_of_the_gemv_prefill_limit_are_the_linear(rows, monkeypatch):
    linear = Linear(96, 40)
    torch.nn.init.normal_(linear.weight)
    x = torch.randn(rows, 96)
    expected = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    cpu_packed.pack_linear(linear, "avx2", {}, keep_weight=False)
    out = linear(x)
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert calls == ([] if rows > cpu_packed.GEMV_PREFILL_ROWS else [rows])
