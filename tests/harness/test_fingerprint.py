"""The fingerprint id: identical on the same machine, different when the driver or torch changes, and
unmoved by volatile readings (temperature, free memory, clocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import torch

from harness import fingerprint


class FakeNVML:
    """Just enough of pynvml for one GPU; ``driver`` and the volatile readings are set per instance."""

    NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 2, 0

    def __init__(self, driver="550.54", temperature=40, used=1 << 30, fail_init=False):
        self.driver, self.temperature, self.used, self.fail_init = driver, temperature, used, fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetNVMLVersion(self):
        return "12." + self.driver

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA GeForce MX250"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=2 << 30, used=self.used, free=(2 << 30) - self.used)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (6, 1)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self.temperature

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1000 + self.temperature

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=1, usedGpuMemory=self.used)]

    def __getattr__(self, name):  # every other query: "not supported" on this GPU
        if name.startswith("nvml"):
            def unsupported(*args):
                raise RuntimeError("Not Supported")
            return unsupported
        raise AttributeError(name)


def torch_with_version(version: str):
    """torch, except for the version string it reports."""
    return SimpleNamespace(__version__=version, version=torch.version, cuda=torch.cuda, backends=torch.backends,
                           get_num_threads=torch.get_num_threads)


def test_same_machine_twice_gives_the_same_id():
    first, second = fingerprint.collect(), fingerprint.collect()
    assert first["id"] == second["id"]
    assert len(first["id"]) == 16
    assert first["stable"]["software"]["torch"] == torch.__version__


def test_a_changed_driver_changes_the_id_volatile_readings_do_not(monkeypatch):
    monkeypatch.setattr(fingerprint, "cpu_info", lambda: {"model": "test cpu", "isa_flags": ["avx2"]})
    base = fingerprint.collect(nvml=FakeNVML())
    hot = fingerprint.collect(nvml=FakeNVML(temperature=83, used=1900 << 20))
    new_driver = fingerprint.collect(nvml=FakeNVML(driver="535.183"))
    assert base["stable"]["gpus"][0]["compute_capability"] == "6.1"
    assert base["id"] == hot["id"]
    assert base["volatile"]["gpus"][0]["temperature_c"] != hot["volatile"]["gpus"][0]["temperature_c"]
    assert new_driver["id"] != base["id"]


def test_a_changed_torch_version_changes_the_id(monkeypatch):
    monkeypatch.setattr(fingerprint, "cpu_info", lambda: {"model": "test cpu", "isa_flags": ["avx2"]})
    ours = fingerprint.collect(nvml=FakeNVML())
    other = fingerprint.collect(nvml=FakeNVML(), torch_module=torch_with_version("2.7.1+cu126"))
    assert other["stable"]["software"]["torch"] == "2.7.1+cu126"
    assert ours["id"] != other["id"]


def test_no_nvml_is_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(fingerprint, "cpu_info", lambda: {"model": "test cpu", "isa_flags": []})
    fp = fingerprint.collect(nvml=FakeNVML(fail_init=True))
    assert fp["stable"]["gpus"] == []
    assert "NVML Shared Library Not Found" in fp["notes"]["nvml"]


def test_git_state_is_recorded_outside_the_stable_tier():
    fp = fingerprint.collect()
    assert set(fp["git"]) >= {"sha", "dirty"}
    assert "git" not in json.dumps(fp["stable"])


def test_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "harness", "fingerprint"], capture_output=True, text=True, check=True)
    fp = json.loads(out.stdout)
    assert fp["id"] == fingerprint.fingerprint_id(fp["stable"])
