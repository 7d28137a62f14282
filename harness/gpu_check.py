"""``python -m harness.gpu_check``: the harness's GPU paths checked on a real GPU, then every variant timed.

The CPU-only CI cannot exercise what only a GPU has, so this runs once on a GPU machine:

1. the fingerprint sees the GPU through NVML and torch (name, compute capability, driver, CUDA);
2. torch's device is found in NVML by PCI bus id, and NVML's per-process memory is non-zero;
3. ``memory.peak`` sees a 256 MiB CUDA allocation in torch's allocator and in NVML;
4. ``timing.Clock`` on CUDA (events) agrees with the wall clock on a synchronised GPU sleep;
5. ``validate --device cuda`` on the pairwise matrix in fp32 and fp16 (option contracts, then as many of
   the pairwise combinations as ``--budget-s`` allows: accuracy, latency interleaved with the reference,
   memory), results stored.

Exit 0 when every check passed and both validate runs exited 0; otherwise 1 (2: no GPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--budget-s", default="200", help="per validate run; two runs, so the script fits in 10 min")
    parser.add_argument("--skip-validate", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("harness: error: no CUDA device visible to torch", file=sys.stderr)
        return 2

    from harness import fingerprint, memory, timing

    ok = True
    fp = fingerprint.collect()
    gpus, visible = fp["stable"]["gpus"], fp["stable"]["torch_gpus"]
    ok &= check("fingerprint: NVML lists the GPU", bool(gpus), str(gpus[:1] or fp["notes"]))
    ok &= check("fingerprint: torch lists the GPU", bool(visible), str(visible[:1]))
    ok &= check("fingerprint: driver and CUDA recorded", bool(fp["stable"]["gpu_system"].get("driver"))
                and bool(fp["stable"]["software"]["torch_cuda"]), str(fp["stable"]["gpu_system"]))
    print(f"     fingerprint id {fp['id']}")

    nvml = memory._nvml()
    handle = None
    if nvml is not None:
        try:
            handle = memory.nvml_handle(nvml, 0)
            name = nvml.nvmlDeviceGetName(handle)
            ok &= check("NVML device matched by PCI bus id", memory.torch_bus_id(0) is not None,
                        f"{memory.torch_bus_id(0)} -> {name}")
        except Exception as exc:
            ok &= check("NVML device matched by PCI bus id", False, repr(exc))
    else:
        ok &= check("NVML importable and initialised", False)

    mib = 256
    _, measured = memory.peak(lambda: torch.ones(mib * 2**18, device="cuda").sum().item(), "cuda:0")
    figures = {m.metric: m.value for m in measured}
    ok &= check("memory.peak: torch allocator saw the allocation",
                (figures.get("cuda_allocated_increase") or 0) >= mib * 2**20, f"{figures}")
    if handle is not None:
        ok &= check("memory.peak: NVML process memory sampled", (figures.get("nvml_process_used_peak") or 0) > 0,
                    f"{figures.get('nvml_process_used_peak')} B")

    clock = timing.Clock("cuda:0")
    a = torch.randn(2048, 2048, device="cuda")
    (a @ a).sum().item()  # warm-up: cuBLAS handles, kernels loaded
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with clock():
        for _ in range(20):  # GPU-bound work: the events should see nearly all of the wall time
            a = a @ a / 2048**0.5
    wall = time.perf_counter() - t0
    event = clock.samples[0]
    ok &= check("timing.Clock: CUDA events agree with the wall clock", 0.5 * wall <= event <= 1.1 * wall + 1e-3,
                f"events {event * 1e3:.2f} ms, wall {wall * 1e3:.2f} ms")

    if not args.skip_validate:
        for dtype in ("fp32", "fp16"):
            cmd = [sys.executable, "-m", "harness", "validate", "--preset", args.preset, "--device", "cuda",
                   "--dtype", dtype, "--mode", "pairwise", "--suites", "numerics,latency,memory",
                   "--results-dir", args.results_dir, "--budget-s", args.budget_s]
            print("$ " + " ".join(cmd), flush=True)
            started = time.perf_counter()
            code = subprocess.run(cmd).returncode
            ok &= check(f"validate --device cuda --dtype {dtype}", code == 0,
                        f"exit {code} after {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
