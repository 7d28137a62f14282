"""Memory and quantization benchmark: decode speed of the weight-quantization plans against the fp32
reference side by side, KV bytes per token of every KV option, peak RSS of ``offload_disk``, and (on a
GPU) the offload options and the memory planner under 2 and 4 GiB budgets.

Parts (``--parts``, comma-separated):

- ``decode``: one process, every plan prefilled with the same prompt, then decode steps timed in
  interleaved rounds (``harness.timing.interleaved``: one step of each plan per round, order
  rotating, warm-up excluded), all plans fed the same tokens, so their logits are compared step by
  step with the reference's (KL, top-1 agreement, relative error). The physical floor is printed
  next to it: bytes read per step (decoder layers + output matrix, after quantization) over the
  memory bandwidth measured in the same process.
- ``kv``: every KV option's cache filled with ``--kv-tokens`` tokens of the preset's shape; bytes
  per token from ``nbytes()`` (what the cache holds; bounded caches say so).
- ``kv_error``: every approximate KV option against the reference over one seeded multimodal
  conversation (``harness/conversation.py``: a 126-token prompt holding an image, 64 greedy steps, a
  second 8-token turn, 8 more steps), teacher-forced with the reference's tokens: next-token KL,
  top-1 agreement and relative logits error, each stored with the option's declared bound, and the
  KV bytes held at the end.
- ``rss``: peak RSS of a short generation from a saved checkpoint, ``resident`` vs
  ``offload_disk``, each in a fresh process.
- ``offload`` (CUDA): for each preset, ``resident`` vs ``offload_cpu`` / ``offload_disk`` without
  and with the planner's budgets: logits bitwise equal to resident (prefill, 64 decode steps, a
  second 8-token turn on the same cache and 8 more steps), peak allocated vs budget (the
  budget is also enforced with ``set_per_process_memory_fraction``), this process's NVML peak (which
  also holds the CUDA context, outside the allocator's reach), tokens/s, bytes copied per token; and
  the quantized plans' error and speed on the GPU. With ``--emulate sm61-laptop`` every row but the
  resident reference runs under that profile's rules (fp16 storage with fp32 compute, no TF32 or
  bf16, only the efficient/math SDPA kernels) on an emulated card of the row's budget (the profile's
  own memory for rows without one): a 2 GiB or 4 GiB Pascal card on a bigger GPU.

    python -m suites.bench_memory_quant --parts decode,kv,rss                  # CPU, mini
    python -m suites.bench_memory_quant --device cuda --dtype fp16 --parts offload,decode,kv \\
        --offload-presets 2b,8b
    python -m suites.bench_memory_quant --device cuda --dtype fp16 --parts offload --emulate sm61-laptop \\
        --offload-presets 2b,4b,8b

Results go to the results store under this machine's fingerprint (suite ``memory_quant``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import qwen3_vl
from harness import fingerprint as fingerprint_mod
from harness import memory, results, timing
from harness.conversation import compare, conversation, named_prompt, within_budget
from harness.numerics import bounded_measurement
from qwen3_vl.hardware import emulate as emulation
from qwen3_vl.hardware.profiles import Profile, get_profile
from qwen3_vl.model.positions import mrope_positions
from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim import registry
from qwen3_vl.optim.kv_cache import hierarchical_kv
from qwen3_vl.optim.kv_cache.common import KVShape
from qwen3_vl.optim.memory.planner import GiB, human, module_bytes

SUITE = "memory_quant"
DECODE_PLANS = ("reference", "kv_cache=static", "quant=int8_weight", "quant=int8_weight,kv_cache=static",
                "quant=int8_weight[kernel=fbgemm],kv_cache=static", "quant=int4_weight,kv_cache=static")


# ---------------------------------------------------------------------------------------------
# decode


def bytes_per_step(model) -> int:
    """Weight bytes a decode step reads: the decoder layers, the final norm and the output matrix."""
    return module_bytes(model.language_model.layers) + module_bytes(model.language_model.norm) + \
        module_bytes(model.lm_head)


@torch.inference_mode()
def decode_part(args, plans: list[str]) -> list[dict]:
    steps = args.warmup + args.rounds
    models = {p: qwen3_vl.from_pretrained(args.preset, plan=p, device=args.device, dtype=args.dtype, seed=0)
              for p in plans}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, args.prompt_tokens), generator=gen)
    tokens = torch.randint(0, 1000, (steps,), generator=gen)  # every plan decodes the same tokens
    state, logits = {}, {p: [] for p in plans}
    for p, m in models.items():
        cache = m.new_cache(1, args.prompt_tokens + steps + 1)
        pos, _ = mrope_positions(ids, m.config)
        m.step(m.language_model.embed_tokens(ids.to(m.device)).to(m.compute_dtype), pos, None, cache,
               logits_to_keep=1)
        state[p] = [cache, args.prompt_tokens]

    def target(p):
        m = models[p]

        def run(clock):
            cache, position = state[p]
            emb = m.language_model.embed_tokens(tokens[position - args.prompt_tokens].view(1, 1).to(m.device))
            pos = torch.full((3, 1, 1), position, device=m.device)
            with clock(tokens=1):
                out = m.step(emb.to(m.compute_dtype), pos, None, cache)
            logits[p].append(out[0, -1].float().cpu())
            state[p][1] = position + 1
        return run

    timed = timing.interleaved({p: target(p) for p in plans}, args.rounds, args.warmup, args.device)
    bandwidth = timing.read_bandwidth(512 << 20) if args.device == "cpu" else None
    rows = []
    base = timed[plans[0]].clock
    for p in plans:
        clock, m = timed[p].clock, models[p]
        ms = statistics.median(clock.samples) * 1e3 if clock.samples else float("nan")
        ratios = timing.round_ratios(base, clock)  # reference time / this plan's time, per round
        nbytes = bytes_per_step(m)
        err = compare(torch.stack(logits[p][args.warmup:]), torch.stack(logits[plans[0]][args.warmup:]))
        rows.append({"plan": p, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                     "speedup_vs_reference": statistics.median(ratios) if ratios else float("nan"),
                     "bytes_per_step": nbytes,
                     "floor_ms": None if bandwidth is None else nbytes / bandwidth * 1e3,
                     "samples": clock.samples, "error": timed[p].error, **err,
                     "quant": m.quant.describe().get("kernel", "none")})
    print(f"\ndecode on {args.preset}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt_tokens}, {args.rounds} interleaved rounds after {args.warmup} warm-up"
          + (f"; measured read bandwidth {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""))
    print(f"{'plan':52} {'ms/token':>9} {'tok/s':>7} {'x ref':>6} {'MB/step':>8} {'floor ms':>8} "
          f"{'KL':>9} {'top-1':>6} {'rel':>8}")
    for r in rows:
        floor = "" if r["floor_ms"] is None else f"{r['floor_ms']:.1f}"
        print(f"{r['plan'][:52]:52} {r['ms_per_token']:9.1f} {r['tokens_per_s']:7.1f} "
              f"{r['speedup_vs_reference']:6.2f} {r['bytes_per_step'] / 1e6:8.0f} {floor:>8} "
              f"{r['kl']:9.2e} {r['top1_agreement']:6.3f} {r['logits_rel']:8.2e}")
    return rows


# ---------------------------------------------------------------------------------------------
# kv


def kv_options() -> list[tuple[str, dict]]:
    out = []
    for opt in registry.options("kv_cache"):
        for params in ({}, *(v for v in opt.variants if v != dict(opt.defaults))):
            out.append((opt.name, dict(params)))
    return out


@torch.inference_mode()
def kv_part(args) -> list[dict]:
    from qwen3_vl.model.qwen3_vl import Qwen3VL
    from qwen3_vl.optim.plan import Plan

    config = qwen3_vl.config.preset(args.kv_preset)
    with torch.device("meta"):
        model = Qwen3VL(config)
    model.plan = Plan.parse("reference")
    shape = KVShape.of(model)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.kv_dtype]
    n, decode = args.kv_tokens, 64
    rows = []
    for name, params in kv_options():
        factory = registry.get("kv_cache", name).build(model, None, **params)
        cache = factory.new(1, n)
        gen = torch.Generator().manual_seed(0)
        for chunk in [n - decode] + [1] * decode:
            cache.start_step(None, chunk)
            for layer in range(shape.num_layers):
                k, v = (torch.randn(1, shape.kv_heads, chunk, shape.head_dim, generator=gen).to(dtype) for _ in "kv")
                _, _, valid = cache.update(layer, k, v)
                if getattr(cache, "observes_queries", False):
                    q = torch.randn(1, config.text.num_attention_heads, chunk, shape.head_dim, generator=gen)
                    cache.observe(layer, q.to(dtype), AttentionMask(valid))
            cache.end_step()
        nbytes = cache.nbytes()
        label = name + ("" if not params else "[" + ";".join(f"{k}={v}" for k, v in params.items()) + "]")
        tiers = hierarchical_kv.tier_bytes(cache) if name == "hierarchical_kv" else None
        rows.append({"option": label, "tokens": n, "nbytes": nbytes, "bytes_per_token": nbytes / n, "tiers": tiers})
        del cache, factory
        gc.collect()
    ref = next(r for r in rows if r["option"] == "dynamic")["bytes_per_token"]
    print(f"\nKV bytes per token, {args.kv_preset} shape ({shape.num_layers} layers x {shape.kv_heads} KV heads x "
          f"{shape.head_dim}), {args.kv_dtype} K/V, after {n} tokens (measured with nbytes())")
    for r in rows:
        tiers = "" if not r["tiers"] else " = " + ", ".join(f"{k} {human(v)}" for k, v in r["tiers"].items())
        print(f"  {r['option']:48} {r['bytes_per_token']:10.0f} B/token  {r['bytes_per_token'] / ref:6.3f} x dynamic"
              f"  ({human(r['nbytes'])} held{tiers})")
    return rows


# ---------------------------------------------------------------------------------------------
# rss (each plan in a fresh process: the high-water mark of one process says nothing about the next)


def probe_rss(checkpoint: str, plan: str, new_tokens: int) -> dict:
    def hwm() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    before = hwm()
    model = qwen3_vl.from_pretrained(checkpoint, plan=plan)
    after_load = hwm()
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    seconds = time.perf_counter() - t
    return {"plan": plan, "rss_peak_load": after_load, "rss_peak": hwm(), "rss_before": before,
            "ms_per_token": seconds / new_tokens * 1e3}


def rss_part(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="qwen3vl-bench-") as tmp:
        qwen3_vl.save_pretrained(qwen3_vl.from_pretrained(args.preset, seed=0), tmp)
        gc.collect()
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        rows = []
        for plan in ("reference", "memory=offload_disk"):
            cmd = [sys.executable, "-m", "suites.bench_memory_quant", "--probe-rss", plan, "--checkpoint", tmp,
                   "--rss-tokens", str(args.rss_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                rows.append({"plan": plan, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\npeak RSS, {args.preset} from a {human(size)} checkpoint, {args.rss_tokens} new tokens, "
          "each plan in a fresh process")
    for r in rows:
        if "error" in r:
            print(f"  {r['plan']:24} failed: {r['error']}")
        else:
            print(f"  {r['plan']:24} peak RSS {human(r['rss_peak']):>11} (after load {human(r['rss_peak_load'])}, "
                  f"interpreter+torch {human(r['rss_before'])}), {r['ms_per_token']:.1f} ms/token")
    return rows


# ---------------------------------------------------------------------------------------------
# offload (CUDA)


@torch.inference_mode()
def run_plan_on_gpu(source: str, dtype: str, plan: str, budget: int | None, ids: torch.Tensor, new_tokens: int,
                    device: str = "cuda", forced: list[int] | None = None, emulate: Profile | None = None,
                    turn2: torch.Tensor | None = None):
    """Build + prefill + decode under an optional hard cap; returns logits, timing, peaks. Greedy,
    or fed the ``forced`` tokens (the reference's), so every plan's logits have the same context.
    ``emulate``: run under that hardware profile, on a card of ``budget`` bytes when one is given.
    ``turn2`` ([1, T] ids): after the decode steps, a second user turn prefilled onto the same cache,
    then ``new_tokens // 8`` more steps (their logits are returned too; the timing is the first turn's).

    ``device="cpu"`` is a dry run of this code path (no caps, no device peaks; offload_cpu falls back).
    """
    cuda = device == "cuda"
    index = torch.cuda.current_device() if cuda else None
    if emulate is not None and budget is not None:
        emulate = dataclasses.replace(emulate, memory_bytes=budget)  # a card of exactly the budget's size
    context = None
    if cuda:
        total = torch.cuda.get_device_properties(index).total_memory
        gc.collect()
        torch.cuda.empty_cache()
        if budget is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
        context = memory.nvml_process_used(index)  # CUDA context, libraries and cached blocks
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def work():
        model = qwen3_vl.from_pretrained(source, plan=plan, device=device, dtype=dtype, seed=0,
                                         emulate=emulate if cuda else None)
        more = 0 if turn2 is None else new_tokens // 8
        cache = model.new_cache(1, ids.shape[1] + new_tokens + (0 if turn2 is None else turn2.shape[1] + more) + 1)
        pos, _ = mrope_positions(ids, model.config)
        emb = model.language_model.embed_tokens(ids.to(model.device)).to(model.compute_dtype)
        out = [model.step(emb, pos, None, cache, logits_to_keep=1)[0, -1].float().cpu()]

        def decode(model, cache, steps: int, position: int) -> None:  # passed in: work() deletes its names
            for i in range(steps):  # the next token: greedy, or the reference's after the same logits row
                token = out[-1].argmax() if forced is None else torch.tensor(forced[len(out) - 1])
                emb = model.language_model.embed_tokens(token.view(1, 1).to(model.device)).to(model.compute_dtype)
                p = torch.full((3, 1, 1), position + i, device=model.device)
                out.append(model.step(emb, p, None, cache)[0, -1].float().cpu())

        sync()
        t = time.perf_counter()
        decode(model, cache, new_tokens, ids.shape[1])
        sync()
        seconds = time.perf_counter() - t
        if turn2 is not None:  # the second turn: T new positions on the same cache, then more steps
            start = ids.shape[1] + new_tokens
            emb = model.language_model.embed_tokens(turn2.to(model.device)).to(model.compute_dtype)
            p = torch.arange(start, start + turn2.shape[1], device=model.device).view(1, 1, -1).expand(3, 1, -1)
            out.append(model.step(emb, p, None, cache, logits_to_keep=1)[0, -1].float().cpu())
            decode(model, cache, more, start + turn2.shape[1])
        info = model.memory.describe()
        row = {"plan": str(model.plan.short_id), "requested": plan, "budget": budget,
               "emulated": model.target.emulated_profile or "",
               "peak_allocated": torch.cuda.max_memory_allocated(index) if cuda else 0,
               "peak_reserved": torch.cuda.max_memory_reserved(index) if cuda else 0,
               "ms_per_token": seconds / new_tokens * 1e3,
               # every forward streams the weights and returns one logits row
               "bytes_copied_per_token": info.get("bytes_copied", 0) / len(out),
               "resident_layers": info.get("resident_layers"), "streamed_layers": info.get("streamed_layers"),
               "fallbacks": [str(f) for f in model.fallbacks], "error": ""}
        if hasattr(model.memory, "report"):
            row["report"] = model.memory.report()
        del model, cache
        return torch.stack(out), row

    try:
        (logits, row), peaks = memory.peak(work, device)  # resets the allocator's peak; samples NVML
        row["nvml_process_peak"] = next((m.value for m in peaks if m.metric == "nvml_process_used_peak"), None)
        row["nvml_before"] = context
        return logits, row
    except Exception as exc:  # OOM or a budget error: reported, not fatal
        return None, {"plan": plan, "requested": plan, "budget": budget, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        gc.collect()
        if emulate is not None:
            emulation.restore()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
            torch.cuda.empty_cache()


def offload_part(args) -> list[dict]:
    if args.device != "cuda":
        print("\noffload: a dry run of the GPU check on this CPU (no device caps or peaks; offload_cpu falls back)")
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    turn2 = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))  # the second user turn
    profile = get_profile(args.emulate) if args.emulate else None
    rows = []
    small = "context=1024;prefill=512"
    for preset in args.offload_presets.split(","):
        # The preset's seeded weights are saved once in the run's dtype; every row loads them (memory-mapped,
        # fast) instead of drawing them again, and offload_disk streams from this very file.
        folder = tempfile.mkdtemp(prefix=f"qwen3vl-{preset}-")
        t = time.perf_counter()
        qwen3_vl.save_pretrained(qwen3_vl.from_pretrained(preset, dtype=args.dtype, seed=0), folder)
        gc.collect()
        print(f"  {preset}: seeded {args.dtype} checkpoint written in {time.perf_counter() - t:.0f} s")
        plans = [("reference", None), ("memory=offload_cpu", None),
                 (f"memory=offload_cpu[budget=2GiB;{small}]", 2 * GiB),
                 (f"memory=offload_cpu[budget=4GiB;{small}]", 4 * GiB), ("memory=offload_disk", None),
                 (f"memory=offload_disk[budget=4GiB;{small}]", 4 * GiB),
                 (f"quant=int8_weight,memory=offload_cpu[budget=2GiB;{small}]", 2 * GiB)]
        if profile is None:
            plans += [("quant=int8_weight", None), ("quant=int4_weight", None), ("kv_cache=static", None)]
        base = forced = None
        if args.offload_base:  # e.g. attention=sdpa for every row: the ViT's eager scores alone need GiBs
            plans = [(args.offload_base if p == "reference" else f"{args.offload_base},{p}", b) for p, b in plans]
        for plan, budget in plans:
            # the resident reference runs on the whole card; every other row on the emulated one
            emulate = profile if profile is not None and plan != plans[0][0] else None
            logits, row = run_plan_on_gpu(folder, args.dtype, plan, budget, ids, args.offload_tokens, args.device,
                                          forced, emulate, turn2)
            row["preset"] = preset
            if logits is not None:
                if base is None:
                    base, forced = logits, logits.argmax(-1).tolist()
                row["bitwise_equal_to_resident"] = bool(torch.equal(logits, base))
                row.update(compare(logits, base))
                row["within_budget"] = budget is None or args.device != "cuda" or row["peak_allocated"] <= budget
            rows.append(row)
            state = row["error"] or (f"peak {human(row['peak_allocated'])}"
                                     + (f" (budget {human(budget)}: {'ok' if row['within_budget'] else 'OVER'})"
                                        if budget else "")
                                     + (f", NVML {human(row['nvml_process_peak'])}"
                                        if row.get("nvml_process_peak") else "")
                                     + f", {row['ms_per_token']:.1f} ms/token, "
                                     f"{human(row['bytes_copied_per_token'])} copied/token, "
                                     f"bitwise={row['bitwise_equal_to_resident']}, rel {row['logits_rel']:.1e}, "
                                     f"KL {row['kl']:.1e}, top-1 {row['top1_agreement']:.2f}")
            print(f"  {preset:4} {plan:62} {'[' + row['emulated'] + '] ' if row.get('emulated') else ''}{state}")
        shutil.rmtree(folder, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# kv_error

KV_APPROXIMATE = ("kv_cache=quant_int8", "kv_cache=quant_int4", "kv_cache=hierarchical_kv[hot=32;warm=64]",
                  "kv_cache=sink_window[window=172]",  # keeps 176 of the conversation's 206 tokens
                  "kv_cache=h2o[budget=176;recent=88]", "kv_cache=cross_layer[retain_below=-1.0]")


def kv_error_part(args) -> list[dict]:
    from qwen3_vl.optim.plan import Plan

    prompt = named_prompt("single", qwen3_vl.config.preset(args.kv_error_preset))
    reference = qwen3_vl.from_pretrained(args.kv_error_preset, seed=0)
    ref_logits, tokens, ref_cache = conversation(reference, prompt)
    print(f"\nkv_error: {args.kv_error_preset}, {prompt.input_ids.shape[1]}-token prompt with an image, "
          f"{tokens.shape[1]} decoded tokens and an 8-token second turn; reference KV {ref_cache.nbytes()} B")
    rows = []
    for plan in KV_APPROXIMATE:
        model = qwen3_vl.from_pretrained(args.kv_error_preset, seed=0, plan=plan)
        logits, _, cache = conversation(model, prompt, tokens=tokens)
        metrics = compare(logits, ref_logits)
        budget = registry.get("kv_cache", Plan.parse(plan)["kv_cache"].name).error_budget
        outside = within_budget(metrics, budget)
        rows.append({"plan": plan, "metrics": metrics, "budget": budget, "kv_bytes": cache.nbytes(),
                     "ref_kv_bytes": ref_cache.nbytes(), "positions": logits.shape[1]})
        print(f"  {plan:45} KL {metrics['kl']:.2e}  top-1 {metrics['top1_agreement']:.3f}  rel "
              f"{metrics['logits_rel']:.2e}  KV {cache.nbytes()} B  "
              + ("within budget" if not outside else "OUTSIDE budget: " + ", ".join(outside)))
    return rows


# ---------------------------------------------------------------------------------------------
# storing


def store(args, decode_rows, kv_rows, rss_rows, offload_rows, kv_error_rows=()) -> str:
    from qwen3_vl.optim.plan import Plan, make_plan

    fp = fingerprint_mod.collect()
    git = fp.get("git", {})
    run = results.RunInfo(results.new_run_id(), fp["id"], args.preset, args.dtype, git.get("sha", "unknown"),
                          bool(git.get("dirty", False)))
    M = results.Measurement
    rows = []
    repro = "python -m suites.bench_memory_quant " + " ".join(sys.argv[1:])
    for r in decode_rows:
        ms = [M("decode_time", r["ms_per_token"] / 1e3, "s", r["samples"], "ok" if not r["error"] else "failed",
                r["error"], better="lower"),
              M("speedup_vs_reference", r["speedup_vs_reference"], "ratio", better="higher"),
              M("bytes_per_step", r["bytes_per_step"], "B", better="lower"),
              M("kl", r["kl"], better="lower"), M("top1_agreement", r["top1_agreement"], better="higher"),
              M("logits_rel", r["logits_rel"], "ratio", better="lower")]
        if r["floor_ms"] is not None:
            ms.append(M("bandwidth_floor_time", r["floor_ms"] / 1e3, "s", better="lower"))
        rows += [results.make_row(run, args.device, SUITE, "decode", m, Plan.parse(r["plan"]), {}, (), repro)
                 for m in ms]
    for r in kv_rows:
        plan = make_plan(kv_cache=r["option"])
        params = {"preset_shape": args.kv_preset, "kv_dtype": args.kv_dtype, "tokens": r["tokens"]}
        rows.append(results.make_row(run, "cpu", SUITE, "kv_bytes", M("kv_bytes_per_token", r["bytes_per_token"],
                                                                        "B", better="lower"), plan, params, (), repro))
    for r in kv_error_rows:
        plan = Plan.parse(r["plan"])
        params = {"positions": r["positions"], "ref_kv_bytes": r["ref_kv_bytes"]}
        err_run = dataclasses.replace(run, preset=args.kv_error_preset, dtype="fp32")
        for metric, value in r["metrics"].items():
            rows.append(results.make_row(err_run, "cpu", SUITE, "kv_error",
                                         bounded_measurement(metric, value, r["budget"].get(metric)), plan, params,
                                         (), repro))
        rows.append(results.make_row(err_run, "cpu", SUITE, "kv_error", M("kv_bytes", r["kv_bytes"], "B",
                                                                           better="lower"), plan, params, (), repro))
    for r in rss_rows:
        if "error" in r:
            rows.append(results.make_row(run, "cpu", SUITE, "rss", results.failed("rss_peak", str(r["error"])),
                                         Plan.parse(r["plan"]), {}, (), repro))
            continue
        for key in ("rss_peak", "rss_peak_load"):
            rows.append(results.make_row(run, "cpu", SUITE, "rss", M(key, r[key], "B", better="lower"),
                                         Plan.parse(r["plan"]), {}, (), repro))
    for r in offload_rows:
        plan = Plan.parse(r["requested"])
        if r["error"]:
            rows.append(results.make_row(dataclasses.replace(run, preset=r["preset"]), args.device, SUITE,
                                         f"offload_{r['preset']}", results.failed("peak_allocated", r["error"]), plan,
                                         {"budget": r["budget"], "dtype": args.dtype}, (), repro))
            continue
        ok = r["within_budget"]
        for m in (M("peak_allocated", r["peak_allocated"], "B", status="ok" if ok else "failed",
                    error="" if ok else "over budget", bound=r["budget"], better="lower"),
                  M("decode_time", r["ms_per_token"] / 1e3, "s", better="lower"),
                  M("bytes_copied_per_token", r["bytes_copied_per_token"], "B", better="lower"),
                  M("logits_rel", r["logits_rel"], "ratio", better="lower"),
                  M("bitwise_equal_to_resident", float(r["bitwise_equal_to_resident"]), "bool", better="higher"),
                  *([M("nvml_process_used_peak", r["nvml_process_peak"], "B", better="lower"),
                     M("nvml_process_used_before", r["nvml_before"], "B")] if r.get("nvml_process_peak") else [])):
            params = {"emulated": r.get("emulated", ""), "budget": r["budget"], "dtype": args.dtype,
                      "new_tokens": args.offload_tokens, "resident_layers": r.get("resident_layers"),
                      "streamed_layers": r.get("streamed_layers")}
            rows.append(results.make_row(dataclasses.replace(run, preset=r["preset"]), args.device, SUITE,
                                         f"offload_{r['preset']}", m, plan, params, r.get("fallbacks", ()), repro))
    return str(results.write_run(rows, args.results_dir, fp, run.run_id, axes=registry.AXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.bench_memory_quant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="decode,kv,rss")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--plans", default=";".join(DECODE_PLANS),
                        help="decode plans, ';'-separated; the first is the baseline")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--kv-preset", default="2b")
    parser.add_argument("--kv-dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--kv-tokens", type=int, default=4096)
    parser.add_argument("--rss-tokens", type=int, default=16)
    parser.add_argument("--kv-error-preset", default="tiny", help="kv_error part: the preset the conversation runs on")
    parser.add_argument("--offload-presets", default="2b,8b")
    parser.add_argument("--offload-tokens", type=int, default=64,
                        help="decode steps per row; then a second 8-token turn and a eighth as many steps")
    parser.add_argument("--offload-base", default="attention=sdpa",
                        help="plan axes every offload row shares ('' for the reference attention)")
    parser.add_argument("--emulate", default=None,
                        help="offload part: run every row but the resident reference under this hardware profile "
                             "(e.g. sm61-laptop), on a card of the row's budget")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--no-store", action="store_true")
    parser.add_argument("--probe-rss", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_rss:
        print(json.dumps(probe_rss(args.checkpoint, args.probe_rss, args.rss_tokens)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"decode", "kv", "kv_error", "rss", "offload"}
    if unknown:
        print(f"error: unknown part '{sorted(unknown)[0]}'; parts are decode, kv, kv_error, rss, offload",
              file=sys.stderr)
        return 2
    cpu = fingerprint_mod.cpu_info()
    flags = cpu.get("isa_flags", [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    print(f"machine: {cpu.get('model', '?')} ({isa}{', VNNI' if 'avx512_vnni' in flags or 'avx_vnni' in flags else ''}"
          f"{', BF16' if 'avx512_bf16' in flags else ''}) | torch {torch.__version__} | kernels "
          f"{torch.backends.cpu.get_cpu_capability()} | threads {torch.get_num_threads()} | "
          f"load average {os.getloadavg()[0]:.1f}")
    decode_rows = decode_part(args, [p.strip() for p in args.plans.split(";")]) if "decode" in parts else []
    kv_rows = kv_part(args) if "kv" in parts else []
    rss_rows = rss_part(args) if "rss" in parts else []
    offload_rows = offload_part(args) if "offload" in parts else []
    kv_error_rows = kv_error_part(args) if "kv_error" in parts else []
    if not args.no_store:
        print(f"\nresults: {store(args, decode_rows, kv_rows, rss_rows, offload_rows, kv_error_rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
