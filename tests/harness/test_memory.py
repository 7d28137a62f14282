"""Peak memory is measured (not computed): an allocation inside the call shows up; NVML's process
lists are de-duplicated."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from harness import memory


def _allocate(mib: int):
    x = torch.ones(mib * 2**18)  # fp32: 4 bytes each
    time.sleep(0.02)  # long enough for the sampling fallback to see it
    return float(x[0])


def test_an_allocation_shows_in_the_peak():
    result, measured = memory.peak(lambda: _allocate(64))
    figures = {m.metric: m.value for m in measured}
    assert result == 1.0
    assert figures["rss_increase"] >= 60 * 2**20
    assert figures["rss_peak"] >= figures["rss_increase"]


def test_sampling_fallback_when_the_kernel_peak_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    _, measured = memory.peak(lambda: _allocate(64))
    assert {m.metric: m.value for m in measured}["rss_increase"] >= 60 * 2**20


def test_nvml_process_memory_counts_a_pid_once():
    class FakeNVML:
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            return [SimpleNamespace(pid=7, usedGpuMemory=300), SimpleNamespace(pid=8, usedGpuMemory=50)]

        def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
            return [SimpleNamespace(pid=7, usedGpuMemory=300)]  # the same process, listed again

    assert memory.process_used_bytes(FakeNVML(), None, 7) == 300
    assert memory.process_used_bytes(FakeNVML(), None, 9) is None
