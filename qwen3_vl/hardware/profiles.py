"""Hardware profiles: what to run on a class of machine, and ``plan="auto"``.

A profile names, per axis, the options to try in order of preference, the dtype policy, the SDPA
backends the hardware has, tile sizes, the pixel budget for images, and (for emulation on a
stronger GPU) the capability and memory to pretend to have. ``profile_for`` maps a detected
machine and a device to a profile; ``auto_plan`` turns a profile into a concrete plan, recording
every preference it had to skip and why.

Preferences are exact options only: an approximate option (sparse attention, approximated RoPE,
weight quantization, token pruning) changes outputs and must be asked for by name. Attention
preferences follow ``python -m harness.bench_attention``: on CPU (2b shapes) sdpa was 3-11x faster
than eager at 7-120x less peak memory and faster than every other option; flash_kv (flash-attn) is
first where it can run (sm80+, bf16, package installed) and falls back to sdpa elsewhere.
On CPU the execution preference is ``cpu_packed`` (prepacked GEMV weights: 1.7-2.1x eager's decode
on mini, ``python -m harness.bench``); stored measurements for the machine, when there are some,
take precedence over every profile preference (``qwen3_vl/hardware/measured.py``).
Option names of axes other than attention and rope follow their issues; names not registered in
this build are skipped with the reason recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qwen3_vl.optim.plan import Choice, Fallback, Plan, PlanError, Target

GiB = 1 << 30
TOKEN_PIXELS = 32 * 32  # one LLM token per 2x2 merged 16x16 patches


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str  # "cpu" or "cuda"
    dtype: str  # dtype policy: "fp32", "fp16" (fp16 storage, fp32 compute) or "bf16"
    preferred: Mapping[str, tuple[str, ...]]  # axis -> option specs, best first
    sdpa_backends: tuple[str, ...]  # torch SDPA kernels this hardware has, best first
    tiles: Mapping[str, int] = field(default_factory=dict)  # parameters of the tiled kernels
    max_pixels: int = 256 * TOKEN_PIXELS
    min_pixels: int = 16 * TOKEN_PIXELS
    # What emulation applies on a stronger machine.
    compute_capability: tuple[int, int] | None = None
    memory_bytes: int | None = None
    allow_tf32: bool = True
    allow_bf16: bool = True
    threads: int | None = None  # CPU threads to use (None: PyTorch's default)

    @property
    def max_visual_tokens(self) -> int:
        return self.max_pixels // TOKEN_PIXELS

    def option_params(self, axis: str, option: str) -> dict[str, int]:
        """Tile parameters this profile sets for ``axis=option`` (only those the option declares)."""
        from qwen3_vl.optim.registry import get

        defaults = get(axis, option).defaults
        return {k: v for k, v in self.tiles.items() if k in defaults}


_EXACT_REST = {
    "kv_cache": ("static", "dynamic"),
    "memory": ("resident",),  # offloading is the memory planner's call (a budget), not a profile default
    "quant": ("none",),  # quantization is approximate: opt in by name
    "vision": ("conditional", "full"),
}

PROFILES: dict[str, Profile] = {
    "sm61-laptop": Profile(
        name="sm61-laptop",
        description="i5-10210U (4C/8T AVX2) + Pascal GPU sm_61 (GTX 1050/1060, MX250 class, 2-6 GB) + NVMe",
        device="cuda",
        dtype="fp16",  # fp16 arithmetic runs at 1/64 rate on GP10x: store fp16, compute fp32
        preferred={"attention": ("sdpa", "eager"), "rope": ("cached", "standard"), **_EXACT_REST},
        # Flash and cuDNN attention need sm80; the mem-efficient kernel runs from sm50 (fp16/fp32).
        sdpa_backends=("efficient", "math"),
        # Tile sizes for attention=tiled (applied by plan="auto" when it picks tiled, shown by `python -m
        # qwen3_vl hardware`, used by the attention benchmark; tiled is never a preference: slower than
        # sdpa wherever measured). 64x64 fp32 Q and K tiles are 32 KB, inside Pascal's 48 KB per block.
        tiles={"block_q": 64, "block_k": 64, "block_k_decode": 256},
        max_pixels=256 * TOKEN_PIXELS,
        compute_capability=(6, 1),
        memory_bytes=4 * GiB,
        allow_tf32=False,
        allow_bf16=False,
        threads=4,
    ),
    "cpu-avx2": Profile(
        name="cpu-avx2",
        description="x86 CPU with AVX2+FMA, no AVX-512 (e.g. i5-10210U without its GPU)",
        device="cpu",
        dtype="fp32",
        preferred={"attention": ("sdpa", "eager"), "rope": ("cached", "standard"), **_EXACT_REST,
                   "execution": ("cpu_packed", "eager")},
        sdpa_backends=("flash", "math"),  # on CPU "flash" is PyTorch's fused CPU kernel
        tiles={"block_q": 128, "block_k": 512, "block_k_decode": 2048},
        max_pixels=256 * TOKEN_PIXELS,
        threads=4,
    ),
    "cpu-avx512": Profile(
        name="cpu-avx512",
        description="x86 CPU with AVX-512 (server/desktop class)",
        device="cpu",
        dtype="fp32",
        preferred={"attention": ("sdpa", "eager"), "rope": ("cached", "standard"), **_EXACT_REST,
                   "execution": ("cpu_packed", "eager")},
        sdpa_backends=("flash", "math"),
        tiles={"block_q": 128, "block_k": 512, "block_k_decode": 2048},
        max_pixels=512 * TOKEN_PIXELS,
    ),
    "cuda-sm70": Profile(
        name="cuda-sm70",
        description="Volta/Turing GPU (sm_70-sm_75: V100, T4, RTX 20xx): no bf16, no flash kernels",
        device="cuda",
        dtype="fp16",
        preferred={"attention": ("sdpa", "eager"), "rope": ("cached", "standard"), **_EXACT_REST},
        sdpa_backends=("efficient", "math"),
        tiles={"block_q": 128, "block_k": 128, "block_k_decode": 512},
        max_pixels=1024 * TOKEN_PIXELS,
        compute_capability=(7, 0),
        memory_bytes=16 * GiB,
        allow_tf32=False,
        allow_bf16=False,
    ),
    "cuda-sm80plus": Profile(
        name="cuda-sm80plus",
        description="Ampere or newer GPU (sm_80+: A100, RTX 30xx/40xx, H100): bf16, flash kernels",
        device="cuda",
        dtype="bf16",
        preferred={"attention": ("flash_kv", "sdpa", "eager"), "rope": ("cached", "standard"), **_EXACT_REST},
        sdpa_backends=("flash", "efficient", "cudnn", "math"),
        tiles={"block_q": 128, "block_k": 128, "block_k_decode": 1024},
        max_pixels=16384 * TOKEN_PIXELS,
        compute_capability=(8, 0),
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown hardware profile '{name}'; profiles are: {', '.join(PROFILES)}") from None


def profile_for(machine, target: Target) -> tuple[Profile, str]:
    """The profile for running on ``target`` on ``machine``, with a one-line reason."""
    if target.device_type == "cuda":
        cc = target.compute_capability or (0, 0)
        have = f"sm_{cc[0]}{cc[1]}"
        if cc >= (8, 0):
            return PROFILES["cuda-sm80plus"], f"{target.device_name} is {have} (>= sm_80)"
        if cc >= (7, 0):
            return PROFILES["cuda-sm70"], f"{target.device_name} is {have} (sm_70-sm_7x)"
        if cc >= (6, 0):
            return PROFILES["sm61-laptop"], f"{target.device_name} is {have} (Pascal)"
        return PROFILES["sm61-laptop"], f"{target.device_name} is {have}, older than every profile: Pascal's rules"
    if machine.isa == "avx512":
        return PROFILES["cpu-avx512"], f"CPU {machine.cpu_name} has AVX-512"
    if machine.isa == "avx2":
        return PROFILES["cpu-avx2"], f"CPU {machine.cpu_name} has AVX2+FMA"
    return PROFILES["cpu-avx2"], f"CPU {machine.cpu_name} has no AVX2; cpu-avx2's settings (plain PyTorch kernels)"


def auto_plan(profile: Profile, target: Target) -> tuple[Plan, list[Fallback]]:
    """The best plan ``profile`` prefers that runs on ``target``.

    Per axis, the first preferred option that is registered and available; each skipped
    preference is returned as a ``Fallback`` with its reason. Tile sizes come from the profile.
    """
    from qwen3_vl.optim.plan import make_plan
    from qwen3_vl.optim.registry import AXES, options, reference_option

    chosen: dict[str, Choice] = {}
    skipped: list[Fallback] = []
    for axis in AXES:
        registered = {opt.name: opt for opt in options(axis)}
        wanted = [*profile.preferred.get(axis, ()), reference_option(axis).name]
        pending: list[tuple[str, str]] = []  # (option, reason) skipped so far on this axis
        for name in wanted:
            opt = registered.get(name)
            reason = "not registered in this build" if opt is None else opt.unavailable(target)
            if reason is None:
                chosen[axis] = Choice(name, tuple(sorted(profile.option_params(axis, name).items())))
                skipped += [Fallback(axis, s, name, f"profile {profile.name}: {r}") for s, r in pending]
                break
            pending.append((name, reason))
        else:
            raise PlanError(f"profile {profile.name}: no option of axis {axis} runs on {target.device}")
    return make_plan(chosen), skipped
