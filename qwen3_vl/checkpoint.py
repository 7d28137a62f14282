"""Checkpoints: the only place that knows Hugging Face key names and file layout.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (never pickle ``.bin``
files), validates every key and shape before touching the model, and writes the same layout back
atomically. Also builds seeded random weights for presets, directly in the storage dtype.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
import weakref
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


def hf_state_dict(model: nn.Module, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint keys (tied lm_head left out, patch embed as Conv3d).

    With ``to_cpu=False`` the tensors stay where they are (views of the model's own storage)."""
    out = {}
    v = model.config.vision
    for name, param in model.named_parameters(remove_duplicate=True):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensor = param.detach()
        if name == _PATCH_KEY:
            tensor = tensor.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        tensor = tensor.contiguous()
        out[hf_name(name)] = tensor.cpu() if to_cpu else tensor
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Live read-only file mappings: (weakref to the mmap, first byte address, length, path). Lets
# ``mapping_of`` tell whether a tensor's bytes come from a file (memory options release such
# pages after use; releasing anonymous memory instead would destroy it).
_MAPPINGS: list[tuple[weakref.ref, int, int, Path]] = []


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, memory-mapped (copy-on-write, never written back).

    The tensors share the file's pages: nothing is copied into process memory until it is read,
    and a model kept in the file's dtype holds no second copy. The header, every offset and the
    file size are checked first, so a truncated file fails here, not at first use.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(f.read(8), "little")
            if 8 + header_len > size:
                raise ValueError(f"header of {header_len} bytes runs past the end of the {size}-byte file")
            header = json.loads(f.read(header_len))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or not a valid safetensors file ({exc})") from None
    base = 8 + header_len
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or not a valid safetensors file (entry {key}: {exc})") from None
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path} is truncated or not a valid safetensors file ({key}: offsets "
                                  f"[{begin}, {end}) do not hold {shape} {info['dtype']})")
        if base + end > size:
            raise CheckpointError(f"{path} is truncated or not a valid safetensors file ({key} ends at byte "
                                  f"{base + end}, the file has {size})")
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % dtype.itemsize:  # unaligned: copy this one tensor
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=base + begin)
            tensors[key] = raw.clone().view(dtype).view(shape)
        else:
            tensors[key] = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin).view(shape)
    if len(mm):
        start = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        _MAPPINGS[:] = [m for m in _MAPPINGS if m[0]() is not None]
        _MAPPINGS.append((weakref.ref(mm), start, len(mm), path))
    return tensors


def mapping_of(tensor: torch.Tensor) -> tuple[mmap.mmap, int, Path] | None:
    """(the mmap, byte offset into it, file path) when ``tensor``'s bytes lie in a mapped file, else None."""
    if tensor.device.type != "cpu":
        return None
    ptr = tensor.data_ptr()
    for ref, start, length, path in _MAPPINGS:
        mm = ref()
        if mm is not None and start <= ptr < start + length:
            return mm, ptr - start, path
    return None


def materialize_mapped(tensors) -> int:
    """Replace file-mapped tensors (parameters or buffers, in place via ``.data``) by copies in
    process memory; returns the bytes copied.

    Mapped tensors sit where the file puts them (safetensors aligns data to 8 bytes only), and CPU
    kernels may round differently on such addresses than on the allocator's 64-byte aligned ones;
    a resident model is therefore copied out of its mapping, which keeps its logits bitwise equal
    to a model built in memory (and frees it from later changes to the file).
    """
    copied = 0
    for t in tensors:
        found = mapping_of(t)
        if found is not None:
            t.data = t.data.clone()
            n = t.numel() * t.element_size()
            copied += n
            release_pages(found[0], found[1], n)  # the copy is what counts now: don't hold both
    return copied


def release_pages(mm: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop the whole pages of ``[offset, offset + nbytes)`` of a copy-on-write file mapping from the
    process (never written, so they are re-read from the file if touched again)."""
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def write_aligned_safetensors(tensors: dict[str, torch.Tensor], path: Path, align: int = 64) -> None:
    """A valid safetensors file whose every tensor starts ``align``-byte aligned (when mapped).

    Alignment is reached with explicit ``__pad_N`` uint8 entries between tensors and spaces after
    the JSON header (both allowed by the format), so a reader of this file gets the same addresses
    mod ``align`` as the allocator would give, and the same kernel paths.
    """
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    header, order, offset = {}, [], 0
    for i, (key, t) in enumerate(tensors.items()):
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        order.append((key, t))
        offset += n
        pad = -offset % align
        if pad and i + 1 < len(tensors):
            header[f"__pad_{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            order.append((None, pad))
            offset += pad
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % align)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, t in order:
            if key is None:
                f.write(bytes(t))
            else:
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    os.replace(tmp, path)


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
    chunk = 1 << 22  # 8 MB of raw words: reused allocations (a 128 MB chunk spent 3x longer in page faults)
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
