"""The memory planner: given a device budget, which layers stay resident, which stream, and the KV tiers.

Everything the plan counts comes from the model's real tensors after quantization (bytes of each
decoder layer, ViT block, and of what is always resident). Two numbers are estimates and say so
in the report: the activation workspace of a prefill and the KV reserve. What a run really
peaks at is measured by the harness (allocator peak and NVML), never taken from here.

Rules, in order:

1. Always resident on the device: the output matrix (and the embedding when tied to it), norms,
   the ViT's patch embedding / position table / mergers. An untied input embedding stays in host
   memory (``host_embedding``): a decode step looks up one row.
2. Reserved: 5% of the budget (at least 64 MiB) of slack for the allocator's rounding and
   fragmentation and the BLAS workspaces, the activation workspace for a ``prefill``-token prompt and the KV cache for
   ``context`` tokens (for ``kv_cache=hierarchical_kv``, only its hot window on the device plus
   one layer's dequantized older tokens).
3. Whatever remains holds the decoder layers, then the ViT blocks. If not all fit, two streaming
   buffers of the largest streamed unit are set aside and as many decoder layers as fit stay
   resident (the first ones); the rest, and the ViT blocks, stream.
4. A budget below (resident + workspace + KV + two buffers) cannot run: ``MemoryBudgetError``
   names that minimum and what it is made of.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from qwen3_vl.model.layers import CAST_BLOCK_BYTES, Linear

GiB = 1 << 30
MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class MemoryBudgetError(ValueError):
    """The device budget cannot hold even the smallest runnable placement."""


def parse_bytes(text: str | int | float) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"2.5GB"``, ``4294967296`` -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read '{text}' as a memory size; use e.g. 4GiB, 512MiB, 2GB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def module_bytes(module: nn.Module) -> int:
    from qwen3_vl.optim.memory.streaming import storage_key

    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if storage_key(t) not in seen:
            seen.add(storage_key(t))
            total += t.numel() * t.element_size()
    return total


def _aligned_bytes(module: nn.Module) -> int:
    """Bytes of the module packed the way the streamer packs it (64-byte aligned tensors)."""
    from qwen3_vl.optim.memory.streaming import ALIGN, _tensors_of

    return sum((t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN for *_, t in _tensors_of(module))


@dataclass
class MemoryPlan:
    budget: int | None
    resident_layers: list[int]
    streamed_layers: list[int]
    stream_vision: bool
    host_embedding: bool
    fixed_bytes: int  # always-resident weights
    layer_bytes: list[int]
    vision_block_bytes: int  # one block
    vision_blocks: int
    buffer_bytes: int  # both streaming buffers together
    workspace_bytes: int  # estimate
    kv_bytes_per_token: int
    kv_tokens: int  # tokens of KV held on the device in full precision
    kv_reserve_bytes: int  # estimate
    kv_hot_tokens: int | None = None
    notes: list[str] = field(default_factory=list)
    slack_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        vision = 0 if self.stream_vision else self.vision_block_bytes * self.vision_blocks
        return (self.fixed_bytes + sum(self.layer_bytes[i] for i in self.resident_layers) + vision
                + self.buffer_bytes + self.workspace_bytes + self.kv_reserve_bytes + self.slack_bytes)

    def report(self) -> str:
        n = len(self.layer_bytes)
        lines = [
            f"budget:            {human(self.budget) if self.budget else 'none (stream every layer)'}",
            f"resident weights:  {human(self.fixed_bytes)} (output matrix, norms, ViT embeddings and mergers)"
            + (" ; input embedding kept in host memory" if self.host_embedding else ""),
            f"decoder layers:    {len(self.resident_layers)}/{n} resident"
            + (f" ({self.resident_layers[0]}..{self.resident_layers[-1]})" if self.resident_layers else "")
            + f", {len(self.streamed_layers)} streamed; {human(max(self.layer_bytes, default=0))} per layer",
            f"vision blocks:     {self.vision_blocks} {'streamed' if self.stream_vision else 'resident'}, "
            f"{human(self.vision_block_bytes)} each",
            f"stream buffers:    {human(self.buffer_bytes)} (two recycled buffers)",
            f"KV cache:          {human(self.kv_reserve_bytes)} reserved (estimate): {self.kv_tokens} tokens "
            f"x {human(self.kv_bytes_per_token)}/token on the device"
            + (f"; hierarchical hot window {self.kv_hot_tokens} tokens" if self.kv_hot_tokens else ""),
            f"workspace:         {human(self.workspace_bytes)} (estimate for the prefill activations)"
            + (f" + {human(self.slack_bytes)} allocator slack" if self.slack_bytes else ""),
            f"planned device total: {human(self.device_bytes)}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "resident_layers": len(self.resident_layers),
                "streamed_layers": len(self.streamed_layers), "stream_vision": self.stream_vision,
                "host_embedding": self.host_embedding, "planned_device_bytes": self.device_bytes,
                "buffer_bytes": self.buffer_bytes, "kv_hot_tokens": self.kv_hot_tokens,
                "kv_tokens": self.kv_tokens}


def kv_bytes_per_token(model, dtype_bytes: int) -> int:
    t = model.config.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes


def workspace_estimate(model, prefill: int, image_patches: int, dtype_bytes: int) -> int:
    """Activation bytes of the largest prefill step (an estimate; the harness measures the truth).

    Text: the residual stream and norms (~6 x hidden), q/k/v/o (~4 x heads x head_dim), the MLP
    (3 x intermediate), per token; plus one layer's attention scores and probabilities when the
    attention option materializes them (eager). Vision: the same for the ViT over the patches.
    The larger of the two, plus the last position's logits in fp32.
    """
    t, v = model.config.text, model.config.vision
    eager = model.plan is not None and model.plan["attention"].name == "eager"
    text = prefill * (6 * t.hidden_size + 4 * t.num_attention_heads * t.head_dim + 3 * t.intermediate_size)
    text *= dtype_bytes
    if eager:
        text += 2 * t.num_attention_heads * prefill * prefill * 4
    vision = image_patches * (8 * v.hidden_size + 2 * v.intermediate_size) * dtype_bytes
    if eager and image_patches:
        vision += 2 * v.num_heads * image_patches * image_patches * 4
    # fp16/bf16 storage with wider compute: weights are cast at use, a block of at most
    # CAST_BLOCK_BYTES at a time (model/layers.py), plus the output matrix's blocks' logits
    narrow = any(p.element_size() < dtype_bytes for p in model.lm_head.parameters())
    cast = min(CAST_BLOCK_BYTES, max((m.weight.numel() for m in model.modules() if isinstance(m, Linear)), default=0)
               * dtype_bytes) if narrow else 0
    return max(text, vision) + t.vocab_size * 4 * 2 + cast


def plan_memory(model, budget: int | None, *, context: int = 4096, prefill: int = 2048, image_patches: int = 4096,
                dtype_bytes: int = 4, kv_name: str = "dynamic") -> MemoryPlan:
    """Decide the placement for ``budget`` device bytes (None: stream every layer)."""
    text = model.language_model
    layers = list(text.layers)
    layer_bytes = [_aligned_bytes(layer) for layer in layers]
    blocks = list(model.visual.blocks)
    block_bytes = max((_aligned_bytes(b) for b in blocks), default=0)
    streamed_ids = {id(t) for m in [*layers, *blocks] for t in [*m.parameters(), *m.buffers()]}
    host_embedding = not model.config.tie_word_embeddings
    embed_ids = {id(t) for t in [*text.embed_tokens.parameters(), *text.embed_tokens.buffers()]}
    from qwen3_vl.optim.memory.streaming import storage_key

    fixed, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in streamed_ids or storage_key(t) in seen or (host_embedding and id(t) in embed_ids):
            continue
        seen.add(storage_key(t))
        fixed += t.numel() * t.element_size()

    per_token = kv_bytes_per_token(model, dtype_bytes)
    hot = None
    notes = []
    if kv_name == "hierarchical_kv":
        hot = min(context, 512)
        t = model.config.text
        dequant_one_layer = context * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes
        kv_tokens, kv_reserve = hot, hot * per_token + dequant_one_layer
    else:
        kv_tokens, kv_reserve = context, context * per_token
        if kv_name not in ("dynamic", "static"):
            notes.append(f"KV reserve counts kv_cache={kv_name} at full precision (an upper bound)")
    workspace = workspace_estimate(model, prefill, image_patches, dtype_bytes)

    slack = 0 if budget is None else max(64 * MiB, budget // 20)
    everything = fixed + sum(layer_bytes) + block_bytes * len(blocks) + workspace + kv_reserve + slack
    all_layers = list(range(len(layers)))
    if budget is None:
        return MemoryPlan(None, [], all_layers, bool(blocks), host_embedding, fixed, layer_bytes, block_bytes,
                          len(blocks), 2 * max([*layer_bytes, block_bytes]), workspace, per_token, kv_tokens,
                          kv_reserve, hot, notes)
    if budget >= everything:
        return MemoryPlan(budget, all_layers, [], False, host_embedding, fixed, layer_bytes, block_bytes,
                          len(blocks), 0, workspace, per_token, kv_tokens, kv_reserve, hot,
                          [*notes, "everything fits: nothing streams"], slack)
    # Stream the ViT first (it runs once per image), then as few decoder layers as possible.
    buffers = 2 * max([*layer_bytes, block_bytes])
    minimum = fixed + workspace + kv_reserve + buffers + slack
    if budget < minimum:
        raise MemoryBudgetError(
            f"a device budget of {human(budget)} is too small for this model and plan: the minimum is "
            f"{human(minimum)} (always-resident weights {human(fixed)}, two streaming buffers {human(buffers)}, "
            f"KV cache {human(kv_reserve)} for {kv_tokens} tokens, prefill workspace {human(workspace)} for "
            f"{prefill} tokens, allocator slack {human(slack)}). Use a smaller context, int8/int4 weights, "
            f"kv_cache=hierarchical_kv, or a larger budget."
        )
    room = budget - minimum
    resident = []
    for i, nbytes in enumerate(layer_bytes):
        if nbytes > room:
            break
        resident.append(i)
        room -= nbytes
    streamed = [i for i in all_layers if i not in resident]
    stream_vision = bool(blocks)
    if not streamed and block_bytes * len(blocks) <= room + buffers:
        stream_vision, buffers = False, 0  # only the ViT needed streaming, and it fits without buffers
    return MemoryPlan(budget, resident, streamed, stream_vision, host_embedding, fixed, layer_bytes, block_bytes,
                      len(blocks), buffers, workspace, per_token, kv_tokens, kv_reserve, hot, notes, slack)


def plan_with_budget(plan: str | None, budget: str, device: str) -> str:
    """The plan id with its memory option carrying ``budget`` (what ``--memory-budget`` does).

    A named offload option gets ``budget=...``; ``resident`` becomes ``offload_cpu`` on a GPU and
    ``offload_disk`` on a CPU (where a budget limits the RAM holding weights).
    """
    from qwen3_vl.optim.plan import Choice, Plan, PlanError
    from qwen3_vl.optim.registry import get

    parse_bytes(budget)  # validate early
    if plan == "auto":
        raise PlanError("--memory-budget needs an explicit --plan (the auto plan picks its own memory option)")
    parsed = Plan.parse(plan or "")
    memory = parsed["memory"]
    if memory.name == "resident":
        on_gpu = device.startswith("cuda") or (device == "auto" and _cuda_available())
        memory = Choice("offload_cpu" if on_gpu else "offload_disk")
    if "budget" not in get("memory", memory.name).defaults:
        raise PlanError(f"memory={memory.name} takes no budget")
    params = dict(memory.params)
    params["budget"] = budget
    return parsed.with_(memory=Choice(memory.name, tuple(sorted(params.items())))).id


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
