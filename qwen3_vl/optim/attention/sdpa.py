"""torch.nn.functional.scaled_dot_product_attention with the backends the hardware allows.

Backend rules (PyTorch ``sdp_utils``): flash and cuDNN need sm80+ and fp16/bf16; the
memory-efficient kernel runs from sm50 but below sm80 takes fp16/fp32 only; math runs anywhere.
On CPU, "flash" is PyTorch's fused CPU kernel. ``enable_gqa`` removes the memory-efficient kernel
from the candidates (below sm80 that means falling back to math), so for that kernel the KV heads
are expanded instead.

Each call shape class (device, dtype, head_dim, decode or prefill, kind of mask) is tried once
against the candidate backends, best first, each enabled alone; the first that runs is kept for
that class and every call is counted under the backend that actually ran (``describe()``).
Causal attention with fewer queries than keys is bottom-right aligned (the queries are the last
ones), which ``is_causal`` does not do, so those calls pass an explicit mask.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen3_vl.hardware.device import storage_and_compute
from qwen3_vl.optim.attention.common import by_segment_length, empty_rows, mean_value_rows
from qwen3_vl.optim.attention.eager import repeat_kv
from qwen3_vl.optim.plan import Optimization, Target, failure_text

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# Backends that accept enable_gqa (the memory-efficient one drops out when it is set).
_NATIVE_GQA = {"flash", "cudnn", "math"}


def candidate_backends(target: Target) -> tuple[list[str], list[str]]:
    """Backends to try on ``target``, best first, and why the others are left out."""
    notes: list[str] = []
    compute = storage_and_compute(target.dtype)[1]
    if target.device_type == "cpu":
        names = ["flash", "math"]
        notes.append("cpu: fused CPU flash kernel or math (efficient/cuDNN kernels are CUDA-only)")
    else:
        cc = tuple(target.compute_capability or (0, 0))
        names = []
        half = compute in (torch.float16, torch.bfloat16)
        for name in ("flash", "cudnn"):
            if cc < (8, 0):
                notes.append(f"{name}: needs sm80+, GPU is sm_{cc[0]}{cc[1]}")
            elif not half:
                notes.append(f"{name}: takes fp16/bf16 only, compute dtype is fp32")
            else:
                names.append(name)
        if cc < (5, 0):
            notes.append(f"efficient: needs sm50+, GPU is sm_{cc[0]}{cc[1]}")
        elif cc < (8, 0) and compute == torch.bfloat16:
            notes.append("efficient: below sm80 takes fp16/fp32 only, compute dtype is bf16")
        else:
            names.insert(1 if "flash" in names else 0, "efficient")
        names.append("math")
    if target.emulated_profile:
        from qwen3_vl.hardware.profiles import get_profile

        allowed = get_profile(target.emulated_profile).sdpa_backends
        dropped = [n for n in names if n not in allowed]
        if dropped:
            notes.append(f"emulating {target.emulated_profile}: no {', '.join(dropped)}")
        names = [n for n in names if n in allowed] or ["math"]
    return names, notes


class SdpaAttention:
    name = "sdpa"

    def __init__(self, target: Target, backends: str = "auto") -> None:
        self.candidates, self.notes = candidate_backends(target)
        if backends != "auto":
            wanted = backends.split("+")
            unknown = [b for b in wanted if b not in BACKENDS]
            if unknown:
                raise ValueError(f"unknown SDPA backend '{unknown[0]}'; backends are: {', '.join(BACKENDS)}")
            missing = [b for b in wanted if b not in self.candidates]
            self.notes += [f"{b}: requested but not available on this target" for b in missing]
            self.candidates = [b for b in self.candidates if b in wanted] or ["math"]
        self.chosen: dict[tuple, tuple[str, bool]] = {}  # call class -> (backend, native GQA)
        self.ran: Counter[tuple[str, str]] = Counter()  # (call kind, backend) -> calls
        self.last: str | None = None  # backend of the latest call

    def describe(self) -> dict:
        ran: dict[str, dict[str, int]] = {}
        for (kind, backend), n in sorted(self.ran.items()):
            ran.setdefault(kind, {})[backend] = n
        return {"option": self.name, "candidates": list(self.candidates), "notes": list(self.notes), "ran": ran}

    # -------------------------------------------------------------------------------------------

    def _attempts(self, grouped: bool):
        for backend in self.candidates:
            if grouped and backend in _NATIVE_GQA:
                yield backend, True
            yield backend, False

    def _call(self, backend, native_gqa, q, k, v, attn_mask, is_causal, scale):
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and not native_gqa:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=native_gqa and groups > 1
            )

    def run(self, kind: str, q, k, v, attn_mask, is_causal: bool, scale: float) -> torch.Tensor:
        grouped = q.shape[1] != k.shape[1]
        mask_kind = "none" if attn_mask is None else ("batch" if attn_mask.shape[0] > 1 else "shared")
        key = (q.device.type, q.dtype, q.shape[-1], kind, mask_kind, is_causal, grouped)
        choice = self.chosen.get(key)
        if choice is not None and torch.compiler.is_compiling():
            # Inside torch.compile: the kernel chosen eagerly for this call class, and no Python
            # bookkeeping (a counter read in the trace would be guarded on, recompiling every call).
            return self._call(*choice, q, k, v, attn_mask, is_causal, scale)
        if choice is not None:
            try:
                out = self._call(*choice, q, k, v, attn_mask, is_causal, scale)
                self.ran[(kind, choice[0])] += 1
                self.last = choice[0]
                return out
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # a shape the kept kernel rejects (constraints can depend on lengths): choose again
                pass
        errors = []
        for backend, native in self._attempts(grouped):
            try:
                with warnings.catch_warnings():  # PyTorch warns why each disabled kernel was skipped
                    warnings.simplefilter("ignore")
                    out = self._call(backend, native, q, k, v, attn_mask, is_causal, scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                errors.append(f"{backend}: {failure_text(exc, limit=400)}")
                continue
            self.chosen[key] = (backend, native)
            self.ran[(kind, backend)] += 1
            self.last = backend
            return out
        raise RuntimeError("no SDPA backend ran: " + "; ".join(errors))

    # -------------------------------------------------------------------------------------------

    def text(self, q, k, v, mask, scale: float) -> torch.Tensor:
        lq, lk = q.shape[2], k.shape[2]
        kind = "decode" if lq == 1 else "prefill"
        if mask.key_valid is None and (not mask.causal or lq == 1):
            return self.run(kind, q, k, v, None, False, scale)
        if mask.key_valid is None and lq == lk:
            return self.run(kind, q, k, v, None, True, scale)
        allowed = mask.allowed(lq, lk, q.device)
        # A row that sees nothing (a padding query) gets eager's answer, the mean of all values;
        # it is unmasked for the kernel (an all-masked row gives NaN in some backends) and replaced.
        empty = empty_rows(allowed)
        out = self.run(kind, q, k, v, allowed | empty, False, scale)
        # For one query the replacement is applied unconditionally (cheap: one pass over V) rather
        # than after checking on the host: a decode step must not read anything back, or it could
        # not be captured in a CUDA graph.
        if lq == 1 or bool(empty.any()):
            out = torch.where(empty, mean_value_rows(v, q.shape[1] // k.shape[1]).to(out.dtype), out)
        return out

    def vision(self, q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
        return by_segment_length(q, k, v, cu_seqlens, lambda q, k, v: self.run("vision", q, k, v, None, False, scale))


OPTION = Optimization(
    name="sdpa",
    axis="attention",
    exact=True,
    summary=(
        "torch scaled_dot_product_attention with the best backend the hardware allows (flash/efficient/cuDNN/"
        "math on CUDA, fused flash or math on CPU); expands KV heads for the mem-efficient kernel; records "
        "the backend that ran; ViT segments of one length in one call. CPU, 2b shapes: 0.09-0.35x eager's "
        "time at 7-120x less peak memory (the profiles' default)."
    ),
    build=lambda model, target, backends="auto": SdpaAttention(target, backends),
    fallback="eager",
    probe=lambda target: None if hasattr(F, "scaled_dot_product_attention") else "torch has no SDPA",
    defaults={"backends": "auto"},
)
