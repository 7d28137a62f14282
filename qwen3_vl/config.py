"""Model configuration: text and vision dataclasses, named presets, and the Hugging Face config.json.

Presets follow gpt-fast's idea of a dict of named shapes. ``from_hf`` reads both the
transformers 4.57 layout (``rope_theta`` and ``rope_scaling`` with the mrope keys inside
``text_config``) and the v5 layout (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json or preset that cannot describe a Qwen3-VL model."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even, got {self.head_dim}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        t, h, w = self.mrope_section
        if not (h <= t and w <= t):
            raise ConfigError(f"interleaved M-RoPE needs the T section to be the largest: {list(self.mrope_section)}")
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act must be 'silu', got '{self.hidden_act}'")
        if self.attention_bias:
            raise ConfigError("Qwen3-VL text attention has no bias; attention_bias=true is not supported")


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim must be a multiple of 4 for the 2D RoPE, got {self.head_dim}")
        side = round(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"num_position_embeddings must be a square, got {self.num_position_embeddings}")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"deepstack_visual_indexes {bad} outside the {self.depth} vision blocks")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision hidden_act must be 'gelu_pytorch_tanh', got '{self.hidden_act}'")


@dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: tuple[int, ...] = (151645, 151643)
    pad_token_id: int = 151643

    def validate(self) -> Qwen3VLConfig:
        self.text.validate()
        self.vision.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size ({self.vision.out_hidden_size}) must equal text hidden_size "
                f"({self.text.hidden_size})"
            )
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ConfigError("more DeepStack taps than text layers to inject them into")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is outside the vocabulary ({self.text.vocab_size})")
        return self

    def replace(self, **changes: Any) -> Qwen3VLConfig:
        return dataclasses.replace(self, **changes)


def _preset(text: dict, vision: dict, tie: bool) -> Qwen3VLConfig:
    vision = {"out_hidden_size": text["hidden_size"], **vision}
    return Qwen3VLConfig(TextConfig(**text), VisionConfig(**vision), tie_word_embeddings=tie).validate()


# The released shapes (see the architecture spec, section 6) plus small shapes for tests and laptops.
PRESETS: dict[str, Qwen3VLConfig] = {
    "tiny": _preset(
        dict(hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, mrope_section=(4, 2, 2)),
        dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, deepstack_visual_indexes=(0, 1, 2)),
        tie=True,
    ),
    "mini": _preset(
        dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=8, head_dim=64, mrope_section=(12, 10, 10)),
        dict(depth=6, hidden_size=512, intermediate_size=2048, num_heads=8, deepstack_visual_indexes=(1, 3, 5)),
        tie=True,
    ),
    "2b": _preset(
        dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=(5, 11, 17)),
        tie=True,
    ),
    "4b": _preset(
        dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
             num_key_value_heads=8),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=(5, 11, 17)),
        tie=True,
    ),
    "8b": _preset(
        dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
             num_key_value_heads=8),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=(8, 16, 24)),
        tie=False,
    ),
    "32b": _preset(
        dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
             num_key_value_heads=8),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=(8, 16, 24)),
        tie=False,
    ),
    # The 32-layer / 32-head model the project was first described with (full multi-head KV).
    "full-32x32": _preset(
        dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=(8, 16, 24)),
        tie=False,
    ),
}


def preset(name: str) -> Qwen3VLConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; presets are: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json


def _rope_fields(text: dict) -> tuple[float, tuple[int, ...]]:
    """rope_theta and mrope_section from either config layout."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "mrope"):
        raise ConfigError(
            f"rope type '{rope_type}' in config.json is not supported by the reference model "
            "(use the rope=interpolated option for context extension)"
        )
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json has no rope_theta (neither text_config.rope_theta nor rope_parameters)")
    section = params.get("mrope_section", scaling.get("mrope_section"))
    if section is None:
        raise ConfigError("config.json has no mrope_section (neither rope_scaling nor rope_parameters)")
    return float(theta), tuple(int(s) for s in section)


def _pick(source: dict, cls: type, renames: dict[str, str] | None = None) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in source.items():
        key = (renames or {}).get(key, key)
        if key in names:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def from_hf(source: str | Path | dict) -> Qwen3VLConfig:
    """Read a Hugging Face Qwen3-VL config (a config.json path, its directory, or the parsed dict)."""
    if not isinstance(source, dict):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        try:
            source = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    model_type = source.get("model_type")
    if model_type not in ("qwen3_vl", None):
        raise ConfigError(f"config.json is for model_type '{model_type}', expected 'qwen3_vl'")
    text = source.get("text_config")
    vision = source.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConfigError("config.json needs both text_config and vision_config")
    theta, section = _rope_fields(text)
    text_kwargs = _pick(text, TextConfig)
    text_kwargs.update(rope_theta=theta, mrope_section=section)
    if text_kwargs.get("num_key_value_heads") is None:
        text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads", TextConfig.num_attention_heads)
    vision_kwargs = _pick(vision, VisionConfig)
    vparams = vision.get("rope_parameters") or {}
    if "rope_theta" in vparams:
        vision_kwargs["rope_theta"] = float(vparams["rope_theta"])
    top = _pick(source, Qwen3VLConfig)
    tie = source.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    top["tie_word_embeddings"] = bool(tie)
    try:
        config = Qwen3VLConfig(TextConfig(**text_kwargs), VisionConfig(**vision_kwargs), **top)
    except TypeError as exc:
        raise ConfigError(f"config.json has an invalid field: {exc}") from None
    return config.validate()


def to_hf(config: Qwen3VLConfig) -> dict:
    """The config.json dict in the layout of the released checkpoints (transformers 4.57)."""
    t, v = config.text, config.vision
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": list(t.mrope_section),
                "mrope_interleaved": True,
            },
            "max_position_embeddings": t.max_position_embeddings,
            "attention_bias": t.attention_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.pad_token_id,
            "eos_token_id": config.eos_token_ids[0],
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": v.hidden_act,
        },
    }


def parameter_count(config: Qwen3VLConfig) -> dict[str, int]:
    """Parameter counts from the architecture formula (checked against the built model in tests)."""
    t, v = config.text, config.vision
    h, d = t.hidden_size, t.head_dim
    attn = h * t.num_attention_heads * d + 2 * h * t.num_key_value_heads * d + t.num_attention_heads * d * h + 2 * d
    mlp = 3 * h * t.intermediate_size
    layer = attn + mlp + 2 * h
    embed = t.vocab_size * h
    text = embed + t.num_hidden_layers * layer + h
    head = 0 if config.tie_word_embeddings else t.vocab_size * h
    dv, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    block = (3 * dv * dv + 3 * dv) + (dv * dv + dv) + (2 * dv * v.intermediate_size + v.intermediate_size + dv) + 4 * dv
    merger_body = merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size
    vision = (
        dv * v.patch_dim + dv
        + v.num_position_embeddings * dv
        + v.depth * block
        + (2 * dv + merger_body)
        + len(v.deepstack_visual_indexes) * (2 * merged + merger_body)
    )
    return {"text": text, "lm_head": head, "vision": vision, "total": text + head + vision}
