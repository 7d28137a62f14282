"""Pixel budgets: per hardware profile, overridable, validated, and honoured by preprocessing and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen3_vl.__main__ import main
from qwen3_vl.hardware.profiles import PROFILES
from qwen3_vl.optim.vision.budget import CHECKPOINT_DEFAULT, PixelBudget, pixel_budget
from qwen3_vl.processing import Processor


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_has_a_valid_budget(name):
    budget = pixel_budget(name)
    profile = PROFILES[name]
    assert (budget.min_pixels, budget.max_pixels) == (profile.min_pixels, profile.max_pixels)
    assert budget.source == f"profile {name}" and budget.max_tokens == profile.max_visual_tokens


def test_explicit_bounds_win_and_are_recorded():
    assert pixel_budget() == PixelBudget(*CHECKPOINT_DEFAULT, "checkpoint")
    budget = pixel_budget("cpu-avx2", max_pixels=128 * 1024)
    expected = (PROFILES["cpu-avx2"].min_pixels, 131072, "explicit")
    assert (budget.min_pixels, budget.max_pixels, budget.source) == expected
    assert budget.record() == {"min_pixels": budget.min_pixels, "max_pixels": 131072, "pixel_budget": "explicit"}
    assert pixel_budget("auto").source.startswith("profile ")


def test_preprocessing_keeps_images_within_the_budget(tmp_path):
    budget = pixel_budget("sm61-laptop")
    processor = Processor.from_pretrained("tiny", min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1600, 3), dtype=np.uint8))
    out = processor(messages=[{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": "hi"}]}])
    _, h, w = out["image_grid_thw"][0].tolist()
    assert h * w * 16 * 16 <= budget.max_pixels and h * w // 4 <= budget.max_tokens


def test_cli_pixel_budget(tmp_path, capsys):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((600, 800, 3), dtype=np.uint8)).save(path)
    args = ["generate", "--preset", "tiny", "--image", str(path), "--prompt", "hi", "--max-new-tokens", "1"]
    assert main([*args, "--pixel-budget", "cpu-avx2", "--verbose"]) == 0
    assert "pixel budget: 16384..262144 pixels (profile cpu-avx2)" in capsys.readouterr().err
    assert main([*args, "--pixel-budget", "cpu-avx2", "--min-pixels", "300000"]) == 2
    assert "min_pixels (300000) is larger than max_pixels (262144)" in capsys.readouterr().err
    assert main([*args, "--pixel-budget", "no-such-profile"]) == 2
    assert "unknown hardware profile 'no-such-profile'" in capsys.readouterr().err
