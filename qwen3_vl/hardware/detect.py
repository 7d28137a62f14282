"""What machine is this: CPU model, ISA, cores, RAM, and each CUDA GPU's capability and memory.

Only the standard library and torch: the runtime must not depend on the harness extras
(py-cpuinfo, psutil, pynvml); the harness fingerprint records more detail.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

# ISA flags that change which kernels are fast (from /proc/cpuinfo names).
_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int


@dataclass(frozen=True)
class Machine:
    cpu_name: str
    cpu_flags: frozenset[str]
    physical_cores: int
    logical_cores: int
    ram_bytes: int
    gpus: tuple[Gpu, ...]

    @property
    def isa(self) -> str:
        """The widest x86 vector ISA PyTorch can use here: "avx512", "avx2" or "default"."""
        if "avx512f" in self.cpu_flags and "avx512bw" in self.cpu_flags:
            return "avx512"
        if "avx2" in self.cpu_flags and "fma" in self.cpu_flags:
            return "avx2"
        return "default"

    def gpu(self, index: int) -> Gpu | None:
        return next((g for g in self.gpus if g.index == index), None)


def _cpuinfo() -> tuple[str, frozenset[str], int]:
    """(model name, flags, physical cores) from /proc/cpuinfo; empty values where unavailable."""
    name, flags, cores = "", set(), set()
    try:
        with open("/proc/cpuinfo") as f:
            physical_id = core_id = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not name:
                    name = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "physical id":
                    physical_id = value
                elif key == "core id":
                    core_id = value
                    cores.add((physical_id, core_id))
    except OSError:
        pass
    return name, frozenset(f for f in _FLAGS if f in flags), len(cores)


def _flags_from_torch() -> frozenset[str]:
    """Fallback where /proc/cpuinfo is missing: the ISA PyTorch's kernels were dispatched to."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if capability.startswith("avx512"):
        return frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw"})
    if capability.startswith("avx2"):
        return frozenset({"avx", "avx2", "fma"})
    return frozenset()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_gpus() -> tuple[Gpu, ...]:
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(i, props.name, (props.major, props.minor), props.total_memory))
    return tuple(gpus)


def detect_machine() -> Machine:
    name, flags, physical = _cpuinfo()
    logical = os.cpu_count() or 1
    return Machine(
        cpu_name=name or platform.processor() or platform.machine(),
        cpu_flags=flags or _flags_from_torch(),
        physical_cores=physical or logical,
        logical_cores=logical,
        ram_bytes=_ram_bytes(),
        gpus=detect_gpus(),
    )
