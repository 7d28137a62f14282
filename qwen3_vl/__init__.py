"""Qwen3-VL, exact to the published architecture, with switchable optimizations."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3_vl.checkpoint import CheckpointError, load_hf_state_dict, random_init_, read_checkpoint, save_pretrained
from qwen3_vl.config import PRESETS, ConfigError, Qwen3VLConfig, from_hf, preset
from qwen3_vl.hardware.auto import choose as choose_hardware
from qwen3_vl.hardware.device import dtype_name, storage_and_compute
from qwen3_vl.hardware.profiles import Profile
from qwen3_vl.model.positions import InputError
from qwen3_vl.model.qwen3_vl import Qwen3VL
from qwen3_vl.optim.plan import Plan, PlanError, make_plan

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "Plan",
    "PlanError",
    "Qwen3VL",
    "Qwen3VLConfig",
    "build",
    "from_pretrained",
    "make_plan",
    "save_pretrained",
]


def _as_plan(plan: Plan | str | dict | None) -> Plan:
    if plan is None:
        return make_plan({})
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return make_plan(plan)
    if isinstance(plan, str):
        return Plan.parse(plan)
    raise PlanError(f"plan must be a Plan, a plan id string or a dict, got {type(plan).__name__}")


def build(
    config: Qwen3VLConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    plan: Plan | str | dict | None = None,
    seed: int = 0,
    emulate: str | Profile | None = None,
) -> Qwen3VL:
    """Build a model from a config and HF-keyed weights (seeded random weights when None)."""
    hardware = choose_hardware(device, dtype, plan, emulate, config=config)
    target = hardware.target
    plan = hardware.plan or _as_plan(plan)
    storage, compute = storage_and_compute(target.dtype)
    with torch.device("meta"):
        model = Qwen3VL(config)
    if state_dict is None:
        random_init_(model, config, seed, storage)
    else:
        load_hf_state_dict(model, state_dict, storage)
    model.requires_grad_(False)
    model.eval()
    model.compute_dtype = model.visual.compute_dtype = compute
    model.apply_plan(plan, target)
    model.fallbacks[:0] = hardware.skipped  # plan="auto": profile preferences that could not run
    model.hardware = hardware
    return model


def from_pretrained(
    path_or_preset: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    plan: Plan | str | dict | None = None,
    seed: int = 0,
    emulate: str | Profile | None = None,
) -> Qwen3VL:
    """A checkpoint directory (config.json + safetensors) or a preset name (seeded random weights).

    ``dtype``: fp32, bf16, fp16 (fp16 weight storage with fp32 compute), or "auto" (the hardware
    profile's policy). ``device``: "cpu", "cuda[:N]" or "auto".
    ``plan``: a ``Plan``, a plan id such as ``"attention=sdpa,kv_cache=static"``, "auto" (the best
    plan the detected hardware profile prefers), or None for the reference plan. Unavailable options
    fall back with the reason recorded (``model.plan_report()``, ``model.fallbacks``).
    ``emulate``: a hardware profile name (e.g. "sm61-laptop") whose constraints are applied on this
    stronger machine (see ``qwen3_vl.hardware.emulate``; process-wide settings).
    """
    if not (isinstance(dtype, str) and dtype == "auto"):
        dtype_name(dtype)  # validate before any expensive work
    name = str(path_or_preset)
    if name in PRESETS:
        return build(preset(name), None, dtype=dtype, device=device, plan=plan, seed=seed, emulate=emulate)
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"'{name}' is neither a checkpoint directory nor a preset; presets are: {', '.join(PRESETS)}"
        )
    config = from_hf(path)
    return build(config, read_checkpoint(path), dtype=dtype, device=device, plan=plan, seed=seed, emulate=emulate)
