"""Pixel budgets: the image-size operating point (not an option; a budget changes outputs by design).

An image is resized so its area lies in ``[min_pixels, max_pixels]`` (``qwen3_vl.processing``'s
``smart_resize``), and the LLM sees one token per 32x32 pixels, so ``max_pixels`` bounds the
visual tokens and with them most of the prefill work. The budget per hardware class lives in the
hardware profiles (``qwen3_vl.hardware.profiles``); ``pixel_budget`` resolves what a run uses
and says where it came from, so results can record it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3_vl.model.positions import InputError

TOKEN_PIXELS = 32 * 32  # one LLM token per 2x2 merged 16x16 patches
# Qwen3-VL's published preprocessor_config.json (shortest_edge / longest_edge).
CHECKPOINT_DEFAULT = (65_536, 16_777_216)


@dataclass(frozen=True)
class PixelBudget:
    min_pixels: int
    max_pixels: int
    source: str = "checkpoint"  # "checkpoint", "profile <name>", or "explicit"

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise InputError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")

    @property
    def max_tokens(self) -> int:
        """The most visual tokens one image can produce under this budget."""
        return self.max_pixels // TOKEN_PIXELS

    def record(self) -> dict[str, int | str]:
        """Columns for a results row."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "pixel_budget": self.source}


def profile_budget(profile) -> PixelBudget:
    """The budget of a hardware profile (a ``Profile`` or its name)."""
    if isinstance(profile, str):
        from qwen3_vl.hardware.profiles import get_profile

        profile = get_profile(profile)
    return PixelBudget(profile.min_pixels, profile.max_pixels, f"profile {profile.name}")


def detected_profile(device: str = "cpu"):
    """The hardware profile of this machine for ``device``."""
    from qwen3_vl.hardware.detect import detect_machine
    from qwen3_vl.hardware.device import target_for
    from qwen3_vl.hardware.profiles import profile_for

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return profile_for(detect_machine(), target_for(device))[0]


def pixel_budget(profile=None, min_pixels: int | None = None, max_pixels: int | None = None,
                 default: tuple[int, int] = CHECKPOINT_DEFAULT, device: str = "cpu") -> PixelBudget:
    """The budget a run uses: explicit bounds win over the profile's, which win over ``default``.

    ``profile``: None, a ``Profile``, a profile name, or ``"auto"`` (the profile this machine gets
    for ``device``).
    """
    if profile == "auto":
        profile = detected_profile(device)
    base = profile_budget(profile) if profile is not None else PixelBudget(*default, "checkpoint")
    if min_pixels is None and max_pixels is None:
        return base
    return PixelBudget(base.min_pixels if min_pixels is None else min_pixels,
                       base.max_pixels if max_pixels is None else max_pixels, "explicit")
