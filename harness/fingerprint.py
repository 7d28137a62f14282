"""Hardware/software fingerprint: a stable id for "results from this kind of machine are comparable".

Two tiers, because every earlier tool got one of them wrong (pytest-benchmark split history on CPU
frequency jitter, conbench merged different machines):

- ``stable`` (hashed into the id): CPU model, ISA flags that matter, cores/threads, RAM (rounded to
  GiB), each GPU's model, compute capability, memory, driver and NVML/CUDA versions, the OS, Python,
  torch/CUDA/cuDNN versions, installed kernel packages, torch's thread count.
- ``volatile`` (recorded, never hashed): clocks, temperatures, free memory, load, other GPU processes,
  kernel release, hostname. The gate can read them to call a comparison inconclusive.

The project's git sha and dirty flag are recorded beside both (code is not hardware). Missing GPU,
NVML or git are recorded with the reason, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

ISA_FLAG = re.compile(r"^(avx|avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*|avxvnni.*|sse4_2|asimd.*|neon|sve.*)$")
# Packages whose presence or version changes which options can run or how fast.
KERNEL_PACKAGES = ("triton", "flash-attn", "bitsandbytes", "xformers")
REPO_ROOT = Path(__file__).resolve().parent.parent


def fingerprint_id(stable: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the stable tier, first 16 hex digits."""
    canonical = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# CPU and memory


def cpu_info() -> dict[str, Any]:
    """CPU model and flags from py-cpuinfo (falls back to ``platform`` when it cannot run)."""
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
    except Exception as exc:  # py-cpuinfo can fail in odd sandboxes; record why
        return {"model": platform.processor() or platform.machine(), "arch": platform.machine(), "isa_flags": [],
                "note": f"py-cpuinfo failed: {type(exc).__name__}: {exc}"}
    flags = sorted(f for f in info.get("flags", []) if ISA_FLAG.match(f))
    return {
        "model": info.get("brand_raw") or platform.processor(),
        "arch": info.get("arch_string_raw") or platform.machine(),
        "vendor": info.get("vendor_id_raw", ""),
        "isa_flags": flags,
    }


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_gib() -> int:
    """Total RAM rounded to whole GiB: the exact byte count moves between boots of the same VM."""
    return round(psutil.virtual_memory().total / 2**30)


# ---------------------------------------------------------------------------------------------
# GPUs


def _nvml_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus(nvml: Any = None) -> tuple[list[dict], list[dict], dict[str, Any], str | None]:
    """(stable per-GPU fields, volatile per-GPU fields, system versions, reason when NVML is unusable)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            return [], [], {}, f"pynvml not importable: {exc}"
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return [], [], {}, f"NVML unavailable: {type(exc).__name__}: {exc}"

    def opt(fn, *args):
        try:
            return fn(*args)
        except Exception:
            return None

    try:
        system = {
            "driver": _nvml_str(nvml.nvmlSystemGetDriverVersion()),
            "nvml": _nvml_str(opt(nvml.nvmlSystemGetNVMLVersion)),
            "cuda_driver": opt(nvml.nvmlSystemGetCudaDriverVersion_v2) or opt(nvml.nvmlSystemGetCudaDriverVersion),
        }
        stable, volatile = [], []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            cc = opt(nvml.nvmlDeviceGetCudaComputeCapability, h)
            mig = opt(nvml.nvmlDeviceGetMigMode, h)
            stable.append({
                "name": _nvml_str(nvml.nvmlDeviceGetName(h)),
                "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
                "memory_mib": mem.total // 2**20,
                "pcie_max_gen": opt(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                "pcie_max_width": opt(nvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                "power_default_limit_w": (lambda mw: None if mw is None else mw // 1000)(
                    opt(nvml.nvmlDeviceGetPowerManagementDefaultLimit, h)),
                "mig_mode": None if mig is None else mig[0],
            })
            pci = opt(nvml.nvmlDeviceGetPciInfo, h)
            clocks = {name: opt(nvml.nvmlDeviceGetClockInfo, h, getattr(nvml, f"NVML_CLOCK_{name.upper()}"))
                      for name in ("graphics", "sm", "mem")}
            volatile.append({
                "index": i,
                "pci_bus_id": None if pci is None else _nvml_str(pci.busId),
                "memory_used_mib": mem.used // 2**20,
                "memory_free_mib": mem.free // 2**20,
                "temperature_c": opt(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU),
                "clocks_mhz": clocks,
                "power_limit_w": (lambda mw: None if mw is None else mw // 1000)(
                    opt(nvml.nvmlDeviceGetEnforcedPowerLimit, h)),
                "throttle_reasons": opt(nvml.nvmlDeviceGetCurrentClocksEventReasons, h),
                "pcie_gen": opt(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
                "pcie_width": opt(nvml.nvmlDeviceGetCurrPcieLinkWidth, h),
                "other_processes": len({p.pid for p in (opt(nvml.nvmlDeviceGetComputeRunningProcesses, h) or [])}
                                       | {p.pid for p in (opt(nvml.nvmlDeviceGetGraphicsRunningProcesses, h) or [])}),
            })
        return stable, volatile, system, None
    except Exception as exc:
        return [], [], {}, f"NVML query failed: {type(exc).__name__}: {exc}"
    finally:
        opt(nvml.nvmlShutdown)


def torch_gpus(torch_module: Any = None) -> tuple[list[dict], str | None]:
    """What torch sees (its numbering can differ from NVML's; the PCI bus id ties them)."""
    torch = torch_module
    if torch is None:
        import torch
    if torch.version.cuda is None:
        return [], f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return [], "torch sees no CUDA device"
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({
            "name": p.name,
            "compute_capability": f"{p.major}.{p.minor}",
            "memory_mib": p.total_memory // 2**20,
            "multiprocessors": p.multi_processor_count,
        })
    return out, None


# ---------------------------------------------------------------------------------------------
# Software and git


def software(torch_module: Any = None) -> dict[str, Any]:
    torch = torch_module
    if torch is None:
        import torch
    try:
        os_release = platform.freedesktop_os_release()
        distro = f"{os_release.get('ID', '')} {os_release.get('VERSION_ID', '')}".strip()
    except (OSError, AttributeError):
        distro = ""
    cudnn = None
    if torch.version.cuda is not None:
        try:
            cudnn = torch.backends.cudnn.version()
        except Exception:
            cudnn = None
    kernels = {}
    for name in KERNEL_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            kernels[name] = importlib.metadata.version(name)
    return {
        "os": platform.system(),
        "distro": distro,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "torch_threads": torch.get_num_threads(),
        "kernel_packages": kernels,
    }


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit sha and dirty flag (tracked files changed) of the project checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"sha": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"sha": "unknown", "dirty": False, "note": f"git unavailable: {type(exc).__name__}"}


# ---------------------------------------------------------------------------------------------


def collect(nvml: Any = None, torch_module: Any = None) -> dict[str, Any]:
    """The full fingerprint: ``{"id", "stable", "volatile", "git", "notes", "collected_at"}``.

    ``nvml``/``torch_module`` can be injected (tests simulate GPUs and missing libraries with them).
    """
    notes = {}
    nvml_stable, nvml_volatile, nvml_system, nvml_reason = nvml_gpus(nvml)
    torch_visible, torch_reason = torch_gpus(torch_module)
    if nvml_reason:
        notes["nvml"] = nvml_reason
    if torch_reason:
        notes["torch_cuda"] = torch_reason
    cpu = cpu_info()
    if "note" in cpu:
        notes["cpu"] = cpu.pop("note")
    stable = {
        "cpu": {**cpu, "physical_cores": psutil.cpu_count(logical=False), "threads": psutil.cpu_count(),
                "usable_cpus": usable_cpus()},
        "memory_gib": memory_gib(),
        "gpus": nvml_stable,
        "gpu_system": nvml_system,
        "torch_gpus": torch_visible,
        "software": software(torch_module),
    }
    freq = psutil.cpu_freq()
    vm = psutil.virtual_memory()
    volatile = {
        "hostname": platform.node(),
        "kernel_release": platform.release(),
        "cpu_mhz": None if freq is None else round(freq.current),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "memory_available_mib": vm.available // 2**20,
        "gpus": nvml_volatile,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "python_executable": sys.executable,
    }
    return {
        "id": fingerprint_id(stable),
        "stable": stable,
        "volatile": volatile,
        "git": git_state(),
        "notes": notes,
        "collected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

