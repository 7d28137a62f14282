"""Attention benchmark: every registered attention option against eager, at the op level, on a real
model's shapes (default ``2b``: text 16 query / 8 KV heads of 128, ViT 16 heads of 64).

Cases: ``vision`` (one image's ViT attention, 4096 patches = a 1024-token image), ``prefill256``,
``prefill1024``, ``prefill4096`` (causal, one sequence), ``decode1024`` and ``decode4096`` (one new
query against a KV cache of that many tokens). Per case every option is timed in interleaved rounds
with eager (``harness.timing.interleaved``: one call each per round, order rotating, warm-up
excluded), its peak memory measured around one call (``harness.memory.peak``: on CUDA the
allocator's peak in this process; on CPU the RSS high-water mark of one call in a fresh process
per option, after a warm-up call, with glibc's mmap threshold fixed so that freed buffers leave
RSS: in one process the heap grown by one option hides the next one's), and its output checked against eager's
(exact options must agree; the sparse ones report their error). Results go to the results store
under this machine's fingerprint (suite ``attention_bench``), and a table is printed.

    python -m harness.bench_attention                       # CPU, fp32, every case
    python -m harness.bench_attention --device cuda --dtype bf16
    python -m harness.bench_attention --device cuda --dtype fp16 --emulate sm61-laptop

The sparse options use a parameter-free router / their static pattern at density 0.5 and block
64: the router's weights change which blocks are kept, not the cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from harness import fingerprint as fingerprint_mod
from harness import memory, results, timing
from qwen3_vl.config import preset
from qwen3_vl.hardware import emulate as emulation
from qwen3_vl.hardware.detect import detect_machine
from qwen3_vl.hardware.device import storage_and_compute, target_for
from qwen3_vl.hardware.profiles import get_profile, profile_for
from qwen3_vl.model.text import AttentionMask
from qwen3_vl.optim import registry
from qwen3_vl.optim.attention.dynamic_sparse import DynamicSparseAttention, Router
from qwen3_vl.optim.plan import Choice, Fallback, failure_text, make_plan

CASES = ("vision", "prefill256", "prefill1024", "prefill4096", "decode1024", "decode4096")
SUITE = "attention_bench"


@dataclass
class Case:
    name: str
    kind: str  # "vision", "prefill" or "decode"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    cu_seqlens: torch.Tensor | None = None

    @property
    def flops(self) -> float:
        """Multiply-adds of QK^T and PV counted as 2 FLOPs each; causal prefill counts the lower half."""
        if self.kind == "vision":
            s, h, d = self.q.shape
            return 4.0 * h * s * s * d
        b, hq, lq, d = self.q.shape
        lk = self.k.shape[2]
        pairs = lq * lk - (lq * (lq - 1) / 2 if self.kind == "prefill" else 0)
        return 4.0 * b * hq * pairs * d

    @property
    def kv_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def run(self, attention) -> torch.Tensor:
        if self.kind == "vision":
            return attention.vision(self.q, self.k, self.v, self.cu_seqlens, self.scale)
        return attention.text(self.q, self.k, self.v, AttentionMask(None, True), self.scale)


def make_case(name: str, config, dtype: torch.dtype, device: str, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    t, v = config.text, config.vision
    if name == "vision":
        s = 4096
        qkv = torch.randn(s, 3, v.num_heads, v.head_dim, generator=gen).to(device, dtype)
        q, k, vv = qkv.unbind(1)
        cu = torch.tensor([0, s], dtype=torch.int32, device=device)
        return Case(name, "vision", q, k, vv, v.head_dim**-0.5, cu)
    kind, length = ("prefill", int(name[7:])) if name.startswith("prefill") else ("decode", int(name[6:]))
    lq = length if kind == "prefill" else 1

    def rand(h, n):  # [B, H, L, d] as a transposed view of [B, L, H, d], like the model's projections
        return torch.randn(1, n, h, t.head_dim, generator=gen).to(device, dtype).transpose(1, 2)

    q = rand(t.num_attention_heads, lq) * 2
    return Case(name, kind, q, rand(t.num_key_value_heads, length), rand(t.num_key_value_heads, length),
                t.head_dim**-0.5)


def runtimes(target, profile, config) -> dict[str, tuple[Choice, object, list[Fallback]]]:
    """Every registered attention option built for ``target`` (profile tile sizes where it sets them)."""
    out = {}
    t = config.text
    for opt in registry.options("attention"):
        params = profile.option_params("attention", opt.name)
        choice = Choice(opt.name, tuple(sorted(params.items())))
        reason = opt.unavailable(target)
        if reason:
            out[opt.name] = (choice, None, [Fallback("attention", opt.name, "-", reason)])
            continue
        if opt.name == "dynamic_sparse":  # op level: no model to calibrate on; cost does not depend on weights
            router = Router.parameter_free(1, t.num_key_value_heads, t.head_dim, opt.defaults["block"])
            runtime = DynamicSparseAttention(target, router, opt.defaults["density"], opt.defaults["sink_blocks"])
        else:
            runtime = opt.build(None, target, **params)
        out[opt.name] = (choice, runtime, [])
    return out


def _describe(runtime) -> str:
    if not hasattr(runtime, "describe"):
        return ""
    info = runtime.describe()
    keep = {k: info[k] for k in ("ran", "kept_fraction", "dense_calls") if k in info}
    return json.dumps(keep, sort_keys=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_case(case: Case, built: dict, rounds: int, warmup: int, device: str, exact_tol: float) -> list[dict]:
    """Accuracy, interleaved timing and peak memory of every option on one case."""
    outputs: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, (_choice, runtime, _fallbacks) in built.items():
        if runtime is None:
            continue
        try:
            outputs[name] = case.run(runtime).float()
        except Exception as exc:  # one failing option (e.g. out of memory) never stops the benchmark
            info[name] = {"error": failure_text(exc)}
            _free(device)
    # The reference output is eager's; if eager itself failed, the first exact option that ran.
    exact_ran = [n for n in outputs if registry.get("attention", n).exact]
    if not exact_ran:
        return [{"case": case.name, "option": str(built[n][0]), "exact": registry.get("attention", n).exact,
                 "fallbacks": built[n][2], "error": info.get(n, {}).get("error", "no exact option ran")}
                for n in built if built[n][1] is not None]
    ref_out = outputs["eager" if "eager" in outputs else exact_ran[0]]
    targets = {}
    for name, out in outputs.items():
        info[name] = {"rel_err": ((out - ref_out).abs().max() / ref_out.abs().max()).item()}
        targets[name] = lambda clock, runtime=built[name][1]: _timed(case, runtime, clock, device)
    outputs.clear()
    timed = timing.interleaved(targets, rounds, warmup, device)
    for name, t in timed.items():
        info[name]["timed"] = t
    for name in targets:
        info[name]["describe"] = _describe(built[name][1])
        if info[name].get("timed") and info[name]["timed"].error:
            continue
        if device.startswith("cuda"):
            _sync(device)
            _, measured = memory.peak(lambda runtime=built[name][1]: case.run(runtime), device)
            info[name]["memory"] = {m.metric: m.value for m in measured}
        else:
            info[name]["memory"] = memory_in_fresh_process(case.name, name)
    base = info["eager"]["timed"].clock if "timed" in info.get("eager", {}) else None
    rows = []
    for name, entry in info.items():
        choice, _, fallbacks = built[name]
        opt = registry.get("attention", name)
        row = {"case": case.name, "option": str(choice), "exact": opt.exact, "fallbacks": fallbacks}
        if "error" in entry:
            row["error"] = entry["error"]
            rows.append(row)
            continue
        clock = entry["timed"].clock
        row.update(
            rel_err=entry["rel_err"],
            error=entry["timed"].error,
            samples=clock.samples,
            median_ms=statistics.median(clock.samples) * 1e3 if clock.samples else math.nan,
            ratio=_ratio(clock, base, name),
            memory=entry.get("memory", {}),
            describe=entry.get("describe", ""),
            exact_ok=(not opt.exact) or entry["rel_err"] <= exact_tol,
        )
        rows.append(row)
    return rows


_PROBE_ARGS: list[str] = []  # --preset/--dtype of this run, for the memory subprocesses


def memory_in_fresh_process(case: str, option: str) -> dict:
    """Peak RSS of one call of ``option`` on ``case``, measured in a new Python process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "harness.bench_attention", "--probe-memory", option, "--cases", case, *_PROBE_ARGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def probe_memory(option: str, case_name: str, target, profile, config) -> dict:
    """In the subprocess: a warm-up call, then one measured call."""
    built = runtimes(target, profile, config)
    runtime = built[option][1]
    case = make_case(case_name, config, storage_and_compute(target.dtype)[1], target.device)
    case.run(runtime)
    gc.collect()
    _, measured = memory.peak(lambda: case.run(runtime), target.device)
    return {m.metric: m.value for m in measured}


def _ratio(clock, base, name: str) -> float:
    if name == "eager":
        return 1.0
    ratios = timing.round_ratios(clock, base) if (base is not None and clock.samples) else []
    return statistics.median(ratios) if ratios else math.nan


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _timed(case: Case, runtime, clock, device: str) -> None:
    with clock():
        case.run(runtime)


def peak_bytes(row: dict, device: str) -> float | None:
    mem = row.get("memory", {})
    key = "cuda_allocated_increase" if device.startswith("cuda") else "rss_increase"
    value = mem.get(key)
    return value if isinstance(value, (int, float)) else None


def store(all_rows: list[dict], args, target, dtype_name: str) -> str:
    fp = fingerprint_mod.collect()
    git = fp.get("git", {})
    run = results.RunInfo(results.new_run_id(), fp["id"], args.preset, dtype_name, git.get("sha", "unknown"),
                          bool(git.get("dirty", False)))
    rows = []
    for r in all_rows:
        plan = make_plan(attention=r["option"])
        params = {"emulate": args.emulate or "", "rounds": args.rounds, "warmup": args.warmup,
                  "describe": r.get("describe", "")}
        repro = f"python -m harness.bench_attention --preset {args.preset} --device {args.device} " \
                f"--dtype {dtype_name} --cases {r['case']}" + (f" --emulate {args.emulate}" if args.emulate else "")
        out = []
        if "samples" not in r:
            out.append(results.failed("time", r["error"]))
        else:
            status = "ok" if not r["error"] else "failed"
            out.append(results.Measurement("time", statistics.median(r["samples"]) if r["samples"] else None, "s",
                                           r["samples"], status, r["error"], better="lower"))
            out.append(results.Measurement("ratio_to_eager", r["ratio"], "ratio", better="lower"))
            out.append(results.Measurement("rel_err_vs_eager", r["rel_err"], "ratio",
                                           status="ok" if r["exact_ok"] else "failed",
                                           error="" if r["exact_ok"] else "exact option disagrees with eager",
                                           better="lower"))
            for metric, value in r["memory"].items():
                if metric == "error":
                    out.append(results.failed("rss_increase", value))
                elif value is not None:
                    out.append(results.Measurement(metric, value, "B", better="lower"))
        for m in out:
            rows.append(results.make_row(run, target.device, SUITE, r["case"], m, plan, params, r["fallbacks"], repro))
    path = results.write_run(rows, args.results_dir, fp, run.run_id, axes=registry.AXES)
    return str(path)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--emulate", default=None, help="a hardware profile to emulate (e.g. sm61-laptop)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--options", default="", help="comma-separated attention options (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--no-store", action="store_true", help="print only, write no results")
    parser.add_argument("--probe-memory", metavar="OPTION", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    _PROBE_ARGS[:] = ["--preset", args.preset, "--dtype", args.dtype, "--device", args.device]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        print(f"error: unknown case '{bad[0]}'; cases are: {', '.join(CASES)}", file=sys.stderr)
        return 2
    try:
        config = preset(args.preset)
        target = target_for(args.device, args.dtype)
        if args.emulate:
            profile = get_profile(args.emulate)
            target = emulation.emulated_target(profile, target)
            applied = emulation.apply(profile, target)
        else:
            profile, _ = profile_for(detect_machine(), target)
            applied = []
        if not args.no_store:
            results.check_writable(args.results_dir)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    compute = storage_and_compute(target.dtype)[1]
    tol = 1e-5 if compute == torch.float32 else 2e-2
    if args.probe_memory:
        print(json.dumps(probe_memory(args.probe_memory, cases[0], target, profile, config)))
        return 0
    built = runtimes(target, profile, config)
    if args.options:
        wanted = {"eager", *[o.strip() for o in args.options.split(",")]}
        built = {k: v for k, v in built.items() if k in wanted}
    machine = detect_machine()
    threads = f"{machine.cpu_name} ({torch.get_num_threads()} threads)"
    where = target.device_name if target.device_type == "cuda" else threads
    print(f"attention benchmark: preset {args.preset}, {where}, compute {str(compute).replace('torch.', '')}, "
          f"profile {profile.name}, torch {torch.__version__}")
    for line in applied:
        print(f"  emulation: {line}")
    all_rows = [{"case": c, "option": str(choice), "exact": registry.get("attention", n).exact, "fallbacks": fbs,
                 "error": f"unavailable: {fbs[0].reason}"}
                for c in cases for n, (choice, runtime, fbs) in built.items() if runtime is None]
    started = time.perf_counter()
    for name in cases:
        case = make_case(name, config, compute, target.device)
        fresh = runtimes(target, profile, config)  # per case: the kernels-that-ran counters start at zero
        rows = bench_case(case, {k: fresh[k] for k in built}, args.rounds, args.warmup, target.device, tol)
        all_rows += rows
        best = min((r for r in rows if r.get("samples")), key=lambda r: r["median_ms"], default=None)
        floor = ""
        if best is not None:  # against the physical floor: FLOPs for prefill/ViT, bytes of K+V read for decode
            rate = (f"{case.kv_bytes / best['median_ms'] / 1e6:.2f} GB/s of K+V" if case.kind == "decode"
                    else f"{case.flops / best['median_ms'] / 1e6:.1f} GFLOP/s")
            floor = f"; fastest {best['option'].split('[')[0]} {best['median_ms']:.2f} ms = {rate}"
        print(f"\n{name}: {case.flops / 1e9:.2f} GFLOP, K+V {_fmt_bytes(case.kv_bytes)}{floor}")
        print(f"  {'option':58} {'median ms':>10} {'x eager':>8} {'peak mem':>10} {'rel err':>9}  kernels")
        for r in rows:
            if "samples" not in r:
                print(f"  {r['option']:58} failed: {r['error']}")
                continue
            flag = "" if r["exact_ok"] else "  <-- EXACT OPTION DISAGREES"
            print(f"  {r['option']:58} {r['median_ms']:10.2f} {r['ratio']:8.2f} "
                  f"{_fmt_bytes(peak_bytes(r, target.device)):>10} {r['rel_err']:9.1e}  {r['describe']}{flag}")
    for name, (_, runtime, fallbacks) in built.items():
        for fb in fallbacks:
            print(f"note: {name} not measured: {fb.reason}" if runtime is None else f"note: {name}: {fb.reason}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if not args.no_store:
        print(f"stored: {store(all_rows, args, target, target.dtype)}")
    if args.emulate:
        emulation.restore()
    return 1 if any(not r.get("exact_ok", True) for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
