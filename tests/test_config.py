"""Presets, the parameter-count formula, and `python -m qwen3_vl info`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qwen3_vl.config import PRESETS, ConfigError, from_hf, parameter_count, preset, to_hf
from qwen3_vl.model.qwen3_vl import Qwen3VL


def built_counts(config) -> dict[str, int]:
    with torch.device("meta"):
        model = Qwen3VL(config)
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.language_model.parameters())
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    return {"text": text, "lm_head": head, "vision": vision, "total": text + head + vision}


@pytest.mark.parametrize("name", list(PRESETS))
def test_formula_matches_built_model(name):
    assert parameter_count(PRESETS[name]) == built_counts(PRESETS[name])


@pytest.mark.parametrize("name", list(PRESETS))
def test_info_prints_the_formula_counts(name):
    out = subprocess.run([sys.executable, "-m", "qwen3_vl", "info", "--preset", name],
                         capture_output=True, text=True, check=True).stdout
    counts = parameter_count(PRESETS[name])
    for part in ("text", "lm_head", "vision", "total"):
        assert f"{counts[part]:,}" in out


def test_full_32x32_keeps_32_layers_and_32_heads():
    out = subprocess.run([sys.executable, "-m", "qwen3_vl", "info", "--preset", "full-32x32"],
                         capture_output=True, text=True, check=True).stdout
    assert "32 layers, 32 attention heads, 32 KV heads" in out
    t = preset("full-32x32").text
    assert (t.num_hidden_layers, t.num_attention_heads, t.hidden_size, t.intermediate_size) == (32, 32, 4096, 22016)


def test_released_shapes():
    """The config table of the architecture spec, section 6."""
    rows = {  # hidden, intermediate, layers, heads, kv, tied, vision depth, vision hidden, taps
        "2b": (2048, 6144, 28, 16, 8, True, 24, 1024, (5, 11, 17)),
        "4b": (2560, 9728, 36, 32, 8, True, 24, 1024, (5, 11, 17)),
        "8b": (4096, 12288, 36, 32, 8, False, 27, 1152, (8, 16, 24)),
        "32b": (5120, 25600, 64, 64, 8, False, 27, 1152, (8, 16, 24)),
    }
    for name, row in rows.items():
        c = preset(name)
        t, v = c.text, c.vision
        got = (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
               t.num_key_value_heads, c.tie_word_embeddings, v.depth, v.hidden_size, v.deepstack_visual_indexes)
        assert got == row, name
        assert (t.head_dim, t.rope_theta, t.mrope_section, v.out_hidden_size) == (128, 5e6, (24, 20, 20), t.hidden_size)


def test_mini_is_about_350m():
    assert 330e6 < parameter_count(preset("mini"))["total"] < 370e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    assert from_hf(to_hf(PRESETS[name])) == PRESETS[name]


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; presets are: tiny, mini"):
        preset("huge")


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (lambda c: c["text_config"].pop("rope_theta"), "no rope_theta"),
    (lambda c: c["text_config"].update(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (lambda c: c["vision_config"].update(out_hidden_size=7), "out_hidden_size"),
    (lambda c: c.pop("vision_config"), "needs both text_config and vision_config"),
])
def test_bad_configs(change, message):
    cfg = to_hf(preset("tiny"))
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        from_hf(cfg)
