"""Captured prefill (part of ``cuda_graph`` and ``compile``, not an option of its own): the whole prompt pass
(token embedding, the vision tower, the text decoder, the last position's logits) replayed from a CUDA graph,
one graph per prompt shape.

Why: a GPU prefill run eagerly is host-bound. On the H200 the 2b image prompt issued about 1700 kernel launches
and took 34 ms to the first token against about 11 ms of device work; replayed, a prompt costs its device work.

A graph is keyed by the batch, the prompt length rounded up to ``bucket`` tokens and each image's or video's
grid. Everything else is an input, copied into the graph's buffers before each replay: token ids, M-RoPE
positions, which rows are visual, the pixels, the last real row. A prompt shorter than its bucket is padded at
the end: causal attention keeps the real rows' results those of the unpadded prompt (the padding comes after
them; the kernels may round differently for the longer length), and the cache is told only the real tokens, so
decoding overwrites the padded keys and never attends to them. The first prompt of a key runs once eagerly (the
kernels are chosen), is captured, then replayed; the next prompts of that key are replays. At most ``capacity``
graphs are kept (least recently used dropped), sharing one memory pool. With ``compile`` (``compile``'s
``prefill_compile=true``) the text decoder layers and the ViT blocks run compiled by torch.compile before the
capture (``LayerRegions``): Inductor fuses their norms, rotary, activations and residual adds.

What is not captured takes the reference prefill, and why is counted in ``describe()``: a vision option other
than ``full`` (``conditional`` decides per request whether the ViT runs), a padded batch, a cache that already
holds tokens, or a capture that failed (its error is kept).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from contextlib import contextmanager
from types import MethodType

import torch

from qwen3_vl.generate import Prompt
from qwen3_vl.model.qwen3_vl import visual_inputs
from qwen3_vl.model.text import AttentionMask, DecoderLayer
from qwen3_vl.model.vision import VisionBlock
from qwen3_vl.optim.plan import failure_text


@torch.compiler.disable
def _text_attention_eagerly(attn, q, k, v, mask, cache, attention) -> torch.Tensor:
    return type(attn).cached_attention(attn, q, k, v, mask, cache, attention)


@torch.compiler.disable
def _vision_attention_eagerly(attn, q, k, v, cu_seqlens, attention) -> torch.Tensor:
    return type(attn).segment_attention(attn, q, k, v, cu_seqlens, attention)


class LayerRegions:
    """The prefill's text decoder layers and ViT blocks compiled by torch.compile, one compiled code for all
    layers of a kind ("regional" compilation: their code and shapes are the same, their weights are inputs).

    Why not the whole prefill: compiled whole, each new prompt shape cost a compile of about 20 s on an H100.
    A layer's cache write and attention stay out of the trace (run eagerly between its compiled pieces): the
    write reads the layer's index and the ViT's attention its host segment bounds, either of which would make
    every layer a compile of its own. ``dynamic=None``: the first prompt shape compiles kernels for its sizes,
    the second kernels for any size, and later shapes compile nothing."""

    def __init__(self) -> None:
        import torch._dynamo

        if torch.__version__ < (2, 5):  # from 2.5 on always so: module weights are graph inputs, not per-layer guards
            torch._dynamo.config.inline_inbuilt_nn_modules = True
        self.text = torch.compile(DecoderLayer.forward, dynamic=None)
        self.vision = torch.compile(VisionBlock.forward, dynamic=None)

    @contextmanager
    def active(self, model):
        """Within: the model's layers and blocks run their compiled code (set on the instances, so nothing
        outside, a decode step's own compile included, sees it). A frame that would need more compiles than
        dynamo allows raises instead of running eagerly unnoticed (the prefill then records why)."""
        import torch._dynamo

        patched = []
        strict = {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config,
                                                                  "fail_on_recompile_limit_hit") else {}
        try:
            for layer in model.language_model.layers:
                layer.forward = MethodType(self.text, layer)
                layer.self_attn.cached_attention = MethodType(_text_attention_eagerly, layer.self_attn)
                patched += [(layer, "forward"), (layer.self_attn, "cached_attention")]
            for block in model.visual.blocks:
                block.forward = MethodType(self.vision, block)
                block.attn.segment_attention = MethodType(_vision_attention_eagerly, block.attn)
                patched += [(block, "forward"), (block.attn, "segment_attention")]
            with torch._dynamo.config.patch(**strict):
                yield
        finally:
            for module, name in patched:
                delattr(module, name)


class _Entry:
    """One prompt shape: its device input buffers and, when captured, the graph that reads them."""

    def __init__(self, forward, host: dict[str, torch.Tensor], device: torch.device, grids: dict, reset,
                 capture: bool, pool, first=None) -> None:
        self.static = {name: t.to(device, copy=True) for name, t in host.items()}
        self.grids = grids  # the vision grids' device tensors: the graph reads them, so they live with it
        self.forward = forward
        self.graph = None
        if first is not None:  # an eager run before ``forward`` (a compiled one) is first called
            first(self.static)
            reset()
            if not capture:  # compiled here, so that a compile error is the constructor's (as a capture's is)
                forward(self.static)
                reset()
        if not capture:
            return
        # Warm up on a side stream (kernels chosen, cache buffers allocated), then capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward(self.static)
            reset()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits = forward(self.static)
        finally:
            reset()
        self.graph = graph

    def run(self, host: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in host.items():
            self.static[name].copy_(tensor)
        if self.graph is None:
            return self.forward(self.static)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the buffer


class PrefillGraphs:
    """Prefills through captured graphs (``capture=False``: the same buffers and code, run eagerly; how the
    CPU tests check the logic)."""

    def __init__(self, capacity: int = 8, bucket: int = 64, capture: bool = True, compile: bool = False) -> None:
        if capacity < 0 or bucket < 1:
            raise ValueError(f"prefill graphs need capacity >= 0 and bucket >= 1, got {capacity} and {bucket}")
        self.capacity, self.bucket, self.capture, self.compile = capacity, bucket, capture, compile
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.failed: dict[tuple, str] = {}  # key -> why its capture failed (that shape then runs eagerly)
        self.cache = None  # the cache the graphs write: a new one makes them stale
        self.pool = None
        self.counts: Counter[str] = Counter()  # captured, replayed, and each reason a prefill was not
        self.regions = LayerRegions() if compile else None

    def clear(self) -> None:
        self.entries.clear()
        self.failed.clear()

    def unsupported(self, model, cache, attention_mask) -> str | None:
        if self.capacity == 0:
            return "prefill graphs off (prefill_graphs=0)"
        if model.vision.name != "full":
            return f"vision={model.vision.name} decides per request whether the vision tower runs"
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            return "a padded batch (the masked path)"
        if cache.seen_tokens:
            return "a cache that already holds tokens"
        return None

    def prefill(self, model, cache, prompt: Prompt) -> torch.Tensor | None:
        """Logits [B, 1, V] of the prompt's last position with ``cache`` filled, as ``model.step`` gives them, or
        None where this prompt takes the reference prefill (the reason counted)."""
        reason = self.unsupported(model, cache, prompt.attention_mask)
        if reason:
            self.counts[reason] += 1
            return None
        if cache is not self.cache:
            self.clear()
            self.cache = cache
        ids = prompt.input_ids.cpu()
        visual = visual_inputs(model.config, ids, prompt.pixel_values, prompt.image_grid_thw,
                               prompt.pixel_values_videos, prompt.video_grid_thw)
        batch, n = ids.shape
        length = min(-(-n // self.bucket) * self.bucket, cache.max_tokens)
        grid_key = tuple((kind, tuple(map(tuple, grid.tolist()))) for kind, _, grid, _ in visual)
        key = (batch, length, grid_key, tuple(pixels.dtype for _, pixels, _, _ in visual))
        host = self._host_inputs(model, ids, visual, prompt.positions()[0], length)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.counts["replayed" if entry.graph is not None else "run"] += 1
        else:
            entry = self._new_entry(model, cache, key, host, visual, length)
        logits = entry.run(host)
        self.keep_real_tokens(cache, n, length)
        for observer in model.step_observers:
            observer(logits)
        return logits

    @staticmethod
    def keep_real_tokens(cache, n: int, length: int) -> None:
        """The cache holds ``n`` tokens after a prefill padded to ``length``: decoding writes over the padded
        keys, and a graph-mode decode step, which attends over the whole buffer, sees them as invalid."""
        cache.seen_tokens = n
        if length > n and getattr(cache, "valid", None) is not None:
            cache.valid[:, n:length] = False

    def _new_entry(self, model, cache, key, host, visual, length) -> _Entry:
        grids = {kind: model.visual.prepare(grid, model.rope) for kind, _, grid, _ in visual}

        def eager(inputs):
            return self._forward(model, cache, inputs, grids, length)

        def compiled(inputs):
            with self.regions.active(model):
                return eager(inputs)

        def reset():
            cache.seen_tokens = 0

        # compiled: one eager run first (options choose their kernels outside the trace), then Inductor's
        first, forward = (eager, compiled) if self.compile else (None, eager)

        capture = self.capture and key not in self.failed
        if capture and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            entry = _Entry(forward, host, model.device, grids, reset, capture, self.pool, first)
        except Exception as exc:  # kept and shown in describe(); this shape prefills eagerly from now on
            self.failed[key] = failure_text(exc)
            reset()
            entry = _Entry(eager, host, model.device, grids, reset, False, None)
        self.counts["captured" if entry.graph is not None else "run"] += 1
        if len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        self.entries[key] = entry
        return entry

    @staticmethod
    def _host_inputs(model, ids, visual, positions, length) -> dict[str, torch.Tensor]:
        """The inputs of one prompt, padded to ``length`` tokens, on the host (pixels where they are)."""
        batch, n = ids.shape
        positions = positions.cpu()  # mrope_positions gives them on the ids' device
        padded = torch.full((batch, length), model.config.pad_token_id, dtype=torch.long)
        padded[:, :n] = ids
        pos = torch.empty(3, batch, length, dtype=torch.long)
        pos[..., :n] = positions
        pos[..., n:] = positions[..., n - 1 :] + torch.arange(1, length - n + 1)  # the padding: any position works
        host = {"ids": padded, "positions": pos, "last": torch.arange(batch) * length + n - 1}
        masks = {}
        for kind, pixels, _, mask in visual:
            flat = torch.zeros(batch, length, dtype=torch.bool)
            flat[:, :n] = mask
            masks[kind] = flat.reshape(-1)
            host[f"{kind}_pixels"] = pixels
            host[f"{kind}_rows"] = masks[kind].nonzero().squeeze(1)
        if masks:
            union = masks.get("image", False) | masks.get("video", False)
            host["visual_rows"] = union.nonzero().squeeze(1)
            if len(masks) == 2:  # DeepStack rows of both kinds in sequence order
                for kind, flat in masks.items():
                    host[f"{kind}_order"] = flat[host["visual_rows"]].nonzero().squeeze(1)
        return host

    @staticmethod
    def _forward(model, cache, inputs: dict[str, torch.Tensor], grids: dict, length: int) -> torch.Tensor:
        """``Qwen3VL.embed`` + ``Qwen3VL.step`` on device inputs only, no host reads (what a graph captures)."""
        embeds = model.language_model.embed_tokens(inputs["ids"]).to(model.compute_dtype)
        flat = embeds.view(-1, embeds.shape[-1])
        features = {}
        for kind, grid in grids.items():
            tokens, features[kind] = model.visual.encode(inputs[f"{kind}_pixels"], grid, model.attention)
            flat.index_copy_(0, inputs[f"{kind}_rows"], tokens.to(flat.dtype))
        deepstack = next(iter(features.values())) if len(features) == 1 else None
        if len(features) == 2:
            deepstack = []
            for image, video in zip(features["image"], features["video"], strict=True):
                joint = image.new_empty(inputs["visual_rows"].shape[0], image.shape[-1])
                joint.index_copy_(0, inputs["image_order"], image)
                deepstack.append(joint.index_copy_(0, inputs["video_order"], video))
        cos, sin = model.rope.text(inputs["positions"], embeds.dtype)
        cache.start_step(None, length)
        hidden = model.language_model(embeds, cos[:, None], sin[:, None], AttentionMask(None, causal=True), cache,
                                      model.attention, None, deepstack, None, inputs.get("visual_rows"))
        cache.end_step()
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs["last"])
        return model.lm_head(last[:, None])

    def describe(self) -> dict:
        return {"capacity": self.capacity, "bucket": self.bucket, "compiled": self.compile, "shapes": len(self.entries),
                "counts": dict(self.counts), "capture_errors": sorted(set(self.failed.values()))}
