"""Where the time to first token goes on a GPU (issue 8's 15 ms target): the prompt's phases timed apart,
the host synchronisations the prefill makes (with the line that made each), and the profiler's view of
host time against device time.

    python scripts/gpu_prefill_profile.py [--preset 2b] [--dtype bf16] [--plan ...]

Prints a report; a prefill whose device time is a small part of its wall time is bound by the host
(launches, Python, synchronisations), which is what this separates. Then ``cuda_graph``'s two prefill
changes are undone one at a time, interleaved in the same process: ``before`` (a validity mask for every
prefill, so SDPA's per-layer empty-row check; the composite RMSNorm), ``unmasked`` (the mask only for a
padded prompt), ``shipped`` (and each text RMSNorm as one ``F.rms_norm`` call).
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
import warnings

import torch

import qwen3_vl
from harness.bench import bench_prompt
from qwen3_vl.config import preset
from qwen3_vl.model.layers import RMSNorm
from qwen3_vl.model.positions import mrope_positions
from qwen3_vl.optim.execution.cuda_graph import FusedRMSNorm, GraphStaticCache


def timed(fn, repeats: int = 5) -> float:
    """Median wall milliseconds of ``fn`` with the device drained before and after."""
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def sync_sites(fn) -> collections.Counter:
    """Each project source line under which ``fn`` synchronised with the device, with its count."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/qwen3_vl/" in f.filename or "/harness/" in f.filename]
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                            for f in frames[-3:][::-1])
        sites[where or f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters after
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--plan", default="attention=sdpa,kv_cache=static,execution=cuda_graph")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--prompt-tokens", type=int, default=262)
    args = parser.parse_args()
    config = preset(args.preset)
    model = qwen3_vl.build(config, dtype=args.dtype, device="cuda", plan=args.plan)
    inputs = bench_prompt(config, args.image_size, args.prompt_tokens)
    ids, pixels, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"]
    print(f"{args.preset} {args.dtype} {args.plan} on {torch.cuda.get_device_name()}; prompt {ids.shape[1]} tokens")

    def first_token():
        model.generate(**inputs, max_new_tokens=1, eos_token_id=[])

    def vision():
        model.vision.encode(model, pixels.to("cuda"), grid)

    def embed():
        model.embed(ids, pixels, grid)

    embeds, visual, deepstack = model.embed(ids, pixels, grid)
    positions, _ = mrope_positions(ids, config, None, grid, None)

    def text():
        cache = model.new_cache(1, ids.shape[1] + 1)
        model.step(embeds, positions, None, cache, visual, deepstack, logits_to_keep=1)

    with torch.inference_mode():
        for _ in range(3):
            first_token()
        for name, fn in (("first token (generate of 1)", first_token), ("vision tower", vision),
                         ("embed (vision + merge)", embed), ("text prefill + logits", text)):
            print(f"{name:32s} {timed(fn):8.2f} ms")
        # before the sync-debug mode and the profiler: after them every op ran slower (H200: 39 -> 73 ms)
        if model.execution.describe().get("prefill", {}).get("capacity", 0):
            print("\n(the prefill replays a captured graph, so the eager prefill changes are not compared)")
        else:
            compare_candidates(model, first_token)
        for name, fn in (("generate of 1", first_token),):
            sites = sync_sites(fn)
            print(f"\nhost synchronisations in {name}: {sum(sites.values())}")
            for where, count in sites.most_common(25):
                print(f"  {count:4d}  {where}")
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            first_token()
            torch.cuda.synchronize()
        events = prof.key_averages()
        launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
        launches = sum(e.count for e in events if e.key in launch_names)
        print(f"\nprofiled generate of 1: {launches} kernel launches (device time: the tables' Self CUDA total)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=25))
        print(events.table(sort_by="self_device_time_total", row_limit=15))


def compare_candidates(model, first_token) -> None:
    """Time to first token and first-token logits with cuda_graph's prefill changes undone, rounds interleaved."""
    graph_update, fused_forward = GraphStaticCache.update, FusedRMSNorm.forward

    def masked_update(self, layer, k, v):
        keys, values, valid = graph_update(self, layer, k, v)
        return keys, values, (valid if self.graph_mode else self.valid[:, : self.seen_tokens + self._pending])

    variants = {"before": (masked_update, RMSNorm.forward), "unmasked": (graph_update, RMSNorm.forward),
                "shipped": (graph_update, fused_forward)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    logits: dict[str, torch.Tensor] = {}

    def first_logits():
        seen = []
        model.step_observers.append(lambda x: seen.append(x[:, -1].float()))
        first_token()
        model.step_observers.clear()
        return seen[0]

    try:
        for name, (update, forward) in variants.items():
            GraphStaticCache.update, FusedRMSNorm.forward = update, forward
            logits[name] = first_logits()
            first_token()
        for _ in range(5):
            for name, (update, forward) in variants.items():
                GraphStaticCache.update, FusedRMSNorm.forward = update, forward
                times[name].append(timed(first_token, repeats=1))
    finally:
        GraphStaticCache.update, FusedRMSNorm.forward = graph_update, fused_forward
    print("\ncuda_graph prefill changes undone, first token (generate of 1), 5 interleaved rounds:")
    base = logits["before"]
    for name, samples in times.items():
        err = float((logits[name] - base).abs().max() / base.abs().max())
        print(f"  {name:12s} {sorted(samples)[2]:8.2f} ms   first-token logits vs before: rel {err:.1e}")


if __name__ == "__main__":
    main()
