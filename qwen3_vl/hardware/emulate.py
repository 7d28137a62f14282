"""Emulation: run under a weaker profile's constraints on a stronger machine.

``emulated_target(profile, target)`` returns the target options see (the profile's compute
capability, ``emulated_profile`` set, so availability probes and the SDPA/flash-attn backend
choices act as on that hardware) and ``apply(profile, target)`` sets the process-wide PyTorch
state the profile implies:

- device memory capped with ``torch.cuda.set_per_process_memory_fraction`` (profile memory /
  device memory), so an out-of-memory on a 4 GB Pascal card is an out-of-memory here too;
- TF32 off for matmul and cuDNN where the profile has none (Pascal, Volta);
- only the profile's SDPA kernels enabled globally (``torch.backends.cuda.enable_*_sdp``);
- bf16 refused where the profile has no bf16 hardware;
- CPU threads limited to the profile's core count.

These settings are process-wide (PyTorch has no per-model switch for them); ``restore()`` puts
back what ``apply`` changed. What cannot be emulated: clock speed, memory bandwidth, fp16 rate,
missing instructions (set ``ATEN_CPU_CAPABILITY=avx2`` before starting Python to keep PyTorch's
CPU kernels to AVX2).
"""

from __future__ import annotations

import dataclasses

import torch

from qwen3_vl.hardware.profiles import Profile
from qwen3_vl.optim.plan import Target

_SDP_SWITCHES = {
    "flash": "enable_flash_sdp",
    "efficient": "enable_mem_efficient_sdp",
    "cudnn": "enable_cudnn_sdp",
    "math": "enable_math_sdp",
}
_saved: dict[str, object] = {}


def check(profile: Profile, target: Target) -> None:
    """Raise ValueError when ``target`` cannot emulate ``profile``."""
    if profile.device == "cuda" and target.device_type != "cuda":
        raise ValueError(f"emulating {profile.name} needs a CUDA device; the model is on {target.device}")
    if profile.device == "cpu" and target.device_type != "cpu":
        raise ValueError(f"{profile.name} is a CPU profile; put the model on cpu to emulate it")
    if profile.device == "cuda" and profile.compute_capability is not None:
        have = tuple(target.compute_capability or (0, 0))
        if have < profile.compute_capability:
            need = ".".join(map(str, profile.compute_capability))
            raise ValueError(
                f"cannot emulate {profile.name} (sm {need}) on a weaker GPU ({have[0]}.{have[1]}): "
                "emulation can only take capabilities away"
            )
    if target.dtype == "bf16" and not profile.allow_bf16:
        raise ValueError(f"{profile.name} has no bf16 hardware; use dtype fp16 (fp16 storage, fp32 compute) or fp32")


def emulated_target(profile: Profile, target: Target) -> Target:
    check(profile, target)
    return dataclasses.replace(
        target,
        compute_capability=profile.compute_capability if profile.device == "cuda" else target.compute_capability,
        device_name=f"{target.device_name} emulating {profile.name}",
        emulated_profile=profile.name,
    )


def _save(key: str, value: object) -> None:
    _saved.setdefault(key, value)


def apply(profile: Profile, target: Target) -> list[str]:
    """Set the process-wide state for ``profile``; returns what was done, one line each."""
    check(profile, target)
    done = []
    if profile.threads is not None and torch.get_num_threads() > profile.threads:
        _save("threads", torch.get_num_threads())
        torch.set_num_threads(profile.threads)
        done.append(f"CPU threads limited to {profile.threads}")
    if target.device_type != "cuda":
        return done
    index = torch.device(target.device).index or 0
    if profile.memory_bytes is not None:
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = min(1.0, profile.memory_bytes / total)
        _save(f"memory_fraction:{index}", 1.0)
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        cap, whole = profile.memory_bytes / 2**30, total / 2**30
        done.append(f"device memory capped at {cap:.1f} GiB ({fraction:.3f} of {whole:.1f} GiB)")
    if not profile.allow_tf32:
        _save("tf32_matmul", torch.backends.cuda.matmul.allow_tf32)
        _save("tf32_cudnn", torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        done.append("TF32 off")
    for name, switch in _SDP_SWITCHES.items():
        enabled = getattr(torch.backends.cuda, switch.replace("enable_", "") + "_enabled", None)
        if enabled is None:
            continue
        _save(f"sdp:{name}", enabled())
        getattr(torch.backends.cuda, switch)(name in profile.sdpa_backends)
    done.append(f"SDPA kernels: {', '.join(profile.sdpa_backends)}")
    return done


def restore() -> None:
    """Undo ``apply``."""
    for key, value in _saved.items():
        if key == "threads":
            torch.set_num_threads(value)
        elif key.startswith("memory_fraction:"):
            torch.cuda.set_per_process_memory_fraction(value, int(key.split(":")[1]))
        elif key == "tf32_matmul":
            torch.backends.cuda.matmul.allow_tf32 = value
        elif key == "tf32_cudnn":
            torch.backends.cudnn.allow_tf32 = value
        elif key.startswith("sdp:"):
            getattr(torch.backends.cuda, _SDP_SWITCHES[key[4:]])(value)
    _saved.clear()
