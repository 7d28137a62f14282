"""End-to-end benchmark: this project's plans beside transformers (and llama.cpp's numbers) in one
process, on the same weights and the same prompt, stored through the results store.

    python -m harness bench --preset 2b --device cuda --dtype bf16 --compare transformers
    python -m harness bench --preset mini --device cpu --compare transformers --llama-bench lb.json

Per engine, interleaved rounds (the order rotates): time to first token (``generate`` of one token),
then ``generate`` of ``--new-tokens`` tokens with ``min_new_tokens == max_new_tokens``; decode time
per token = (full - first) / (new - 1). Before timing, the floor is counted: the text decoder's
weight bytes (every decode step reads them all) over a copy bandwidth measured here (bytes read +
written, as the issue's figures), and decode efficiency = floor / measured ms per token. Greedy
tokens of every engine are compared with the first engine's. llama.cpp is not run here: its
``llama-bench -o json`` output, when given, is read and shown beside (its own machine and weights
are whatever the user ran it on; the table says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qwen3_vl
from harness import fingerprint, results
from harness.timing import Clock, interleaved, percentile
from qwen3_vl.checkpoint import hf_state_dict
from qwen3_vl.config import parameter_count, preset
from qwen3_vl.hardware.device import storage_and_compute
from qwen3_vl.optim import registry

SUITE = "bench"
DEFAULT_PLANS = {
    "cpu": ["reference", "attention=sdpa,kv_cache=static", "attention=sdpa,kv_cache=static,quant=int8_weight"],
    "cuda": ["reference", "attention=sdpa", "attention=eager,kv_cache=static,execution=cuda_graph",
             "attention=sdpa,kv_cache=static,execution=cuda_graph", "attention=eager,kv_cache=static,execution=compile",
             "attention=sdpa,kv_cache=static,execution=compile"],
}


@dataclass
class Engine:
    label: str
    generate: object  # (input kwargs, new tokens) -> token ids [B, prompt + new]
    plan: object = None  # our Plan, None for other engines
    fallbacks: list = field(default_factory=list)
    tokens: torch.Tensor | None = None


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device (or RAM-to-RAM) tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        clock = Clock(device)
        with clock():
            dst.copy_(src)
        times.append(clock.samples[0])
    return 2 * nbytes / min(times)


def text_weight_bytes(config, dtype: torch.dtype, bytes_per_weight: float | None = None) -> int:
    """What one decode step must read: every text layer, the final norm and the output matrix."""
    counts = parameter_count(config)
    embed = config.text.vocab_size * config.text.hidden_size
    per_weight = bytes_per_weight or torch.finfo(dtype).bits / 8
    # The embedding table is read one row per token, not whole; the output matrix is read whole
    # (it is the embedding itself when tied).
    return int((counts["text"] - embed + config.text.vocab_size * config.text.hidden_size) * per_weight)


def bench_prompt(config, image_size: int, prompt_tokens: int, seed: int = 0) -> dict:
    """Chat-like ids with one image of ``image_size`` pixels a side (random pixels, seeded)."""
    v = config.vision
    side = image_size // v.patch_size
    side -= side % v.spatial_merge_size
    grid = torch.tensor([[1, side, side]])
    visual = side * side // v.spatial_merge_size**2
    text = max(4, prompt_tokens - visual - 2)
    gen = torch.Generator().manual_seed(seed)
    before = torch.randint(0, 1000, (text // 2,), generator=gen)
    after = torch.randint(0, 1000, (text - text // 2,), generator=gen)
    ids = torch.cat([before, torch.tensor([config.vision_start_token_id]), torch.full((visual,), config.image_token_id),
                     torch.tensor([config.vision_end_token_id]), after])[None]
    pixels = torch.randn(side * side, v.patch_dim, generator=gen)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid}


def ours(label: str, config, state_dict, dtype, device, plan) -> Engine:
    model = qwen3_vl.build(config, state_dict, dtype=dtype, device=device, plan=plan)

    def generate(inputs, n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, eos_token_id=[])

    return Engine(label, generate, model.plan, list(model.fallbacks))


def transformers_engines(config, state_dict, dtype, device, paths=("sdpa", "static")) -> list[Engine]:
    """transformers' Qwen3VLForConditionalGeneration on the same tensors: its default path (sdpa,
    dynamic cache) and, on CUDA, its fastest (static cache, which compiles the decode step)."""
    import transformers

    from qwen3_vl.config import to_hf

    hf_config = transformers.Qwen3VLConfig(**to_hf(config))
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        None, config=hf_config, state_dict=state_dict, dtype=storage_and_compute(dtype)[1],
        attn_implementation="sdpa")
    model.to(device).eval()  # the weights already are there (shared); this moves its rotary buffers

    def make(**extra):
        def generate(inputs, n):
            types = (inputs["input_ids"] == config.image_token_id).long()
            with torch.inference_mode():
                return model.generate(**inputs, mm_token_type_ids=types, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=config.pad_token_id, **extra)
        return generate

    version = transformers.__version__
    engines = [Engine(f"transformers {version} sdpa", make())] if "sdpa" in paths else []
    if "static" in paths and torch.device(device).type == "cuda":
        engines.append(Engine(f"transformers {version} static", make(cache_implementation="static")))
    return engines


def llama_bench_rows(path: Path) -> list[dict]:
    """Records of ``llama-bench -o json``: prompt (n_gen == 0) and generation (n_prompt == 0) tests."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read llama-bench JSON {path}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} is not llama-bench JSON output (expected a list of test records)")
    out = []
    for rec in data:
        try:
            kind = "prefill" if int(rec["n_gen"]) == 0 else "decode"
            out.append({"label": f"llama.cpp {rec.get('type_k', '')} {rec.get('model_type', '')}".strip(),
                        "kind": kind, "n_prompt": int(rec["n_prompt"]), "n_gen": int(rec["n_gen"]),
                        "tokens_per_s": float(rec["avg_ts"]), "stddev": float(rec.get("stddev_ts", 0.0)),
                        "build": rec.get("build_commit", ""), "cpu": rec.get("cpu_info", ""),
                        "gpu": rec.get("gpu_info", ""), "threads": rec.get("n_threads")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: a record lacks n_prompt/n_gen/avg_ts ({exc})") from None
    return out


def peak_memory(engine: Engine, inputs, n: int, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    engine.generate(inputs, n)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--plan", action="append", help="a plan to measure (repeat); default: per device")
    parser.add_argument("--compare", action="append", default=[], choices=["transformers"])
    parser.add_argument("--transformers-paths", default="sdpa,static",
                        help="which transformers paths to run: sdpa (default cache), static (compiled decode)")
    parser.add_argument("--llama-bench", type=Path, help="llama-bench -o json output to show beside")
    parser.add_argument("--image-size", type=int, default=448, help="pixels a side of the prompt's image (0: none)")
    parser.add_argument("--prompt-tokens", type=int, default=262)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: physical cores)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cpu":
        import psutil

        torch.set_num_threads(args.threads or psutil.cpu_count(logical=False) or 1)
    llama = llama_bench_rows(args.llama_bench) if args.llama_bench else []
    results.check_writable(args.results_dir)
    fp = fingerprint.collect()
    config = preset(args.preset)
    storage = storage_and_compute(args.dtype)[0]
    plans = args.plan or DEFAULT_PLANS[device.type]

    print(f"building {args.preset} ({args.dtype}) on {device} ...", file=sys.stderr)
    reference = qwen3_vl.build(config, None, dtype=args.dtype, device=device, seed=args.seed)
    state_dict = hf_state_dict(reference, to_cpu=False)  # every engine below shares these tensors
    del reference
    engines = [ours(p, config, state_dict, args.dtype, device, p) for p in plans]
    if "transformers" in args.compare:
        engines += transformers_engines(config, state_dict, args.dtype, device, args.transformers_paths.split(","))
    inputs = bench_prompt(config, args.image_size, args.prompt_tokens, args.seed) if args.image_size else {
        "input_ids": torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]

    bandwidth = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 28))
    weight_bytes = text_weight_bytes(config, storage)
    floor_ms = weight_bytes / bandwidth * 1e3
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write); text weights {weight_bytes / 1e9:.2f} GB; "
          f"decode floor {floor_ms:.2f} ms/token ({1e3 / floor_ms:.0f} tokens/s)", file=sys.stderr)

    first: dict[str, Clock] = {}
    full: dict[str, Clock] = {}

    def target(engine: Engine, n: int, clocks: dict):
        def run(clock: Clock):
            with clock():
                out = engine.generate(inputs, n)
            if n == args.new_tokens:
                engine.tokens = out[:, prompt_len:].cpu()
            clocks[engine.label] = clock
        return run

    timed_first = interleaved({e.label: target(e, 1, first) for e in engines}, args.rounds, args.warmup, device)
    timed_full = interleaved({e.label: target(e, args.new_tokens, full) for e in engines}, args.rounds,
                             args.warmup, device)

    run = results.RunInfo(results.new_run_id(), fp["id"], args.preset, args.dtype, fp["git"].get("sha", "unknown"),
                          bool(fp["git"].get("dirty", False)))
    params = {"prompt_tokens": prompt_len, "image_size": args.image_size, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "threads": torch.get_num_threads()}
    rows, table = [], []
    ref_tokens = engines[0].tokens
    for engine in engines:
        t1, tn = timed_first[engine.label], timed_full[engine.label]
        error = t1.error or tn.error
        measurements = []
        if error:
            measurements.append(results.failed("decode_ms_per_token", error))
            table.append((engine.label, None, None, None, None, None, error))
        else:
            ttft = t1.clock.samples
            fulls = tn.clock.samples
            per_token = [(f - statistics.median(ttft)) / (args.new_tokens - 1) * 1e3 for f in fulls]
            ms = statistics.median(per_token)
            same = None if ref_tokens is None or engine.tokens is None else int(
                (engine.tokens == ref_tokens).all(dim=0).cumprod(0).sum())
            mem = peak_memory(engine, inputs, args.new_tokens, device)
            measurements += [
                results.Measurement("ttft_ms", statistics.median(ttft) * 1e3, "ms", [s * 1e3 for s in ttft],
                                    better="lower"),
                results.Measurement("ttft_ms_p90", percentile(ttft, 90) * 1e3, "ms", better="lower"),
                results.Measurement("decode_ms_per_token", ms, "ms", per_token, better="lower"),
                results.Measurement("decode_tokens_per_s", 1e3 / ms, "tokens/s", better="higher"),
                results.Measurement("decode_efficiency", floor_ms / ms, "ratio", better="higher"),
                results.Measurement("greedy_tokens_equal_to_first", same, "tokens", better="higher"),
            ]
            if mem is not None:
                measurements.append(results.Measurement("cuda_allocated_peak", mem, "B", better="lower"))
            table.append((engine.label, statistics.median(ttft) * 1e3, ms, 1e3 / ms, floor_ms / ms, same, mem))
        for m in measurements:
            rows.append(results.make_row(run, str(device), SUITE, engine.label, m, engine.plan,
                                         {**params, "engine": engine.label}, engine.fallbacks,
                                         "python -m harness bench " + " ".join(argv or sys.argv[1:])))
    for m in (results.Measurement("copy_bandwidth", bandwidth, "B/s"),
              results.Measurement("text_weight_bytes", weight_bytes, "B"),
              results.Measurement("decode_floor_ms", floor_ms, "ms")):
        rows.append(results.make_row(run, str(device), SUITE, "floor", m, None, params))
    for rec in llama:
        rows.append(results.make_row(run, str(device), SUITE, rec["label"],
                                     results.Measurement(f"{rec['kind']}_tokens_per_s", rec["tokens_per_s"],
                                                         "tokens/s", better="higher"),
                                     None, {k: v for k, v in rec.items() if k != "tokens_per_s"}))
    path = results.write_run(rows, args.results_dir, fp, run.run_id, axes=registry.AXES)

    name = fp["stable"]["torch_gpus"][0]["name"] if device.type == "cuda" and fp["stable"]["torch_gpus"] else \
        fp["stable"]["cpu"]["model"]
    print(f"\n{args.preset} {args.dtype} on {name} ({device}), prompt {prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds; floor {floor_ms:.2f} ms/token")
    print(f"{'engine':58} {'TTFT ms':>8} {'ms/tok':>8} {'tok/s':>8} {'eff':>6} {'same':>5} {'peak GiB':>9}")
    for label, ttft, ms, tps, eff, same, mem in table:
        if ttft is None:
            print(f"{label:58} failed: {mem}")
            continue
        gib = "-" if mem is None else f"{mem / 2**30:.2f}"
        print(f"{label:58} {ttft:8.1f} {ms:8.2f} {tps:8.1f} {eff:6.2f} {same!s:>5} {gib:>9}")
    for rec in llama:
        print(f"{rec['label']:58} {'':8} {'':8} {rec['tokens_per_s']:8.1f}  ({rec['kind']}, "
              f"pp{rec['n_prompt']}/tg{rec['n_gen']}, as reported by llama-bench)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
