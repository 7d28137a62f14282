"""Peak memory of one call, measured: process RSS, torch's CUDA allocator, and NVML.

- Process RSS: on Linux the kernel's own high-water mark (VmHWM) is reset before the call (writing
  5 to /proc/self/clear_refs) and read after it, so nothing between samples is missed; elsewhere a
  thread samples RSS every millisecond.
- CUDA (torch): peak allocated and reserved bytes over the call (peak stats reset first).
- NVML: the device's used memory and this process's used memory, sampled every 2 ms. A process can
  appear in both NVML's compute and graphics lists; it is counted once (optimum-benchmark and others
  double-counted it). Torch and NVML may number GPUs differently, so the NVML device is found by the
  PCI bus id torch reports, not by index.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from harness.results import Measurement

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Calls ``read()`` every ``interval`` seconds on a thread and keeps the maximum."""

    def __init__(self, read: Callable[[], int | None], interval: float) -> None:
        self.read, self.interval, self.peak = read, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            value = self.read()
            if value is not None:
                self.peak = max(self.peak, value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        value = self.read()
        if value is not None:
            self.peak = max(self.peak, value)


# ---------------------------------------------------------------------------------------------
# NVML


def process_used_bytes(nvml: Any, handle: Any, pid: int) -> int | None:
    """This process's used memory on one GPU; a pid listed as both compute and graphics counts once."""
    used: dict[int, int] = {}
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, query)(handle)
        except Exception:
            continue
        for p in procs:
            if p.usedGpuMemory is not None:
                used[p.pid] = max(used.get(p.pid, 0), int(p.usedGpuMemory))
    return used.get(pid)


def torch_bus_id(index: int) -> str | None:
    """PCI bus id of torch's CUDA device ``index`` in NVML's format (domain:bus:device.function)."""
    props = torch.cuda.get_device_properties(index)
    if not all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        return None
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def nvml_handle(nvml: Any, index: int) -> Any:
    """NVML's handle for torch's device ``index``, matched by PCI bus id. Without a bus id from torch only
    a machine with exactly one GPU can be matched safely (NVML and CUDA may order GPUs differently)."""
    bus = torch_bus_id(index)
    if bus is not None:
        return nvml.nvmlDeviceGetHandleByPciBusId(bus)
    if nvml.nvmlDeviceGetCount() == 1 and torch.cuda.device_count() == 1:
        return nvml.nvmlDeviceGetHandleByIndex(0)
    raise ValueError("torch reports no PCI bus id and there are several GPUs: cannot match NVML's device")


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def nvml_process_used(index: int) -> int | None:
    """This process's memory on torch's CUDA device ``index`` right now, per NVML (None without it)."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return process_used_bytes(nvml, nvml_handle(nvml, index), os.getpid())
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


# ---------------------------------------------------------------------------------------------


def peak(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, list[Measurement]]:
    """Run ``fn()`` once; return its result and the memory it took (every figure measured)."""
    device = torch.device(device)
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    cuda = device.type == "cuda"
    nvml = handle = None
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
        base_alloc = torch.cuda.memory_allocated(index)
        nvml = _nvml()
        if nvml is not None:
            try:
                handle = nvml_handle(nvml, index)
            except Exception:
                handle = None
    exact_rss = _reset_hwm() and _vm_hwm() is not None
    pid = os.getpid()
    samplers = []
    if not exact_rss:
        samplers.append(("rss", _Sampler(lambda: proc.memory_info().rss, 0.001)))
    if handle is not None:
        samplers.append(("nvml_process", _Sampler(lambda: process_used_bytes(nvml, handle, pid), 0.002)))
        samplers.append(("nvml_device", _Sampler(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used, 0.002)))
    for _, s in samplers:
        s.__enter__()
    try:
        result = fn()
        if cuda:
            torch.cuda.synchronize(index)
    finally:
        for _, s in samplers:
            s.__exit__(None, None, None)
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()  # balances the nvmlInit of _nvml(), also when fn raised
    peaks = {name: s.peak for name, s in samplers}
    rss_peak = _vm_hwm() if exact_rss else peaks["rss"]
    out = [
        Measurement("rss_peak", rss_peak, "B", better="lower"),
        Measurement("rss_increase", max(0, rss_peak - base_rss), "B", better="lower"),
    ]
    if cuda:
        out += [
            Measurement("cuda_allocated_peak", torch.cuda.max_memory_allocated(index), "B", better="lower"),
            Measurement("cuda_allocated_increase", torch.cuda.max_memory_allocated(index) - base_alloc, "B",
                        better="lower"),
            Measurement("cuda_reserved_peak", torch.cuda.max_memory_reserved(index), "B", better="lower"),
        ]
        if handle is not None:
            out += [
                Measurement("nvml_process_used_peak", peaks["nvml_process"], "B", better="lower"),
                Measurement("nvml_device_used_peak", peaks["nvml_device"], "B", better="lower"),
            ]
        else:
            out.append(Measurement("nvml_process_used_peak", None, "B", status="skipped",
                                   error="NVML unavailable or the GPU could not be matched by PCI bus id"))
    return result, out
