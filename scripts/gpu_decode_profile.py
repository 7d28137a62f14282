"""Where a captured decode step's time goes on a GPU (issue 8's decode targets): the step's kernels by
device time, against the floor (text weights over the measured copy bandwidth) and against the same
step's matrix products alone, for Inductor settings compiled side by side in one process.

    python scripts/gpu_decode_profile.py [--preset 2b] [--dtype bf16] [--plan PLAN ...]
        [--variants default[,cdt,autotune]] [--gemv-tile N,K,WARPS]

Variants (Inductor settings while the step compiles): ``default``; ``cdt`` (coordinate-descent tuning of
each Triton kernel's launch settings, gpt-fast's setting); ``autotune`` (``max_autotune_gemm``: Triton matmul
templates benchmarked against cuBLAS for each product's shape). Each builds its own model from the same
seed, so the weights are the same; their steps are timed in interleaved rounds, each a run of replays of
the captured graph from the same cache position, and their logits compared with the first variant's.
Caution: in one process (torch 2.11) the later variants compiled in about 3 s against 64-84 s for the
first, with the first's kernel names and times: their settings did not reach a fresh compile, so compare
settings in separate processes (``TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1``, ``TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config as inductor_config
import torch.nn.functional as F

import qwen3_vl
from harness.bench import bench_prompt, copy_bandwidth, text_weight_bytes
from harness.timing import capture_graph, graph_replay_ms
from qwen3_vl.config import preset
from qwen3_vl.kernels import triton_gemv
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim.execution import compile as compile_option
from qwen3_vl.optim.plan import failure_text

VARIANTS = {
    "default": {},
    "cdt": {"coordinate_descent_tuning": True},
    "autotune": {"max_autotune_gemm": True},
}


def kernel_group(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_tem"):  # Inductor's matmul templates (max_autotune)
        return "matrix product"
    if "triton" in low:  # before the library names: a fused kernel's name lists its ops (addmm, ...)
        return "triton (fused)"
    if any(s in low for s in ("gemv", "gemm", "cutlass", "nvjet", "sm90_", "cublas", "splitk", "matmul")):
        return "matrix product"
    if "softmax" in low or "attention" in low or "fmha" in low or "flash" in low:
        return "attention"
    if "copy" in low or "index" in low or "scatter" in low or "gather" in low or "fill" in low:
        return "copy/index"
    if "reduce" in low or "argmax" in low:
        return "reduction"
    return "other"


class Step:
    """A variant's captured decode step, replayed from a saved cache position."""

    def __init__(self, model) -> None:
        execution = model.execution
        self.model, self.captured = model, execution.captured
        if self.captured is None or self.captured.graph is None:
            raise RuntimeError(f"no captured decode step: {execution.describe()}")
        self.saved = self.captured.state()

    def restore(self) -> None:
        self.captured.restore(self.saved)

    def ms(self, replays: int) -> float:
        self.restore()
        return graph_replay_ms(self.captured.graph, replays)

    def logits(self) -> torch.Tensor:
        self.restore()
        self.captured.graph.replay()
        return self.captured.logits.float().clone()


def products_alone_ms(model, product, replays: int = 50) -> tuple[float, int]:
    """One step's matrix products alone (every text Linear and the output matrix at one row), captured."""
    weights = [m.weight for m in model.language_model.modules() if isinstance(m, Linear)] + [model.lm_head.weight]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], device=w.device, dtype=w.dtype) for w in weights}
    graph = capture_graph(lambda: [product(inputs[w.shape[1]], w) for w in weights])
    return graph_replay_ms(graph, replays), sum(w.numel() * w.element_size() for w in weights)


def kernel_table(step: Step, replays: int = 20) -> None:
    step.restore()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step.captured.graph.replay()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            per_name[event.name].append(event.device_time)  # microseconds
    groups: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    rows = []
    for name, times in per_name.items():
        total = sum(times) / replays
        groups[kernel_group(name)] += total
        counts[kernel_group(name)] += len(times) / replays
        rows.append((total, len(times) / replays, name))
    kernels = sum(counts.values())
    print(f"  kernels per step: {kernels:.0f}, device time {sum(groups.values()):.0f} us per step")
    for group, us in groups.most_common():
        print(f"    {group:16s} {us:8.1f} us  ({counts[group]:.0f} kernels, {us / max(counts[group], 1):.1f} us each)")
    print("  top kernels (us per step, launches per step, name):")
    for total, count, name in sorted(rows, reverse=True)[:40]:
        print(f"    {total:8.1f} {count:5.0f}  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--plan", action="append", help="repeatable: each plan's step is a variant of its own "
                        "(default attention=eager,kv_cache=static,execution=compile)")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--gemv-tile", help="N,K,WARPS: our GEMV at this tile for every matrix, 8b-class included "
                        "(an experiment: compile's tile() rule is replaced in this process)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replays", type=int, default=100)
    args = parser.parse_args()
    args.plan = args.plan or ["attention=eager,kv_cache=static,execution=compile"]
    config = preset(args.preset)
    if args.gemv_tile:
        forced = tuple(int(v) for v in args.gemv_tile.split(","))
        triton_gemv.tile = compile_option.tile = lambda n, k: forced
        print(f"EXPERIMENT: our GEMV at tile {forced} for every matrix (tile() replaced)")
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    floor_ms = text_weight_bytes(config, torch.bfloat16 if args.dtype == "bf16" else torch.float16) / bandwidth * 1e3
    print(f"{args.preset} {args.dtype} {' | '.join(args.plan)} on {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; copy {bandwidth / 1e12:.2f} TB/s; floor {floor_ms:.3f} ms/token")
    inputs = bench_prompt(config, 448, 262)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    steps: dict[str, Step] = {}
    # Each variant compiles from scratch: a cached graph or kernel from another variant's settings would hide them.
    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    torch._functorch.config.enable_autograd_cache = False
    variants = [(plan, name) for plan in args.plan for name in args.variants.split(",")]
    for plan, variant in variants:
        settings = VARIANTS[variant]
        # the execution option with its parameters names a plan's variant ("compile[fold=true]/default")
        name = variant if len(args.plan) == 1 else f"{plan.rpartition('execution=')[2]}/{variant}"
        torch._dynamo.utils.counters.clear()
        start = time.perf_counter()
        try:
            model = qwen3_vl.build(config, dtype=args.dtype, device=device, plan=plan, seed=0)
            with inductor_config.patch(settings) if settings else contextlib.nullcontext():
                model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, eos_token_id=[])
            steps[name] = Step(model)
        except Exception as exc:  # one variant failing leaves the others measured
            print(f"{name}: failed: {failure_text(exc)}")
            continue
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        print(f"{name}: built, compiled and captured in {time.perf_counter() - start:.1f} s; graph breaks {breaks}; "
              f"{model.execution.describe()}", flush=True)
    if not steps:
        return
    with torch.inference_mode():  # the cache's buffers are inference tensors
        measure(steps, args, floor_ms)


def measure(steps: dict[str, Step], args, floor_ms: float) -> None:
    first = next(iter(steps.values()))
    ours = lambda x, w: triton_gemv.gemv(x, w) if triton_gemv.tile(*w.shape) else F.linear(x, w)  # compile's choice
    for kind, product in (("cuBLAS", F.linear), ("our Triton GEMV where compile uses it", ours)):
        products_ms, product_bytes = products_alone_ms(first.model, product)
        print(f"matrix products alone ({kind}, one row, captured): {products_ms:.3f} ms per step, "
              f"{product_bytes / products_ms / 1e6:.0f} GB/s ({product_bytes / 1e9:.2f} GB)")
    reference = first.logits()
    for name, step in steps.items():
        err = float((step.logits() - reference).abs().max() / reference.abs().max())
        print(f"{name}: step logits vs {next(iter(steps))}: rel {err:.1e}")
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            samples[name].append(step.ms(args.replays))
    print(f"\nreplayed step, median of {args.rounds} interleaved rounds of {args.replays} replays:")
    for name, times in samples.items():
        ms = sorted(times)[len(times) // 2]
        print(f"  {name:16s} {ms:.3f} ms/token ({1e3 / ms:.0f} tokens/s, {floor_ms / ms:.0%} of the floor; "
              f"samples {', '.join(f'{t:.3f}' for t in times)})")
    for name, step in steps.items():
        print(f"\nkernels of {name}:")
        kernel_table(step)


if __name__ == "__main__":
    main()
