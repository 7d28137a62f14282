"""The one place where options are registered.

Every option lives in its own module ``qwen3_vl/optim/<axis>/<option>.py`` exposing ``OPTION``
(an ``Optimization``). Adding an option means adding its module and one line to ``_MODULES``;
the harness discovers it from here with no change of its own.

What ``OPTION.build(model, target, **params)`` returns, per axis:

- ``attention``: an object with ``text(q, k, v, mask, scale)`` (q ``[B, Hq, Lq, d]``, k/v
  ``[B, Hkv, Lk, d]`` unexpanded, ``mask`` a ``qwen3_vl.model.text.AttentionMask``; returns
  ``[B, Hq, Lq, d]``) and ``vision(q, k, v, cu_seqlens, scale)`` (``[S, H, d]`` each,
  block-diagonal over ``cu_seqlens``, int32 segment bounds on the host, so reading them costs no device
  synchronisation; returns ``[S, H, d]``).
- ``rope``: an object with ``text(positions, dtype)`` (positions ``[3, B, L]``; returns cos, sin
  ``[B, L, head_dim]``) and ``vision(rows, cols)`` (returns fp32 cos, sin ``[S, vision_head_dim]``).
- ``kv_cache``: an object with ``new(batch, max_tokens)`` returning a cache with
  ``start_step(new_mask, num_new)``, ``update(layer, k, v) -> (k_all, v_all, key_valid)``,
  ``end_step()``, ``seen_tokens`` and ``nbytes()``.
- ``memory``: places the weights for the target device (called after ``quant``); returns an
  object with ``describe() -> dict``.
- ``quant``: rewrites the model's weight storage (module swap); returns an object with
  ``describe() -> dict``.
- ``vision``: an object with ``encode(model, pixel_values, grid_thw) -> (tokens, deepstack)``,
  ``before_llm(...)`` (may drop visual rows before the decoder), ``layer_hook`` (None, or a hook
  run before every decoder layer of a visual prefill) and ``reuses_prefix``; the defaults and
  signatures are in ``qwen3_vl/optim/vision/full.py``. Pruning options return logits for the
  kept positions only, so compare them to the reference at the last position.
- ``execution``: an object with ``new_cache(model, batch, max_tokens)`` (``model.new_cache``
  goes through it), ``decode(model, request) -> tokens [B, n]`` (the decode loop after the
  prefill; see ``qwen3_vl.generate.DecodeRequest``) and ``describe() -> dict``.
"""

from __future__ import annotations

import importlib

from qwen3_vl.optim.plan import Optimization, Plan, PlanError, make_plan

# Axis order is the order of the plan id. Each axis has exactly one option marked reference=True.
AXES: tuple[str, ...] = ("attention", "rope", "kv_cache", "memory", "quant", "vision", "execution")

_MODULES: tuple[str, ...] = (
    "attention.eager",
    "attention.sdpa",
    "attention.tiled",
    "attention.flash_kv",
    "attention.block_sparse",
    "attention.dynamic_sparse",
    "rope.standard",
    "rope.cached",
    "rope.approximated",
    "rope.interpolated",
    "kv_cache.dynamic",
    "kv_cache.static",
    "kv_cache.quant_int8",
    "kv_cache.quant_int4",
    "kv_cache.sink_window",
    "kv_cache.h2o",
    "kv_cache.cross_layer",
    "kv_cache.hierarchical_kv",
    "memory.resident",
    "memory.offload_cpu",
    "memory.offload_disk",
    "quant.none",
    "quant.int8_weight",
    "quant.int4_weight",
    "vision.full",
    "vision.conditional",
    "vision.prune_fastv",
    "vision.prune_pre",
    "execution.eager",
    "execution.cuda_graph",
    "execution.compile",
    "execution.cpu_packed",
)

_OPTIONS: dict[tuple[str, str], Optimization] | None = None


def _load() -> dict[tuple[str, str], Optimization]:
    global _OPTIONS
    if _OPTIONS is None:
        found: dict[tuple[str, str], Optimization] = {}
        for module in _MODULES:
            opt = importlib.import_module(f"qwen3_vl.optim.{module}").OPTION
            axis_dir, file_name = module.split(".")
            if (opt.axis, opt.name) != (axis_dir, file_name):
                raise PlanError(f"option module {module} registers {opt.axis}={opt.name}; names must match")
            if opt.axis not in AXES:
                raise PlanError(f"option {opt.name} is on unknown axis {opt.axis}")
            found[(opt.axis, opt.name)] = opt
        for axis in AXES:
            refs = [o for o in found.values() if o.axis == axis and o.reference]
            if len(refs) != 1:
                raise PlanError(f"axis {axis} needs exactly one reference option, has {len(refs)}")
        _OPTIONS = found
    return _OPTIONS


def all_options() -> list[Optimization]:
    return list(_load().values())


def options(axis: str) -> list[Optimization]:
    if axis not in AXES:
        raise PlanError(f"unknown axis '{axis}'; axes are: {', '.join(AXES)}")
    return [opt for opt in _load().values() if opt.axis == axis]


def get(axis: str, name: str) -> Optimization:
    try:
        return _load()[(axis, name)]
    except KeyError:
        names = ", ".join(o.name for o in options(axis))
        raise PlanError(f"unknown option '{name}' for axis '{axis}'; options are: {names}") from None


def reference_option(axis: str) -> Optimization:
    return next(opt for opt in options(axis) if opt.reference)


def reference_plan() -> Plan:
    return make_plan({})
