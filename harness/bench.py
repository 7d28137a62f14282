"""End-to-end benchmark: this project's plans beside transformers (and llama.cpp's numbers) in one
process, on the same weights and the same prompt, stored through the results store.

    python -m harness bench --preset 2b --device cuda --dtype bf16 --compare transformers
    python -m harness bench --preset mini --device cpu --compare transformers --llama-bench lb.json

Per engine, interleaved rounds (the order rotates): time to first token (``generate`` of one token),
then ``generate`` of ``--new-tokens`` tokens with ``min_new_tokens == max_new_tokens``; decode time
per token = (full - first) / (new - 1), in wall-clock and in this process's CPU time (on a shared
machine the CPU time shows what other work took). Before timing, the floor is counted: the text
decoder's weight bytes (every decode step reads them all; per engine, at its bytes per weight, and
with ``cpu_packed``'s screened argmax the int8 screen in place of the output matrix) over a
bandwidth measured here (on CUDA a device copy, bytes read + written, as issue 8's figures; on CPU
a read of a buffer larger than every cache, since a decode step only reads its weights), and decode
efficiency = floor / measured ms per token. Greedy tokens of every engine are compared with the
first engine's, and each of this project's plans is scored against the first engine teacher-forced
on its tokens (relative logits error, KL, top-1 agreement), so a quantized plan's error is stored
beside its speed. llama.cpp is not run here: its ``llama-bench -o json`` output, when given, is read
and shown beside (its own weights and run time are whatever the user ran it with; the table says
so). ``--markdown FILE`` writes the table (machine, fingerprint, load, command) for a README.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qwen3_vl
from harness import fingerprint, results
from harness.conversation import compare
from harness.errors import HarnessError
from harness.numerics import bounded_measurement, plan_budget
from harness.timing import Clock, interleaved, percentile, read_bandwidth
from qwen3_vl.checkpoint import hf_state_dict
from qwen3_vl.config import parameter_count, preset
from qwen3_vl.hardware.device import storage_and_compute
from qwen3_vl.model.positions import mrope_positions
from qwen3_vl.optim import registry

SUITE = "bench"
_CPU_FAST = "attention=sdpa,kv_cache=static,rope=cached"
DEFAULT_PLANS = {
    # the reference, the fastest exact CPU plans, then the quantized plans on the same execution
    # (oneDNN beside ours for fp32: it prefills faster, ours decodes faster where huge pages are available)
    "cpu": ["reference", f"{_CPU_FAST},execution=cpu_packed", f"{_CPU_FAST},execution=cpu_packed[kernel=mkldnn]",
            f"{_CPU_FAST},quant=int8_weight,execution=cpu_packed",
            f"{_CPU_FAST},quant=int8_weight[kernel=fbgemm],execution=cpu_packed",
            f"{_CPU_FAST},quant=int4_weight,execution=cpu_packed"],
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
    model: object = None  # our model (for the teacher-forced error), None for other engines
    step_bytes: int | None = None  # what a decode step reads (None: the text weights at the dtype's size)


def not_as_planned(model) -> str | None:
    """Why our model did not run as its plan says, though it produced tokens: its decode step or a prompt's
    prefill could not be captured and ran eagerly instead (``describe()`` keeps the cause), or the prompt's q/k
    kernels were asked for and inputs they do not fit ran the plain ops. Its times are then
    the fallback's, not the option's, so the bench stores them as a failure of the option. ``model`` is None for
    other projects' engines."""
    if model is None:
        return None
    info = model.execution.describe()
    if info.get("capture_error"):
        return f"{info['option']}: the decode step was not captured and decoded eagerly: {info['capture_error']}"
    failed = info.get("prefill", {}).get("capture_errors")
    if failed:
        return f"{info['option']}: a prefill was not captured and ran eagerly: {failed[0]}"
    unfit = info.get("prefill_qk", {}).get("unfit_calls")
    if unfit:
        return f"{info['option']}: prefill_qk's kernels did not take {unfit} call(s), which ran the plain ops"
    return None


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


def quant_bytes_per_weight(plan, storage: torch.dtype) -> float:
    """Bytes a quantized plan reads per weight (codes plus scales, per the quant option's layout)."""
    choice = plan["quant"]
    if choice.name == "int8_weight":
        return 1.0
    if choice.name == "int4_weight":
        group = dict(choice.params).get("group", 128)
        return 0.5 + 8 / group  # fp32 scale and zero per group
    return torch.finfo(storage).bits / 8


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


def prompt_of(config, args, tokens: int, device) -> dict:
    """The bench prompt of ``tokens`` tokens (with the image unless ``--image-size 0``), on ``device``."""
    inputs = bench_prompt(config, args.image_size, tokens, args.seed) if args.image_size else {
        "input_ids": torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(args.seed))}
    return {k: v.to(device) for k, v in inputs.items()}


def ours(label: str, config, state_dict, dtype, device, plan) -> Engine:
    model = qwen3_vl.build(config, state_dict, dtype=dtype, device=device, plan=plan)

    def generate(inputs, n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, eos_token_id=[])

    storage = storage_and_compute(dtype)[0]
    per_weight = quant_bytes_per_weight(model.plan, storage)
    step_bytes = text_weight_bytes(config, storage, per_weight)
    screen = getattr(model.execution, "argmax", None)
    if screen is not None:  # greedy steps read the int8 screen (codes, scales, bounds) instead of the output matrix
        step_bytes += screen.nbytes() - int(config.text.vocab_size * config.text.hidden_size * per_weight)
    return Engine(label, generate, model.plan, list(model.fallbacks), model=model, step_bytes=step_bytes)


@torch.inference_mode()
def teacher_forced_logits(model, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """[B, 1 + n, V] logits: the prompt's last position, then one decode step per given token (the
    path and kernels ``generate`` decodes with: one row per step, the plan's cache)."""
    ids = inputs["input_ids"]
    cache = model.new_cache(ids.shape[0], ids.shape[1] + tokens.shape[1])
    embeds, visual_mask, deepstack = model.embed(ids, inputs.get("pixel_values"), inputs.get("image_grid_thw"))
    positions, deltas = mrope_positions(ids, model.config, None, inputs.get("image_grid_thw"))
    out = [model.step(embeds, positions, None, cache, visual_mask, deepstack, logits_to_keep=1)]
    position = (ids.shape[1] + deltas.to(model.device)).view(1, -1, 1)
    for index in range(tokens.shape[1]):
        embeds = model.language_model.embed_tokens(tokens[:, index : index + 1].to(model.device))
        out.append(model.step(embeds.to(model.compute_dtype), position.expand(3, -1, 1), None, cache))
        position = position + 1
    return torch.cat(out, dim=1).double()


def declared_bounds(plan, dtype: str) -> dict[str, float]:
    """What the plan promises against the reference: fp32 exactness, or its options' summed budgets."""
    exact, budget = plan_budget(plan)
    if exact:
        return {"logits_rel": 1e-5} if dtype == "fp32" else {}
    return budget


def teacher_forced_error(engine: Engine, reference: Engine, inputs: dict) -> dict[str, float]:
    """``engine`` vs ``reference`` fed the reference's generated tokens: relative logits error, mean
    KL(ref || ours) and top-1 agreement over the prefill's last position and every decode step."""
    return compare(teacher_forced_logits(engine.model, inputs, reference.tokens),
                   teacher_forced_logits(reference.model, inputs, reference.tokens))


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
            weights = str(rec.get("model_type", "")).split(" ", 2)[-1]  # "qwen3vl 2B Q4_K - Medium" -> "Q4_K - Medium"
            out.append({"label": f"llama.cpp {weights}".strip(), "model": rec.get("model_filename", ""),
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
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cpu":
        import psutil

        torch.set_num_threads(args.threads or psutil.cpu_count(logical=False) or 1)
    try:
        llama = llama_bench_rows(args.llama_bench) if args.llama_bench else []
        results.check_writable(args.results_dir)
    except (ValueError, OSError, HarnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fp = fingerprint.collect()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    config = preset(args.preset)
    storage = storage_and_compute(args.dtype)[0]
    plans = args.plan or DEFAULT_PLANS[device.type]
    command = "python -m harness.bench " + shlex.join(argv if argv is not None else sys.argv[1:])  # pastes into a shell

    print(f"building {args.preset} ({args.dtype}) on {device} ...", file=sys.stderr)
    reference = qwen3_vl.build(config, None, dtype=args.dtype, device=device, seed=args.seed)
    state_dict = hf_state_dict(reference, to_cpu=False)  # every engine below shares these tensors
    del reference
    engines = []
    for p in plans:  # a plan that cannot be built here is reported and skipped, not fatal to the run
        try:
            engines.append(ours(p, config, state_dict, args.dtype, device, p))
        except ValueError as exc:  # PlanError included
            print(f"skipped {p}: {exc}", file=sys.stderr)
    if not engines:
        print("error: none of the plans could be built", file=sys.stderr)
        return 2
    if "transformers" in args.compare:
        engines += transformers_engines(config, state_dict, args.dtype, device, args.transformers_paths.split(","))
    inputs = prompt_of(config, args, args.prompt_tokens, device)
    prompt_len = inputs["input_ids"].shape[1]

    if device.type == "cuda":
        bandwidth, bandwidth_kind = copy_bandwidth(device, nbytes=1 << 30), "copy (read+write)"
    else:
        bandwidth, bandwidth_kind = read_bandwidth(), "read"
    weight_bytes = text_weight_bytes(config, storage)
    floor_ms = weight_bytes / bandwidth * 1e3
    print(f"{bandwidth_kind} bandwidth {bandwidth / 1e9:.0f} GB/s; text weights {weight_bytes / 1e9:.2f} GB; "
          f"decode floor {floor_ms:.2f} ms/token ({1e3 / floor_ms:.0f} tokens/s)", file=sys.stderr)

    cpu_seconds: dict[str, dict[int, list[float]]] = {e.label: {1: [], args.new_tokens: []} for e in engines}

    def target(engine: Engine, n: int):
        def run(clock: Clock):
            cpu = time.process_time()
            with clock():
                out = engine.generate(inputs, n)
            if clock.enabled:
                cpu_seconds[engine.label][n].append(time.process_time() - cpu)
            if n == args.new_tokens:
                engine.tokens = out[:, prompt_len:].cpu()
        return run

    timed_first = interleaved({e.label: target(e, 1) for e in engines}, args.rounds, args.warmup, device)
    timed_full = interleaved({e.label: target(e, args.new_tokens) for e in engines}, args.rounds,
                             args.warmup, device)
    # One prompt of a length no engine has seen (one more 64-token bucket): what the first request of a new
    # shape costs where an engine prepares per shape (a captured prefill, a compiled step), once each; then the
    # same prompt again (median of 3): what that length costs once prepared, which need not be the timed prompt's
    # time (a compiled prefill's second shape gets kernels for any size, the first kept its own).
    unseen = prompt_of(config, args, args.prompt_tokens + 64, device)
    new_shape: dict[str, float] = {}
    new_shape_again: dict[str, float] = {}
    for engine in engines:
        if timed_first[engine.label].error or timed_full[engine.label].error:
            continue
        clock, again = Clock(device), Clock(device)
        try:
            with clock():
                engine.generate(unseen, 1)
            new_shape[engine.label] = clock.samples[0]
            for _ in range(3):
                with again():
                    engine.generate(unseen, 1)
            new_shape_again[engine.label] = statistics.median(again.samples)
        except Exception as exc:  # reported, not fatal: the timed rounds above stand
            print(f"{engine.label}: the unseen-length prompt failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if engine.model is not None:  # what ran (kernels chosen, graphs captured and replayed, fallbacks)
            print(f"{engine.label}: {engine.model.execution.describe()}", file=sys.stderr)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    run = results.RunInfo(results.new_run_id(), fp["id"], args.preset, args.dtype, fp["git"].get("sha", "unknown"),
                          bool(fp["git"].get("dirty", False)))
    params = {"prompt_tokens": prompt_len, "image_size": args.image_size, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "load_before": load_before,
              "load_after": load_after}
    rows, table = [], []
    first = engines[0]
    for engine in engines:
        t1, tn = timed_first[engine.label], timed_full[engine.label]
        error = t1.error or tn.error or not_as_planned(engine.model)
        measurements = []
        if not error:
            ttft = statistics.median(t1.clock.samples)
            per_token = [(f - ttft) / (args.new_tokens - 1) * 1e3 for f in tn.clock.samples]
            ms = statistics.median(per_token)
            if ms <= 0:  # the whole generation timed faster than its first token: noise, not a speed
                error = (f"decode time not resolvable: {args.new_tokens} tokens took no longer than the first "
                         f"({ms:.2f} ms/token); use more --new-tokens or --rounds, or a quieter machine")
        row = {"label": engine.label, "error": error}
        if error:
            measurements.append(results.failed("decode_ms_per_token", error))
        else:
            cpu = cpu_seconds[engine.label]
            cpu_ms = (statistics.median(cpu[args.new_tokens]) - statistics.median(cpu[1])) / (args.new_tokens - 1) * 1e3
            engine_floor = floor_ms * (engine.step_bytes or weight_bytes) / weight_bytes
            same = None if first.tokens is None or engine.tokens is None else int(
                (engine.tokens == first.tokens).all(dim=0).cumprod(0).sum())
            mem = peak_memory(engine, inputs, args.new_tokens, device)
            row.update(ttft_ms=ttft * 1e3, prefill_tokens_per_s=prompt_len / ttft, ms=ms, cpu_ms=cpu_ms,
                       tokens_per_s=1e3 / ms, efficiency=engine_floor / ms, same=same, peak=mem,
                       ttft_new_shape_ms=new_shape.get(engine.label, float("nan")) * 1e3,
                       ttft_new_shape_again_ms=new_shape_again.get(engine.label, float("nan")) * 1e3)
            measurements += [
                results.Measurement("ttft_ms", ttft * 1e3, "ms", [s * 1e3 for s in t1.clock.samples], better="lower"),
                results.Measurement("ttft_ms_p90", percentile(t1.clock.samples, 90) * 1e3, "ms", better="lower"),
                results.Measurement("prefill_tokens_per_s", prompt_len / ttft, "tokens/s", better="higher"),
                results.Measurement("decode_ms_per_token", ms, "ms", per_token, better="lower"),
                results.Measurement("decode_cpu_ms_per_token", cpu_ms, "ms", better="lower"),
                results.Measurement("decode_tokens_per_s", 1e3 / ms, "tokens/s", better="higher"),
                results.Measurement("decode_efficiency", engine_floor / ms, "ratio", better="higher"),
                results.Measurement("greedy_tokens_equal_to_first", same, "tokens", better="higher"),
            ]
            if engine.model is not None and first.model is not None and first.tokens is not None:
                scores = teacher_forced_error(engine, first, inputs)
                row.update(scores)
                bounds = declared_bounds(engine.plan, args.dtype) if first.plan == registry.reference_plan() else {}
                checked = [bounded_measurement(k, v, bounds.get(k)) for k, v in scores.items()]
                measurements += checked
                row["outside_budget"] = [m.error for m in checked if m.status != "ok"]
            if mem is not None:
                measurements.append(results.Measurement("cuda_allocated_peak", mem, "B", better="lower"))
            if engine.label in new_shape:
                measurements.append(results.Measurement("ttft_new_shape_ms", new_shape[engine.label] * 1e3, "ms",
                                                        better="lower"))
            if engine.label in new_shape_again:
                measurements.append(results.Measurement("ttft_new_shape_again_ms",
                                                        new_shape_again[engine.label] * 1e3, "ms", better="lower"))
        table.append(row)
        for m in measurements:
            rows.append(results.make_row(run, str(device), SUITE, engine.label, m, engine.plan,
                                         {**params, "engine": engine.label}, engine.fallbacks, command))
    for m in (results.Measurement("bandwidth", bandwidth, "B/s"),
              results.Measurement("text_weight_bytes", weight_bytes, "B"),
              results.Measurement("decode_floor_ms", floor_ms, "ms")):
        rows.append(results.make_row(run, str(device), SUITE, "floor", m, None, {**params, "kind": bandwidth_kind}))
    for rec in llama:
        rows.append(results.make_row(run, str(device), SUITE, rec["label"],
                                     results.Measurement(f"{rec['kind']}_tokens_per_s", rec["tokens_per_s"],
                                                         "tokens/s", better="higher"),
                                     None, {k: v for k, v in rec.items() if k != "tokens_per_s"}))
    path = results.write_run(rows, args.results_dir, fp, run.run_id, axes=registry.AXES)

    name = fp["stable"]["torch_gpus"][0]["name"] if device.type == "cuda" and fp["stable"]["torch_gpus"] else \
        fp["stable"]["cpu"]["model"]
    header = (f"{args.preset} {args.dtype} on {name} ({device}, {torch.get_num_threads()} threads), fingerprint "
              f"{fp['id']}; prompt {prompt_len} tokens{' with one image' if args.image_size else ''}, "
              f"{args.new_tokens} new tokens, {args.rounds} rounds; floor {floor_ms:.2f} ms/token "
              f"({bandwidth_kind} {bandwidth / 1e9:.0f} GB/s); load average {_load(load_before)} before, "
              f"{_load(load_after)} after")
    print("\n" + header)
    print(text_table(table, llama))
    if args.markdown:
        args.markdown.write_text(markdown_table(table, llama, header, command, path) + "\n")
        print(f"markdown: {args.markdown}")
    print(f"results: {path}")
    return 0


def _load(load) -> str:
    return "-" if load is None else "/".join(f"{x:.1f}" for x in load)


def _baseline(table: list[dict]) -> dict | None:
    """The row ratios are taken against: transformers' default path when it ran, else the first."""
    ok = [r for r in table if not r["error"]]
    return next((r for r in ok if r["label"].startswith("transformers") and r["label"].endswith("sdpa")),
                ok[0] if ok else None)


def _error_text(row: dict) -> str:
    if "logits_rel" not in row:
        return "-"
    text = f"{row['logits_rel']:.1e} / {row['kl']:.1e} / {row['top1_agreement']:.2f}"
    if row.get("outside_budget"):
        text += " (OUTSIDE declared budget: " + ", ".join(row["outside_budget"]) + ")"
    return text


def text_table(table: list[dict], llama: list[dict]) -> str:
    base = _baseline(table)
    lines = [f"{'engine':70} {'TTFT ms':>8} {'x':>5} {'new (again)':>15} {'ms/tok':>7} {'cpu ms':>7} {'tok/s':>6} "
             f"{'x':>5} {'eff':>5} {'same':>4}  error rel/KL/top1  (new: TTFT of a first prompt of an unseen length, "
             f"then of that length again)"]
    for row in table:
        if row["error"]:
            lines.append(f"{row['label']:70} failed: {row['error']}")
            continue
        lines.append(f"{row['label']:70} {row['ttft_ms']:8.1f} {base['ttft_ms'] / row['ttft_ms']:5.2f} "
                     f"{row['ttft_new_shape_ms']:7.1f} ({row['ttft_new_shape_again_ms']:5.1f}) {row['ms']:7.2f} "
                     f"{row['cpu_ms']:7.2f} "
                     f"{row['tokens_per_s']:6.1f} {base['ms'] / row['ms']:5.2f} {row['efficiency']:5.2f} "
                     f"{row['same']!s:>4}  {_error_text(row)}")
    for rec in llama:
        lines.append(f"{rec['label']:70} {rec['kind']} {rec['tokens_per_s']:.1f} tokens/s (pp{rec['n_prompt']}/"
                     f"tg{rec['n_gen']}, {rec['threads']} threads, as reported by llama-bench)")
    return "\n".join(lines)


def markdown_table(table: list[dict], llama: list[dict], header: str, command: str, path) -> str:
    """The table for a README: ratios against transformers' default path (or the first engine)."""
    base = _baseline(table)
    lines = [header, "", "| engine | time to first token ms (x) | first prompt of an unseen length ms (then) | "
             "prefill tok/s | decode ms/token (x) | decode tok/s | decode CPU ms/token | greedy tokens same | "
             "error vs first: logits rel / KL / top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        if row["error"]:
            lines.append(f"| {row['label']} | failed: {row['error']} | | | | | | | |")
            continue
        lines.append(f"| {row['label']} | {row['ttft_ms']:.0f} ({base['ttft_ms'] / row['ttft_ms']:.2f}x) | "
                     f"{row['ttft_new_shape_ms']:.0f} ({row['ttft_new_shape_again_ms']:.1f}) | "
                     f"{row['prefill_tokens_per_s']:.0f} | "
                     f"{row['ms']:.1f} ({base['ms'] / row['ms']:.2f}x) | "
                     f"{row['tokens_per_s']:.1f} | {row['cpu_ms']:.1f} | {row['same']} | {_error_text(row)} |")
    merged: dict[tuple, dict[str, str]] = {}  # one row per llama.cpp model: its prefill and decode tests
    for rec in llama:
        cell = merged.setdefault((rec["label"], rec["threads"]), {"prefill": "", "decode": ""})
        cell[rec["kind"]] = (f"{rec['tokens_per_s']:.0f} (pp{rec['n_prompt']}, text only)" if rec["kind"] == "prefill"
                             else f"{rec['tokens_per_s']:.1f} (tg{rec['n_gen']})")
    for (label, threads), cell in merged.items():
        lines.append(f"| {label}, {threads} threads (llama-bench) | | | {cell['prefill']} | | {cell['decode']} | | | |")
    lines += ["", f"Command: `{command}`; results: `{path}`."]
    return "\n".join(lines)


def exit_within(code: int, grace_s: float = 60.0) -> None:
    """Exit with ``code``; a teardown still running after ``grace_s`` prints every thread's stack and ends the
    process with status 1.

    An 8b run on an H100 stored its results, then did not exit for 100 s (cause unknown; one suspect is
    Inductor's compile-worker pool, whose shutdown waits up to 300 s: pytorch#162199). A stuck teardown must
    neither hide nor eat the device call's time, and its stacks are the evidence.
    """
    faulthandler.dump_traceback_later(grace_s, exit=True)
    sys.exit(code)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        exit_within(main())
