"""The CUDA-graph decode path's logic, checked on the CPU without capturing: the fixed-shape
static cache written at a device-side position, attention over the whole bucket with a validity
mask, fused projections, on-device token choice and the batched end-token check.

(Capture itself needs a GPU: ``scripts/gpu_check.py`` runs the same comparison with real graphs.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo

import qwen3_vl
from harness.workload import PromptSpec, RowSpec, build_prompt, generate
from qwen3_vl.model.text import TextAttention
from qwen3_vl.optim.execution import cuda_graph
from qwen3_vl.optim.execution.cuda_graph import CudaGraphExecution
from qwen3_vl.optim.execution.fusion import FusedTextAttention, FusedTextMLP
from qwen3_vl.optim.plan import Target, conflicts_of, make_plan

from ...model.prompts import image_prompt, left_pad, relative_error


def graph_model(source, plan="attention=eager", **kwargs):
    model = qwen3_vl.from_pretrained(source, plan=plan)
    model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, **kwargs)
    return model


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_same_tokens_as_reference_with_images_and_padding(tiny_checkpoint, ours_tiny, attention):
    config = ours_tiny.config
    a, pa, ga = image_prompt(config, [(1, 4, 8)], seed=21)
    b, pb, gb = image_prompt(config, [(1, 6, 4)], seed=22)
    ids, mask = left_pad(config, [a[0], b[0][:-2]])
    kw = dict(attention_mask=mask, pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.cat([ga, gb]),
              max_new_tokens=20, eos_token_id=[])
    model = graph_model(tiny_checkpoint, f"attention={attention}", bucket=16)
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    # a second call reuses the buffers (no new capture) and still agrees
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    assert model.execution.captures == 1


def test_fused_projections_keep_the_logits(tiny_checkpoint, ours_tiny):
    model = graph_model(tiny_checkpoint)
    layer = model.language_model.layers[0]
    assert isinstance(layer.self_attn, FusedTextAttention) and isinstance(layer.mlp, FusedTextMLP)
    assert not hasattr(layer.self_attn, "q_proj")
    ids, pixels, grid = image_prompt(ours_tiny.config, [(1, 6, 6)], seed=23)
    out = model(ids, pixel_values=pixels, image_grid_thw=grid)
    assert relative_error(out, ours_tiny(ids, pixel_values=pixels, image_grid_thw=grid)) <= 1e-5


def test_prefill_masks_only_padded_prompts_and_norms_fuse(tiny_checkpoint, ours_tiny, monkeypatch):
    """Fewer prefill launches: no validity mask (so SDPA's causal path, no host check) unless the prompt is
    padded, and every text RMSNorm as one fused call; tokens and logits as the reference's either way."""
    model = graph_model(tiny_checkpoint, "attention=sdpa")
    layers = ours_tiny.config.text.num_hidden_layers
    assert model.execution.describe()["fused_norms"] == 4 * layers + 1  # input, post, q, k per layer; final
    masks = []
    original = model.attention.text
    monkeypatch.setattr(model.attention, "text", lambda q, k, v, mask, scale: (
        masks.append(mask.key_valid is None), original(q, k, v, mask, scale))[1])
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = dict(max_new_tokens=6, eos_token_id=[])
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    assert masks[:layers] == [True] * layers  # the prefill: no mask
    kw["attention_mask"] = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    masks.clear()
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    assert masks[:layers] == [False] * layers  # padded: masked
    assert relative_error(model(ids), ours_tiny(ids)) <= 1e-5


@pytest.mark.parametrize("host_choice", [False, True])
def test_end_tokens_stop_like_the_reference(tiny_checkpoint, ours_tiny, host_choice):
    """Greedy tokens chosen inside the step (or by the host for every token: ``host_choice``), end tokens
    banned before ``min_new_tokens`` (the host chooses those steps), more than one end token."""
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    free = ours_tiny.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 3 + 4])
    model = graph_model(tiny_checkpoint, check_every=8, host_choice=host_choice)
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=eos, min_new_tokens=6), dict(eos_token_id=[eos, 1]),
               dict(eos_token_id=eos, max_new_tokens=1)):
        kw = {"max_new_tokens": 12, **kw}
        ours, ref = model.generate(ids, **kw), ours_tiny.generate(ids, **kw)
        assert torch.equal(ours, ref), kw


def test_sampling_matches_the_reference_with_a_seed(tiny_checkpoint, ours_tiny):
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, seed=3, eos_token_id=[])
    assert torch.equal(graph_model(tiny_checkpoint).generate(ids, **kw), ours_tiny.generate(ids, **kw))


def test_cache_buffers_are_reused_until_they_are_too_small(tiny_checkpoint):
    model = graph_model(tiny_checkpoint, bucket=32)
    first = model.new_cache(1, 20)
    assert model.new_cache(1, 30) is first and first.max_tokens == 32
    bigger = model.new_cache(1, 40)
    assert bigger is not first and bigger.max_tokens == 64


def test_plans_state_what_the_graph_path_needs():
    plan = make_plan({"execution": "cuda_graph", "kv_cache": "dynamic"})
    assert conflicts_of(plan) == [
        "execution=cuda_graph needs kv_cache=static (plan has kv_cache=dynamic)",
    ]
    assert conflicts_of(plan.with_(kv_cache="static")) == []


def test_unavailable_without_cuda_falls_back_with_reasons():
    model = qwen3_vl.from_pretrained("tiny", plan="execution=compile,kv_cache=static")
    assert model.plan["execution"].name == "eager"
    reasons = {(f.requested, f.used): f.reason for f in model.fallbacks}
    assert reasons[("compile", "cuda_graph")].startswith("needs device cuda")
    assert reasons[("cuda_graph", "eager")].startswith("needs device cuda")


def test_pascal_gets_cuda_graphs_without_compile():
    from qwen3_vl.optim.registry import get

    pascal = Target("cuda:0", "fp16", (6, 1), "GeForce GTX 1060")
    assert "compute capability >= 7.0, GPU has 6.1" in get("execution", "compile").unavailable(pascal)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_decode_steps_take_the_grouped_attention_over_per_layer_buffers(tiny_checkpoint, ours_tiny, attention,
                                                                         monkeypatch):
    """The decode step's attention is ``grouped_softmax_attention`` (KV heads not repeated), the prefill the
    plan's option; the cache holds one buffer per layer (a compiled write into a slice of a shared buffer
    rewrites all of it); the tokens are the reference's."""
    calls = []
    original = cuda_graph.grouped_softmax_attention
    monkeypatch.setattr(cuda_graph, "grouped_softmax_attention",
                        lambda q, *rest: (calls.append(q.shape[2]), original(q, *rest))[1])
    model = graph_model(tiny_checkpoint, f"attention={attention}", bucket=16)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(max_new_tokens=6, eos_token_id=[])
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    layers = ours_tiny.config.text.num_hidden_layers
    assert calls == [1] * (5 * layers)  # 5 decode steps after the prefill's token, every layer, one query each
    assert model.attention.name == attention  # the plan's option is back after the step
    cache = model.execution.cache
    assert len({t.data_ptr() for t in cache.keys + cache.values}) == 2 * layers


def test_compile_sends_every_one_row_text_product_to_the_gemv(tiny_checkpoint, ours_tiny, monkeypatch):
    """``compile``'s ``gemv`` swap: each decode step's fused q/k/v, o, gate/up, down products and the output
    matrix go through the Triton GEMV (here a recording stand-in, since the kernel needs Triton), the
    prefill's many-row products stay ``F.linear``; the tokens are the reference's."""
    from qwen3_vl.optim.execution import compile as compile_option

    rows = []

    def recording_gemv(x, weight):
        rows.append(x.numel() // weight.shape[1])
        return torch.nn.functional.linear(x, weight)

    monkeypatch.setattr(compile_option, "gemv", recording_gemv)
    model = graph_model(tiny_checkpoint, bucket=16)
    layers = ours_tiny.config.text.num_hidden_layers
    assert compile_option.use_gemv(model) == 4 * layers + 1
    assert type(model.lm_head) is compile_option.GemvLinear
    assert type(model.visual.blocks[0].mlp.linear_fc1) is not compile_option.GemvLinear  # text only
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(max_new_tokens=6, eos_token_id=[])
    assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    assert rows == [1] * (1 + 5 * (4 * layers + 1))  # prefill: the output matrix only; 5 decode steps


def test_compile_fold_puts_each_layers_norms_and_residuals_into_its_gemvs(tiny_checkpoint, ours_tiny, monkeypatch):
    """``compile[fold=true]``: every decode layer is ``GemvDecoderLayer``, whose one-row call is four GEMVs
    carrying the input norm, the o residual, the second norm, and the SiLU gate with the down residual (here
    the kernel's PyTorch ``reference`` stands in); the prefill is the plain layer's; tokens and the decode's
    logits are the reference's."""
    from qwen3_vl.kernels import triton_gemv
    from qwen3_vl.optim.execution import compile as compile_option

    folds = []

    def recording_gemv(x, weight, norm=None, eps=0.0, gated=False, residual=None):
        folds.append((norm is not None, gated, residual is not None))
        return triton_gemv.reference(x, weight, norm, eps, gated, residual)

    monkeypatch.setattr(compile_option, "gemv", recording_gemv)
    model = graph_model(tiny_checkpoint, bucket=16)
    layers = ours_tiny.config.text.num_hidden_layers
    assert compile_option.use_gemv(model, fold=True) == 4 * layers + 1
    assert all(type(layer) is compile_option.GemvDecoderLayer for layer in model.language_model.layers)
    prompt = build_prompt(ours_tiny.config, PromptSpec((RowSpec(3, (4, 4), 2),), seed=5))
    tokens, logits, _ = generate(model, prompt, 6)
    ref_tokens, ref_logits, _ = generate(ours_tiny, prompt, 6)
    assert torch.equal(tokens, ref_tokens)
    assert relative_error(logits, ref_logits) <= 1e-5
    layer_calls = [(True, False, False), (False, False, True), (True, False, False), (False, True, True)]
    lm_head = (False, False, False)
    assert folds == [lm_head] + 5 * (layer_calls * layers + [lm_head])  # prefill: the output matrix only


@pytest.mark.parametrize("prefill_qk", [False, True])
@pytest.mark.parametrize("fuse", [True, False])
def test_compile_attend_makes_each_decode_steps_attention_one_kernel_call(tiny_checkpoint, ours_tiny, monkeypatch,
                                                                         fuse, prefill_qk):
    """``compile``'s attend (on by default): every layer's attention, over fused projections or separate ones, is
    a ``KernelAttention``, whose one-query decode step is one ``decode_attention`` call against the layer's cache
    buffers and, with ``prefill_qk``, whose prefill takes its q/k norms and rotary from one ``qk_norm_rotary`` call
    (here the kernels' PyTorch references stand in); with padding, tokens and the decode's logits are the
    reference's."""
    from qwen3_vl.kernels import triton_decode_attention
    from qwen3_vl.optim.execution import compile as compile_option

    calls = []

    def recording(q, k, v, q_norm, k_norm, eps, cos, sin, keys, values, *rest):
        *rest, grouped = rest
        assert grouped is False  # the split form below attend_grouped_from's cached rows (the tiny cache: 256)
        calls.append((q.shape[1], keys.data_ptr()))
        return triton_decode_attention.reference(q, k, v, q_norm, k_norm, eps, cos, sin, keys, values, *rest)

    def recording_qk(q, k, *rest):
        qk_calls.append(q.shape[1])
        return triton_decode_attention.qk_reference(q, k, *rest)

    def recording_vision(q, k, cos, sin):
        vision_calls.append(q.shape[0])
        return triton_decode_attention.vision_reference(q, k, cos, sin)

    qk_calls, vision_calls = [], []
    monkeypatch.setattr(compile_option, "decode_attention", recording)
    monkeypatch.setattr(compile_option, "qk_norm_rotary", recording_qk)
    monkeypatch.setattr(compile_option, "vision_rotary", recording_vision)
    assert compile_option.OPTION.defaults["attend"] is True and compile_option.OPTION.defaults["prefill_qk"] is True
    model = graph_model(tiny_checkpoint, bucket=16, fuse=fuse)
    layers = ours_tiny.config.text.num_hidden_layers
    assert compile_option.use_decode_attention(model, prefill_qk) == layers
    kernel_class = compile_option.FusedKernelAttention if fuse else compile_option.KernelAttention
    assert all(type(layer.self_attn) is kernel_class for layer in model.language_model.layers)
    prompt = build_prompt(ours_tiny.config, PromptSpec((RowSpec(3, (4, 4), 2), RowSpec(4)), seed=5))
    assert prompt.attention_mask is not None  # the shorter row is padded
    tokens, logits, _ = generate(model, prompt, 6)
    ref_tokens, ref_logits, _ = generate(ours_tiny, prompt, 6)
    assert torch.equal(tokens, ref_tokens)
    assert relative_error(logits, ref_logits) <= 1e-5
    buffers = [t.data_ptr() for t in model.execution.cache.keys]
    assert calls == 5 * [(1, ptr) for ptr in buffers]  # 5 decode steps after the prefill's token, each layer's own
    # the (padded batch's eager) prefill, every layer, when asked for
    assert qk_calls == (layers * [prompt.input_ids.shape[1]] if prefill_qk else [])
    assert vision_calls == (ours_tiny.config.vision.depth * [4 * 4] if prefill_qk else [])  # one image of 4x4 patches
    expected_layers = layers + ours_tiny.config.vision.depth if prefill_qk else 0
    assert compile_option.prefill_qk_state(model.modules()) == {"layers": expected_layers, "unfit_calls": 0}


def test_prefill_qk_counts_the_calls_its_kernels_do_not_take(tiny_checkpoint, ours_tiny, monkeypatch):
    """Inputs a prompt kernel does not fit (here cos/sin in another dtype than q and k) run the plain ops, with the
    reference's result, and are counted in ``prefill_qk_state`` (``describe()``), not passed over in silence."""
    from qwen3_vl.optim.execution import compile as compile_option

    monkeypatch.setattr(compile_option, "qk_norm_rotary", None)  # never reached: the inputs do not fit
    model = qwen3_vl.from_pretrained(tiny_checkpoint)
    compile_option.use_decode_attention(model, prefill_qk=True)
    attn = model.language_model.layers[0].self_attn
    heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k = torch.randn(1, 5, heads * d), torch.randn(1, 5, kv_heads * d)
    cos, sin = torch.rand(1, 1, 5, d, dtype=torch.float64), torch.rand(1, 1, 5, d, dtype=torch.float64)
    got = attn.position(q, k, cos, sin)
    want = TextAttention.position(attn, q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert compile_option.prefill_qk_state(model.modules())["unfit_calls"] == 1


def test_compile_prefill_qk_needs_the_attention_kernels(tiny_checkpoint):
    from qwen3_vl.optim.execution.compile import CompiledExecution

    model = qwen3_vl.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"prefill_qk=true .* needs attend=true"):
        CompiledExecution(model, Target("cpu"), attend=False, prefill_qk=True)
    with pytest.raises(ValueError, match=r"attend_grouped_from counts cached rows: 0 or more"):
        CompiledExecution(model, Target("cpu"), attend_grouped_from=-1)
    with pytest.raises(ValueError, match=r"prefill_qk=true and prefill_compile=true .* choose one"):
        CompiledExecution(model, Target("cpu"), prefill_qk=True, prefill_compile=True)


def test_compile_fold_needs_the_gemv_and_fused_projections(tiny_checkpoint):
    from qwen3_vl.optim.execution.compile import CompiledExecution

    model = qwen3_vl.from_pretrained(tiny_checkpoint)
    for kwargs in (dict(gemv=False), dict(fuse=False)):
        with pytest.raises(ValueError, match=r"fold=true .* needs gemv=true and fuse=true"):
            CompiledExecution(model, Target("cpu"), fold=True, **kwargs)


def test_a_compiled_prefill_keeps_the_reference_tokens_and_compiles_each_layer_kind_once(tiny_checkpoint, ours_tiny):
    """``compile[prefill_compile=true]``'s prefill: the text layers and ViT blocks compiled by torch.compile
    (Inductor's CPU backend here) after one eager run of each shape. Image prompts of three shapes keep the
    reference's greedy tokens and logits within 1e-5; a second prompt of a shape reuses its entry; the layers share
    one compiled code, the second shape compiles sizes-generic code and the third compiles nothing; the instances
    keep no compiled code afterwards."""
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan="attention=sdpa")
    model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, bucket=16, prefill_compile=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    traced = []
    for seed, row in ((5, RowSpec(3, (4, 4), 2)), (6, RowSpec(3, (4, 4), 2)), (7, RowSpec(9, (6, 4), 5)),
                      (8, RowSpec(20, (4, 8), 7))):
        prompt = build_prompt(ours_tiny.config, PromptSpec((row,), seed=seed))
        tokens, logits, _ = generate(model, prompt, 4)
        ref_tokens, ref_logits, _ = generate(ours_tiny, prompt, 4)
        assert torch.equal(tokens, ref_tokens)
        assert relative_error(logits, ref_logits) <= 1e-5
        traced.append((counters["frames"]["ok"], max(counters["resumes"].values(), default=0)))
    prefill = model.execution.describe()["prefill"]
    assert prefill["compiled"] and prefill["counts"] == {"run": 4}
    # Each piece after a graph break (the eager attention) is a resume function: traced once per compile, not
    # once per layer (tiny: 4 text layers, 3 ViT blocks).
    assert traced[0][0] > 0 and traced[0][1] == 1
    assert traced[1] == traced[0]  # the same shape again
    assert traced[3] == traced[2] and traced[2][1] == 2  # the second shape compiled for any size, the third nothing
    assert not any("forward" in vars(m) for m in [*model.language_model.layers, *model.visual.blocks])


def test_a_compiled_prefill_traces_as_much_for_a_deeper_model(ours_tiny):
    """Regional compilation's point: what is traced does not grow with depth (a per-layer compile, e.g. one
    specialised on each layer's cache index, would trace every layer again)."""
    def traced(config):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = qwen3_vl.build(config, None, plan="attention=sdpa", seed=3)
        model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, bucket=16, prefill_compile=True)
        generate(model, build_prompt(config, PromptSpec((RowSpec(3, (4, 4), 2),), seed=5)), 2)
        return dict(torch._dynamo.utils.counters["frames"])

    config = ours_tiny.config
    deeper = config.replace(text=dataclasses.replace(config.text, num_hidden_layers=2 * config.text.num_hidden_layers),
                            vision=dataclasses.replace(config.vision, depth=2 * config.vision.depth))
    assert traced(config) == traced(deeper)


def test_a_compiled_prefill_that_cannot_compile_runs_eagerly_with_the_reason(tiny_checkpoint, ours_tiny,
                                                                             monkeypatch):
    """Planted: dynamo allowed one compile per frame, so the second prompt shape's sizes-generic compile is refused.
    That shape prefills eagerly with the reference's tokens, ``describe()`` keeps why, and the bench would store
    the run as not as planned (instead of dynamo running the layers eagerly unnoticed)."""
    from harness.bench import not_as_planned

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = qwen3_vl.from_pretrained(tiny_checkpoint, plan="attention=sdpa")
    model.execution = CudaGraphExecution(model, Target("cpu"), capture=False, bucket=16, prefill_compile=True)
    torch._dynamo.reset()
    for seed, row in ((5, RowSpec(3, (4, 4), 2)), (7, RowSpec(9, (6, 4), 5))):
        prompt = build_prompt(ours_tiny.config, PromptSpec((row,), seed=seed))
        tokens, logits, _ = generate(model, prompt, 3)
        ref_tokens, ref_logits, _ = generate(ours_tiny, prompt, 3)
        assert torch.equal(tokens, ref_tokens) and relative_error(logits, ref_logits) <= 1e-5
    errors = model.execution.describe()["prefill"]["capture_errors"]
    assert len(errors) == 1 and "recompile" in errors[0].lower()
    assert "a prefill was not captured and ran eagerly" in not_as_planned(model)


def test_a_failed_capture_decodes_eagerly_and_keeps_the_cause(tiny_checkpoint, ours_tiny, monkeypatch):
    """A decode step that cannot be captured (here: a compile worker's error, whose first line says nothing)
    falls back to the eager loop with the reference's tokens; the warning and ``describe()`` keep the cause from
    the message's end."""
    detail = "\n".join(["An exception occurred in a subprocess:", "", "Name=kernel_0", "Traceback ...",
                        *[f'  File "x.py", line {i}' for i in range(400)], "CompilationError: at 12:4: bad load"])

    def failing_step(*args, **kwargs):
        raise RuntimeError(detail)

    monkeypatch.setattr(cuda_graph, "CapturedStep", failing_step)
    model = graph_model(tiny_checkpoint, bucket=16)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(max_new_tokens=6, eos_token_id=[])
    with pytest.warns(RuntimeWarning, match="(?s)capturing the decode step failed.*CompilationError: at 12:4"):
        assert torch.equal(model.generate(ids, **kw), ours_tiny.generate(ids, **kw))
    error = model.execution.describe()["capture_error"]
    assert error.startswith("RuntimeError: An exception occurred in a subprocess:")
    assert error.endswith("CompilationError: at 12:4: bad load") and len(error) <= 2000
