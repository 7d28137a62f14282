"""The execution target of a model: device, its compute capability, and the dtype policy."""

from __future__ import annotations

import torch

from qwen3_vl.optim.plan import Target

# "fp16" is fp16 *storage* with fp32 compute: what a Pascal GPU needs (fp16 arithmetic runs at
# 1/64 rate there and Qwen activations overflow plain fp16).
DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
}
_ALIASES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "half": "fp16",
    "float": "fp32",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical dtype name ("fp32", "fp16", "bf16") for a torch dtype or a string alias."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        return _ALIASES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def storage_and_compute(dtype: torch.dtype | str) -> tuple[torch.dtype, torch.dtype]:
    return DTYPES[dtype_name(dtype)]


def target_for(device: str | torch.device, dtype: torch.dtype | str = "fp32") -> Target:
    """Describe ``device``; raises a clear error when it does not exist."""
    dev = torch.device(device)
    name = dtype_name(dtype)
    if dev.type == "cpu":
        return Target(device="cpu", dtype=name, device_name="cpu")
    if dev.type != "cuda":
        raise ValueError(f"unsupported device '{device}': use cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device '{device}' requested but CUDA is not available "
            f"(PyTorch {torch.__version__} {'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'})"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return Target(
        device=f"cuda:{index}",
        dtype=name,
        compute_capability=torch.cuda.get_device_capability(index),
        device_name=torch.cuda.get_device_name(index),
    )
