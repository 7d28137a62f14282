"""Weights in pinned host memory, streamed layer by layer into two recycled device buffers.

What stays on the device and what streams is the memory planner's decision for the ``budget``
(``planner.py``; no budget: every decoder layer and ViT block streams). Streaming itself is
``streaming.LayerStreamer``: asynchronous copies on a side stream, the next layer prefetched
while the current one computes, device weight memory for streamed layers = two layers' worth.
Exact: the kernels read the same bytes as a resident run, so logits are bitwise equal.

Needs a CUDA device: on a CPU target there is nothing to offload *to* the device from, so the
plan falls back to ``resident`` with that reason recorded. (The class itself also runs with a
CPU target, streaming into CPU buffers, which is how its bookkeeping is tested without a GPU.)
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3_vl.checkpoint import materialize_mapped
from qwen3_vl.optim.memory.planner import MemoryPlan, parse_bytes, plan_memory
from qwen3_vl.optim.memory.streaming import LayerStreamer, Unit, pack_unit
from qwen3_vl.optim.plan import Optimization, Requirements


def place(model, plan: MemoryPlan, device: torch.device, make_unit) -> tuple[list[Unit], int]:
    """Pack the streamed units (``make_unit(name, module)``) and move everything else to ``device``.

    Streamed units are packed first so their weights never touch the device outside a buffer.
    Returns the units in execution order (ViT blocks, then decoder layers) and resident bytes.
    """
    units = []
    if plan.stream_vision:
        units += [make_unit(f"visual.blocks.{i}", b) for i, b in enumerate(model.visual.blocks)]
    layers = model.language_model.layers
    units += [make_unit(f"language_model.layers.{i}", layers[i]) for i in plan.streamed_layers]
    streamed = {id(m) for u in units for m in u.module.modules()}
    embed = model.language_model.embed_tokens
    kept_on_host = {id(m) for m in embed.modules()} if plan.host_embedding else set()
    moved, resident = set(), 0
    for module in model.modules():
        if id(module) in streamed or id(module) in kept_on_host:
            continue
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or id(t) in moved:
                    continue
                moved.add(id(t))
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(device)
                else:
                    table[name] = t.to(device)
                if device.type == "cpu":  # a CPU "device" (tests): copy out of a checkpoint mapping too
                    materialize_mapped([t if isinstance(t, nn.Parameter) else table[name]])
                resident += t.numel() * t.element_size()
    if plan.host_embedding:
        keep_embedding_on_host(embed, device)
    return units, resident


def keep_embedding_on_host(embed: nn.Module, device: torch.device) -> None:
    """Look rows up in host memory and send only the looked-up rows to the device."""
    embed.register_forward_pre_hook(lambda module, args: (args[0].to("cpu"),))
    embed.register_forward_hook(lambda module, args, output: output.to(device, non_blocking=True))


class OffloadedWeights:
    name = "offload_cpu"

    def __init__(self, model, target, budget: str | int = "", context: int = 4096, prefill: int = 2048,
                 slots: int = 2) -> None:
        self.device = torch.device(target.device)
        budget_bytes = parse_bytes(budget) if budget not in ("", 0) else None
        dtype_bytes = 4 if model.compute_dtype == torch.float32 else 2
        kv = model.plan["kv_cache"].name if model.plan is not None else "dynamic"
        self.plan = plan_memory(model, budget_bytes, context=context, prefill=prefill, dtype_bytes=dtype_bytes,
                                kv_name=kv)
        self.kv_hot_tokens = self.plan.kv_hot_tokens
        pin = self.device.type == "cuda"
        units, self.resident_bytes = place(model, self.plan, self.device, lambda n, m: pack_unit(n, m, pin=pin))
        first_layer = len(model.visual.blocks) if self.plan.stream_vision else 0
        self.streamer = None
        if units:
            self.streamer = LayerStreamer(units, self.device, slots, wrap_to=first_layer % len(units))

    def describe(self) -> dict:
        stats = self.streamer.stats() if self.streamer else {"streamed_units": 0, "device_buffer_bytes": 0}
        return {"device_weight_bytes": self.resident_bytes + stats["device_buffer_bytes"],
                "offloaded_bytes": sum(u.nbytes for u in self.streamer.units) if self.streamer else 0,
                **self.plan.to_dict(), **stats}

    def report(self) -> str:
        return self.plan.report()


OPTION = Optimization(
    name="offload_cpu",
    axis="memory",
    exact=True,
    summary="Weights in pinned host memory, streamed layer by layer into two recycled device buffers "
    "(async side-stream copies, next layer prefetched); the planner keeps what fits the budget resident.",
    build=lambda model, target, **params: OffloadedWeights(model, target, **params),
    requires=Requirements(devices=("cuda",)),
    fallback="resident",
    defaults={"budget": "", "context": 4096, "prefill": 2048, "slots": 2},
    variants=({"budget": ""}, {"budget": "2GiB"}, {"budget": "4GiB"}),
)
