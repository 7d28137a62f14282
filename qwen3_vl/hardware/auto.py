"""From what the caller asked (device, dtype, plan, emulate; any may be "auto") to the target a
model is built for, its hardware profile and, for ``plan="auto"``, the plan.

- ``device="auto"``: the first CUDA GPU when there is one, else the CPU.
- ``dtype="auto"``: the profile's dtype policy (Pascal: fp16 storage, fp32 compute).
- ``plan="auto"``: on CPU, the fastest exact plan stored for this machine's fingerprint when the
  results store has one (``measured.py``); otherwise ``profiles.auto_plan`` for the profile
  (skipped preferences recorded). ``HardwareChoice.plan_source`` says which path chose it, and why.
- ``emulate="sm61-laptop"`` (or a ``Profile``): that profile instead of the detected one, with its
  constraints applied (see ``emulate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen3_vl.hardware import emulate as emulation
from qwen3_vl.hardware.detect import detect_machine
from qwen3_vl.hardware.device import target_for
from qwen3_vl.hardware.measured import measured_plan
from qwen3_vl.hardware.profiles import Profile, auto_plan, get_profile, profile_for
from qwen3_vl.optim.plan import Fallback, Plan, Target


@dataclass
class HardwareChoice:
    target: Target
    profile: Profile | None = None
    reason: str = ""  # why this profile
    plan: Plan | None = None  # the chosen plan when plan="auto"
    skipped: list[Fallback] = field(default_factory=list)  # auto-plan preferences that could not run
    emulation: list[str] = field(default_factory=list)  # process-wide settings emulation changed
    plan_source: str = ""  # plan="auto": "measured: ..." or "profile ...", with the reason

    def report(self) -> str:
        if self.profile is None:
            return f"target: {self.target.device} ({self.target.device_name}), dtype {self.target.dtype}"
        lines = [
            f"profile: {self.profile.name} ({self.reason})",
            f"target:  {self.target.device} ({self.target.device_name}), dtype {self.target.dtype}",
        ]
        lines += [f"emulation: {line}" for line in self.emulation]
        if self.plan_source:
            lines.append(f"auto plan: {self.plan_source}")
        return "\n".join(lines)


def choose(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "fp32",
    plan: object = None,
    emulate: str | Profile | None = None,
    results_dir=None,
    config=None,
) -> HardwareChoice:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    auto_dtype = isinstance(dtype, str) and dtype == "auto"
    auto = isinstance(plan, str) and plan.strip() == "auto"
    profile, reason = None, ""
    if emulate is not None:
        profile = emulate if isinstance(emulate, Profile) else get_profile(str(emulate))
        reason = "emulated"
    target = target_for(device, profile.dtype if (auto_dtype and profile) else ("fp32" if auto_dtype else dtype))
    if profile is None and (auto or auto_dtype):
        profile, reason = profile_for(detect_machine(), target)
    if auto_dtype:
        target = target_for(device, profile.dtype)
    choice = HardwareChoice(target, profile, reason)
    if emulate is not None:
        choice.target = emulation.emulated_target(profile, target)
        choice.emulation = emulation.apply(profile, choice.target)
    if auto:
        measured, why = None, "emulated hardware" if emulate is not None else "measured plans are read on CPU only"
        if emulate is None and choice.target.device_type == "cpu":
            measured, why = measured_plan(choice.target, choice.target.dtype, results_dir, config)
        if measured is not None:
            choice.plan, choice.plan_source = measured, why
        else:
            choice.plan, choice.skipped = auto_plan(profile, choice.target)
            choice.plan_source = f"profile {profile.name} ({why})"
    return choice
