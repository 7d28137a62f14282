"""Exactness of the GPU execution options on a real GPU (what the CPU tests cannot capture).

For the tiny preset on CUDA: greedy tokens of every plan must equal the reference plan's for 64
tokens in fp32; in bf16 the error of each plan's step logits against the fp32 reference must stay
within twice the reference plan's own bf16 error (the harness's bf16 rule), over the steps where
the greedy tokens still agree. Prints one line per plan and exits 1 on any failure.

The graph plans replay their prefill from a graph captured per prompt shape, so in fp32 each runs three
prompts in turn: the image prompt (captured), another of the same shape (other text, other pixels: replayed
with new inputs) and a text-only one; each must give the reference's tokens, and the first two must have been
captured and replayed (not silently run eagerly). A plan whose decode step could not be captured fails too:
identical tokens from its eager fallback say nothing of the option.

    python scripts/gpu_exactness.py [--preset tiny] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys

import torch

import qwen3_vl
from harness.bench import bench_prompt, not_as_planned
from qwen3_vl.checkpoint import hf_state_dict
from qwen3_vl.config import preset

PLANS = (
    "attention=sdpa",
    "attention=eager,kv_cache=static,execution=cuda_graph",
    "attention=sdpa,kv_cache=static,execution=cuda_graph",
    "attention=sdpa,kv_cache=static,execution=compile[gemv=false;attend=false]",
    "attention=sdpa,kv_cache=static,execution=compile[attend=false]",
    "attention=sdpa,kv_cache=static,execution=compile",
    "attention=sdpa,kv_cache=static,execution=compile[fold=true]",
    "attention=sdpa,kv_cache=static,execution=compile[prefill_compile=true]",
    "attention=sdpa,kv_cache=static,execution=compile[prefill_qk=false]",
    "attention=sdpa,kv_cache=static,execution=compile[attend_grouped_from=0]",
)


def run(model, inputs, tokens):
    steps = []
    model.step_observers.append(lambda logits: steps.append(logits[:, -1].float()))
    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=[])
    model.step_observers.clear()
    return out[:, inputs["input_ids"].shape[1]:].cpu(), torch.stack(steps[:tokens], 1)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--plan", action="append", help="check only these plans (repeatable; default: all of PLANS)")
    args = parser.parse_args()
    plans = args.plan or PLANS
    config, device, ok = preset(args.preset), "cuda", True
    weights = hf_state_dict(qwen3_vl.build(config, None, device=device, seed=7), to_cpu=False)
    inputs = {k: v.to(device) for k, v in bench_prompt(config, 224, 80).items()}
    ref32 = qwen3_vl.build(config, weights, dtype="fp32", device=device)
    ref_tokens, ref_steps = run(ref32, inputs, args.tokens)
    print(f"{args.preset} fp32 reference: {args.tokens} tokens on {torch.cuda.get_device_name()}")
    others = [{k: v.to(device) for k, v in bench_prompt(config, 224, 90, seed=1).items()},
              {"input_ids": torch.randint(0, 1000, (1, 37), generator=torch.Generator().manual_seed(2)).to(device)}]
    references = [run(ref32, prompt, args.tokens) for prompt in others]
    for plan in plans:
        model = qwen3_vl.build(config, weights, dtype="fp32", device=device, plan=plan)
        tokens, steps = run(model, inputs, args.tokens)
        same = bool(torch.equal(tokens, ref_tokens))
        err = rel(steps, ref_steps)
        fallback = not_as_planned(model)  # identical tokens from an eager fallback say nothing of the option
        good = same and err <= 1e-5 and fallback is None
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} fp32 {plan:58} tokens identical={same} "
              f"step-logits rel err={err:.2e} running={model.plan.short_id} {fallback or model.execution.describe()}")
        if "prefill" not in model.execution.describe():
            continue
        for name, prompt, (want, want_steps) in zip(("same shape", "text only"), others, references, strict=True):
            tokens, steps = run(model, prompt, args.tokens)
            same, err = bool(torch.equal(tokens, want)), rel(steps, want_steps)
            ok &= same and err <= 1e-5
            print(f"{'ok  ' if same and err <= 1e-5 else 'FAIL'} fp32 {plan:58} {name}: tokens identical={same} "
                  f"step-logits rel err={err:.2e}")
        counts = model.execution.describe()["prefill"]["counts"]
        graphed = counts.get("captured", 0) == 2 and counts.get("replayed", 0) == 1
        ok &= graphed
        print(f"{'ok  ' if graphed else 'FAIL'} fp32 {plan:58} prefill graphs: {model.execution.describe()['prefill']}")
    ref16 = qwen3_vl.build(config, weights, dtype="bf16", device=device)
    tok16, steps16 = run(ref16, inputs, args.tokens)
    for plan in plans:
        model = qwen3_vl.build(config, weights, dtype="bf16", device=device, plan=plan)
        tokens, steps = run(model, inputs, args.tokens)
        agree = int((tokens == ref_tokens).all(0).cumprod(0).sum()) if tokens.shape == ref_tokens.shape else 0
        agree = min(agree, int((tok16 == ref_tokens).all(0).cumprod(0).sum())) + 1  # + the step that chose
        agree = min(agree, args.tokens)
        bound = 2 * rel(steps16[:, :agree], ref_steps[:, :agree])
        err = rel(steps[:, :agree], ref_steps[:, :agree])
        fallback = not_as_planned(model)
        good = err <= max(bound, 1e-5) and fallback is None
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} bf16 {plan:58} err vs fp32={err:.3e} <= 2x reference bf16 "
              f"{bound:.3e} over {agree} steps{'; ' + fallback if fallback else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
