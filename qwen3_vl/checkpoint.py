"""Checkpoints: the only place that knows Hugging Face key names and file layout.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (never pickle ``.bin``
files), validates every key and shape before touching the model, and writes the same layout back
atomically. Also builds seeded random weights for presets, directly in the storage dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwen3_vl.config import Qwen3VLConfig, to_hf
from qwen3_vl.model.layers import RMSNorm


class CheckpointError(ValueError):
    """A checkpoint directory or state dict that cannot be loaded as this model."""


_PATCH_KEY = "visual.patch_embed.proj.weight"


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint key."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, for every tensor a checkpoint of this model must hold."""
    shapes = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        shape = tuple(param.shape)
        if name == _PATCH_KEY:
            v = model.config.vision
            shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        shapes[hf_name(name)] = shape
    return shapes


def load_hf_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Validate ``state_dict`` (HF keys) against ``model`` completely, then assign it.

    Raises ``CheckpointError`` naming missing keys, unexpected keys or wrong shapes; on error the
    model is untouched. Tensors are converted to ``dtype`` (default: the model's current dtype).
    """
    expected = expected_shapes(model)
    tied = model.config.tie_word_embeddings
    given = dict(state_dict)
    if tied:
        given.pop("lm_head.weight", None)  # a tied checkpoint may carry a copy; the embedding wins
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        hint = " (config says tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        problems.append(f"missing keys{hint}: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    wrong = [
        f"{k}: checkpoint {tuple(given[k].shape)}, model {expected[k]}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != expected[k]
    ]
    if wrong:
        problems.append(f"wrong shapes: {_list(wrong)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    if dtype is None:
        dtype = next(model.parameters()).dtype
    ours = {}
    for key, tensor in given.items():
        name = our_name(key)
        if not tensor.is_floating_point():
            raise CheckpointError(f"{key} holds {tensor.dtype} values, expected floating point")
        tensor = tensor.to(dtype)
        if name == _PATCH_KEY:
            tensor = tensor.reshape(tensor.shape[0], -1)
        ours[name] = tensor.contiguous()
    if tied:
        ours["lm_head.weight"] = ours["language_model.embed_tokens.weight"]
    model.load_state_dict(ours, strict=True, assign=True)
    model.tie_weights()


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint keys (tied lm_head left out, patch embed as Conv3d)."""
    out = {}
    v = model.config.vision
    for name, param in model.named_parameters(remove_duplicate=True):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensor = param.detach()
        if name == _PATCH_KEY:
            tensor = tensor.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        out[hf_name(name)] = tensor.contiguous().cpu()
    return out


def _list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Files


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, or a clear error about what is wrong."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = sorted({directory / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index.name} names shard files that are missing: {_list(absent)}")
        return files
    if single.exists():
        return [single]
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        return [directory / name for name in others]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle checkpoints ({_list(pickles)}); they are refused because "
            "loading a pickle can run arbitrary code. Convert them to safetensors first."
        )
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or not a valid safetensors file ({exc})") from None


def read_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, keyed as in the files."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(Path(directory)):
        part = read_safetensors(path)
        repeated = sorted(set(part) & set(tensors))
        if repeated:
            raise CheckpointError(f"{path.name} repeats keys from another shard: {_list(repeated)}")
        tensors.update(part)
    return tensors


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write config.json and model.safetensors (HF layout) into ``path``, atomically."""
    from safetensors.torch import save_file

    if getattr(model, "plan", None) is not None and model.plan["quant"].name != "none":
        raise CheckpointError(
            f"the model's weights are quantized ({model.plan['quant']}); save a full-precision model instead"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(to_hf(model.config), indent=2) + "\n")
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        path.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# Seeded random weights for presets


def _seed_for(name: str, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _fill_uniform_(tensor: torch.Tensor, low: float, high: float, seed: int) -> None:
    """Seeded uniform fill, several times faster than ``uniform_``: numpy's SFC64 emits raw 64-bit
    words, viewed as four int16 values each, converted and scaled in torch."""
    flat = tensor.view(-1)
    bits = np.random.SFC64(seed)
    chunk = 1 << 26
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        words = bits.random_raw((part.numel() + 3) // 4)
        part.copy_(torch.from_numpy(words.view(np.int16)[: part.numel()]))
    flat.mul_((high - low) / 65536)
    if high + low:
        flat.add_((high + low) / 2)


def random_init_(model: nn.Module, config: Qwen3VLConfig, seed: int, dtype: torch.dtype) -> None:
    """Give every parameter of a (meta) model seeded random values, allocated in ``dtype``.

    Each tensor's values depend only on its name and the seed. Scales keep activations O(1):
    weights and embeddings uniform with std (last dim)^-1/2, norm weights 1 +- 0.1, biases std
    0.02. (With embeddings much larger than that, a tied head makes the model repeat its input
    token, which weakens generation tests.)
    """
    for module_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            if full == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if pname == "bias":
                std, center = 0.02, 0.0
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                std, center = 0.1, 1.0
            else:
                std, center = param.shape[-1] ** -0.5, 0.0
            bound = std * 3**0.5
            tensor = torch.empty(param.shape, dtype=dtype)
            _fill_uniform_(tensor, center - bound, center + bound, _seed_for(full, seed))
            module._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
    model.tie_weights()
