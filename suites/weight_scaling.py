"""Weight quantization must be per output channel: scaling some weight rows scales exactly those outputs.

Runs under ``--suites numerics``, per combination. Why: random-init weights have rows of similar size,
so a quantizer that shares one scale across the whole tensor (per-tensor instead of per-channel, a
scale reduced over the wrong axis) stays within its error budget on them, while trained weights have
outlier channels that such a bug ruins. The invariant holds exactly for a per-row quantizer (symmetric
int8 per row, asymmetric int4 per row group) and for any exact plan, so it is checked on every linear
the plan replaces: the model is rebuilt with every fifth row of each weight matrix multiplied by 16
(a power of two, so the scaling itself is exact), each linear's effective weight is read back by
feeding it the identity, and each row must equal the original row times one scalar.
"""

from __future__ import annotations

import torch

from harness.results import Measurement
from qwen3_vl.model.layers import Linear

PART = "numerics"
FACTOR = 16.0
BOUND = 1e-4  # fp32 compute; a narrower compute dtype adds its own rounding (4 ulps)


def _scaled(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, w in weights.items():
        if w.ndim == 2 and "embed" not in key and w.is_floating_point():
            rows = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
            rows[2::5] = FACTOR
            w = w * rows[:, None]
        out[key] = w.clone()
    return out


def _replaced_linears(model) -> dict[str, torch.nn.Module]:
    """Modules that compute a linear map but are not the plain reference ``Linear`` (quantized ones)."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, Linear)
            and not isinstance(m, torch.nn.Embedding)}


def _where_it_lives(module, default: torch.device) -> torch.device:
    """The device holding the module's weights: the model's, or the host for offloaded layers, which
    hold their host copies between steps (found on an H200: offload_cpu/offload_disk + quantized)."""
    return next((t.device for t in [*module.parameters(), *module.buffers()] if t.numel()), default)


@torch.inference_mode()
def effective_weight(module, device, dtype=torch.float32) -> torch.Tensor:
    """[out, in] as the module applies it: its outputs for the identity, minus its output for zero."""
    eye = torch.eye(module.in_features, device=_where_it_lives(module, torch.device(device)), dtype=dtype)
    return (module(eye) - module(torch.zeros_like(eye[:1]))).float().T.cpu()


def row_residual(plain: torch.Tensor, scaled: torch.Tensor) -> float:
    """max over rows of |scaled_i - d_i plain_i| / |scaled_i| with d_i the best scalar for row i."""
    dot = (scaled * plain).sum(1)
    norm = (plain * plain).sum(1).clamp_min(1e-30)
    d = dot / norm
    residual = (scaled - d[:, None] * plain).norm(dim=1) / scaled.norm(dim=1).clamp_min(1e-30)
    return float(residual.max())


def track_channel_scale_equivariance(bench):
    """Per replaced linear: does scaling weight rows scale exactly those output rows?"""
    import qwen3_vl
    from qwen3_vl.checkpoint import hf_state_dict

    model = bench.model
    plain = _replaced_linears(model)
    if bench.is_reference or not plain:
        return []
    weights = _scaled(hf_state_dict(bench.reference))
    other = qwen3_vl.build(model.config, weights, dtype=model.target.dtype, device=model.device, plan=model.plan)
    scaled = _replaced_linears(other)
    worst, where = 0.0, ""
    for name, module in plain.items():
        if name not in scaled:
            continue
        dtype = model.compute_dtype
        value = row_residual(effective_weight(module, model.device, dtype),
                             effective_weight(scaled[name], model.device, dtype))
        if value > worst or not where:
            worst, where = value, name
    bound = max(BOUND, 4 * torch.finfo(model.compute_dtype).eps)
    ok = worst <= bound
    error = "" if ok else (f"{where}: scaling weight rows by {FACTOR:g} changed other rows' outputs (row residual "
                           f"{worst:.3g} > {bound:.3g}): the quantizer's scales are not per output channel")
    return [("channel_scale_equivariance", Measurement("row_residual", worst, "ratio", status="ok" if ok else "failed",
                                                       error=error, bound=bound, better="lower"))]
