"""Detection, profile choice, plan="auto" and emulation (CUDA side effects checked against a
recording stand-in for torch.cuda, since CI has no GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qwen3_vl
from qwen3_vl.hardware import emulate
from qwen3_vl.hardware.auto import choose
from qwen3_vl.hardware.detect import Machine, detect_machine
from qwen3_vl.hardware.profiles import PROFILES, auto_plan, get_profile, profile_for
from qwen3_vl.optim import registry
from qwen3_vl.optim.plan import Target

LAPTOP_CPU = Machine("Intel(R) Core(TM) i5-10210U", frozenset({"avx", "avx2", "fma", "f16c"}), 4, 8, 16 << 30, ())
SERVER_CPU = dataclasses.replace(LAPTOP_CPU, cpu_name="Xeon", cpu_flags=frozenset({"avx2", "fma", "avx512f",
                                                                                   "avx512bw"}))
OLD_CPU = dataclasses.replace(LAPTOP_CPU, cpu_name="Atom", cpu_flags=frozenset({"avx"}))


def test_detect_machine_is_sane():
    machine = detect_machine()
    assert machine.logical_cores >= 1 and machine.physical_cores >= 1
    assert machine.isa in ("avx512", "avx2", "default")
    assert machine.ram_bytes > 0
    assert len(machine.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.parametrize(("machine", "target", "expected"), [
    (LAPTOP_CPU, Target(), "cpu-avx2"),
    (SERVER_CPU, Target(), "cpu-avx512"),
    (OLD_CPU, Target(), "cpu-avx2"),
    (LAPTOP_CPU, Target("cuda:0", "fp16", (6, 1), "GeForce GTX 1060"), "sm61-laptop"),
    (LAPTOP_CPU, Target("cuda:0", "fp16", (5, 2), "GeForce GTX 960"), "sm61-laptop"),
    (LAPTOP_CPU, Target("cuda:0", "fp16", (7, 5), "Tesla T4"), "cuda-sm70"),
    (LAPTOP_CPU, Target("cuda:0", "bf16", (8, 6), "RTX 3060"), "cuda-sm80plus"),
    (LAPTOP_CPU, Target("cuda:0", "bf16", (9, 0), "H100"), "cuda-sm80plus"),
])
def test_profile_for(machine, target, expected):
    profile, reason = profile_for(machine, target)
    assert profile.name == expected and reason


def test_profiles_are_consistent():
    for profile in PROFILES.values():
        assert profile.dtype in ("fp32", "fp16", "bf16")
        if not profile.allow_bf16:
            assert profile.dtype != "bf16"
        assert "math" in profile.sdpa_backends
        for axis, names in profile.preferred.items():
            assert axis in registry.AXES
            for name in names:  # preferences are exact options (approximate ones are opt-in by name)
                opt = dict((o.name, o) for o in registry.options(axis)).get(name)
                assert opt is None or opt.exact, f"{profile.name} prefers approximate {axis}={name}"
        for axis in ("attention", "rope"):  # this axes: every preference is registered
            assert all(dict((o.name, o) for o in registry.options(axis)).get(n) for n in profile.preferred[axis])
    assert get_profile("sm61-laptop").dtype == "fp16"  # Pascal: fp16 storage, fp32 compute
    assert get_profile("sm61-laptop").sdpa_backends == ("efficient", "math")
    with pytest.raises(ValueError, match="profiles are"):
        get_profile("sm99")


def test_auto_plan_for_pascal_prefers_sdpa_with_pascal_tiles():
    target = Target("cuda", "fp16", (6, 1), "fake GTX 1060", emulated_profile=None)
    plan, skipped = auto_plan(get_profile("sm61-laptop"), target)
    assert plan["attention"].name == "sdpa"
    assert plan["rope"].name == "cached"
    for fb in skipped:  # anything skipped says why
        assert fb.reason.startswith("profile sm61-laptop: ")


def test_auto_plan_passes_profile_tiles_to_tiled():
    profile = dataclasses.replace(get_profile("sm61-laptop"), preferred={"attention": ("tiled",)})
    plan, _ = auto_plan(profile, Target("cuda", "fp16", (6, 1)))
    assert plan["attention"].kwargs == {"block_q": 64, "block_k": 64, "block_k_decode": 256}


def test_auto_plan_records_each_skipped_preference():
    profile = dataclasses.replace(get_profile("cpu-avx2"), preferred={"attention": ("no_such_kernel", "sdpa")})
    plan, skipped = auto_plan(profile, Target())
    assert plan["attention"].name == "sdpa"
    assert [(fb.axis, fb.requested, fb.used) for fb in skipped if fb.axis == "attention"] == [
        ("attention", "no_such_kernel", "sdpa")]
    assert "not registered" in skipped[0].reason


def test_device_auto_takes_the_gpu_when_there_is_one():
    assert choose("auto", "fp32").target.device_type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_plan_auto_builds_and_reports():
    model = qwen3_vl.from_pretrained("tiny", plan="auto", dtype="auto", device="cpu")
    assert model.hardware.profile is not None
    if model.hardware.plan_source.startswith("profile"):  # else: this machine's stored measurements chose
        assert model.plan["attention"].name == model.hardware.profile.preferred["attention"][0]
    assert "profile:" in model.hardware.report()
    ids = torch.randint(0, 900, (1, 9), generator=torch.Generator().manual_seed(0))
    reference = qwen3_vl.from_pretrained("tiny")
    assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=[]),
                       reference.generate(ids, max_new_tokens=8, eos_token_id=[]))  # auto plans are exact


def test_choose_with_explicit_plan_leaves_it_alone():
    choice = choose("cpu", "fp32", "attention=tiled")
    assert choice.plan is None and choice.profile is None


# ---------------------------------------------------------------------------------------------
# Emulation


def test_emulation_needs_a_suitable_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        qwen3_vl.from_pretrained("tiny", emulate="sm61-laptop")
    with pytest.raises(ValueError, match="weaker GPU"):
        emulate.check(get_profile("cuda-sm80plus"), Target("cuda", "bf16", (7, 0)))
    with pytest.raises(ValueError, match="no bf16"):
        emulate.check(get_profile("sm61-laptop"), Target("cuda", "bf16", (9, 0)))
    with pytest.raises(ValueError, match="CPU profile"):
        emulate.check(get_profile("cpu-avx2"), Target("cuda", "fp32", (9, 0)))


def test_emulated_target_reports_the_profile_capability():
    target = emulate.emulated_target(get_profile("sm61-laptop"), Target("cuda:0", "fp16", (9, 0), "H100"))
    assert target.compute_capability == (6, 1)
    assert target.emulated_profile == "sm61-laptop"
    assert "emulating sm61-laptop" in target.device_name
    # Options then see Pascal: flash_kv unavailable, SDPA limited to the profile's kernels.
    from qwen3_vl.optim.attention.sdpa import candidate_backends

    assert "compute capability >= 8.0" in registry.get("attention", "flash_kv").unavailable(target)
    assert candidate_backends(target)[0] == ["efficient", "math"]


class FakeCuda:
    """Records what emulation asks of torch.cuda."""

    def __init__(self):
        self.fraction = None

    def get_device_properties(self, index):
        return type("Props", (), {"total_memory": 80 << 30})()

    def set_per_process_memory_fraction(self, fraction, index):
        self.fraction = (fraction, index)


def test_emulation_caps_memory_and_turns_off_tf32_and_kernels(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake.get_device_properties)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fake.set_per_process_memory_fraction)
    switches = {}
    for name in ("flash", "mem_efficient", "cudnn", "math"):
        monkeypatch.setattr(torch.backends.cuda, f"enable_{name}_sdp",
                            lambda on, name=name: switches.__setitem__(name, on))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads()
    try:
        done = emulate.apply(get_profile("sm61-laptop"), Target("cuda:0", "fp16", (6, 1), emulated_profile="x"))
        assert fake.fraction == (4 / 80, 0)  # 4 GiB of an 80 GiB card
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert switches == {"flash": False, "mem_efficient": True, "cudnn": False, "math": True}
        assert any("4.0 GiB" in line for line in done)
    finally:
        emulate.restore()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads()) == before
    assert fake.fraction == (1.0, 0)


def test_cpu_profile_emulation_limits_threads():
    threads = torch.get_num_threads()
    profile = dataclasses.replace(get_profile("cpu-avx2"), threads=1)
    try:
        model = qwen3_vl.from_pretrained("tiny", emulate=profile, plan="auto")
        assert torch.get_num_threads() == 1
        assert model.target.emulated_profile == "cpu-avx2"
        assert model.hardware.profile.name == "cpu-avx2"
    finally:
        emulate.restore()
    assert torch.get_num_threads() == threads
