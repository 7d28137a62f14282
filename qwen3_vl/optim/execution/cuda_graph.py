"""CUDA-graph decoding: the whole decode step (embedding, every layer, the LM head) is captured once
and replayed per token, so a token costs one graph launch instead of hundreds of kernel launches
from Python. No host synchronisation per token: tokens are chosen on the device and the end-token
check runs every ``check_every`` steps.

The KV cache is the ``static`` option's (one buffer per layer), in a fixed-shape form: persistent buffers
per (batch, length bucket), reused across ``generate`` calls and written at a device-side position, with
attention over the whole bucket and a validity mask (keys past the current position are masked, so the
result is the same up to float reassociation); the step's attention is ``DecodeAttention`` (eager's
formula with the KV heads not repeated). The prefill is replayed from a graph captured per prompt shape
(``prefill_graph.py``; ``prefill_graphs=0`` turns that off); where it is not, it runs eagerly with fewer
launches: no validity mask unless the prompt is padded, and each text RMSNorm as one fused call
(``FusedRMSNorm``).

With ``compile=True`` (the ``compile`` option) the step is first compiled by torch.compile
(Inductor/Triton: fused elementwise kernels), then captured the same way.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from qwen3_vl.generate import DecodeRequest, decode_loop
from qwen3_vl.model.layers import RMSNorm
from qwen3_vl.optim.attention.eager import grouped_softmax_attention
from qwen3_vl.optim.execution.fusion import fuse_projections
from qwen3_vl.optim.execution.prefill_graph import PrefillGraphs
from qwen3_vl.optim.kv_cache.common import KVShape
from qwen3_vl.optim.kv_cache.static import StaticCache
from qwen3_vl.optim.plan import Optimization, Requirements, Target, failure_text


class GraphStaticCache(StaticCache):
    """A ``StaticCache`` that, after the prefill, can be written at a device-side position.

    In graph mode ``update`` returns the whole buffers and a [B, T] validity mask, so every decode
    step has the same shapes and addresses (what a CUDA graph replays).
    """

    def __init__(self, shape: KVShape, batch: int, max_tokens: int, device: torch.device) -> None:
        super().__init__(shape, batch, max_tokens)
        self.valid = torch.zeros(batch, max_tokens, dtype=torch.bool, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph_mode = False
        self.padded = False  # whether any prefill so far had padding

    def reset(self) -> None:
        self.valid.zero_()
        self.seen_tokens, self._pending, self.graph_mode, self.padded = 0, 0, False, False

    def enter_graph_mode(self) -> None:
        self.position.fill_(self.seen_tokens)
        self.graph_mode = True

    def start_step(self, new_mask, num_new: int) -> None:
        if not self.graph_mode:
            self.padded = self.padded or new_mask is not None
            return super().start_step(new_mask, num_new)
        self.valid.index_fill_(1, self.position, True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self.graph_mode:
            # Without padding every cached key is valid: no mask, so attention takes its causal path
            # instead of a masked one that checks for empty rows on the host every layer (on the
            # H200, 2b image prompt: 66 -> 56 ms to the first token).
            keys, values, valid = super().update(layer, k, v)
            return keys, values, (valid if self.padded else None)
        self.keys[layer].index_copy_(2, self.position, k)
        self.values[layer].index_copy_(2, self.position, v)
        return self.keys[layer], self.values[layer], self.valid

    def end_step(self) -> None:
        if not self.graph_mode:
            return super().end_step()
        self.position.add_(1)


class FusedRMSNorm(RMSNorm):
    """The text decoder's RMSNorm as one ``F.rms_norm`` call on the fp32 upcast: the same formula (its
    sum of squares reassociated), 4 launches instead of about 8. An eager prefill is launch-bound on a GPU
    (2b image prompt on the H200: about 2670 launches, 53 ms of host time, 11 ms of device time); there,
    with the unmasked prefill above, 66 -> 47 ms to the first token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return self.weight.to(dtype) * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(dtype)


class DecodeAttention:
    """The attention of a captured decode step under the exact options (``NEEDS``: eager, sdpa): one query
    over the whole cache bucket with its validity mask, as ``grouped_softmax_attention`` (eager's formula,
    KV heads not repeated). The plan's option keeps the prefill and the vision tower. H200, 2b: repeating
    K and V was 56 copies of 2 MB per step; sdpa's one-query path also replaced empty rows, which a decode
    query (its own key always valid) cannot have."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name

    def text(self, q, k, v, mask, scale: float) -> torch.Tensor:
        if q.shape[2] != 1:
            return self.inner.text(q, k, v, mask, scale)
        allowed = None if mask.key_valid is None else mask.key_valid[:, None, None, :]
        return grouped_softmax_attention(q, k, v, allowed, scale)

    def vision(self, q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
        return self.inner.vision(q, k, v, cu_seqlens, scale)


@contextlib.contextmanager
def decode_attention(model):
    """``model.attention`` as ``DecodeAttention`` while a decode step is traced, captured or run uncaptured."""
    inner = model.attention
    model.attention = DecodeAttention(inner)
    try:
        yield
    finally:
        model.attention = inner


EOS_SLOTS = 16  # end tokens the captured step checks itself; a request with more decodes eagerly


class CapturedStep:
    """One decode step captured in a CUDA graph with its static input and output buffers.

    A replay first commits the token of the current index: the host's choice (``token``, with
    ``host_choice`` set: sampling, or end tokens banned before ``min_new_tokens``) or else the greedy
    choice the previous replay left in ``greedy``; finished rows get the pad id. It writes it to ``out``,
    marks rows that reached an end token in ``finished``, then runs the model on it and leaves the next
    greedy choice. So a greedy decode is one graph launch per token, with nothing else on the host or the
    device between two replays. With ``capture=False`` the same step runs uncaptured (how the CPU tests
    check the logic)."""

    def __init__(self, model, cache: GraphStaticCache, compile_step: bool, capture: bool = True) -> None:
        batch, device = cache.batch, cache.valid.device
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, **long)  # the host's choice, read when host_choice is set
        self.greedy = torch.zeros(batch, **long)  # argmax of the last step's logits
        self.host_choice = torch.ones(1, dtype=torch.bool, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.pad = torch.zeros(1, **long)
        self.eos = torch.full((EOS_SLOTS,), -1, **long)  # -1: an unused slot (no token id matches it)
        self.out = torch.zeros(batch, cache.max_tokens, **long)
        self.index = torch.zeros(1, **long)  # where in ``out`` the next commit goes
        self.position = torch.zeros(1, batch, 1, **long)
        self.cache, self.model = cache, model

        def step():
            token = self.commit()
            embeds = model.language_model.embed_tokens(token[:, None]).to(model.compute_dtype)
            logits = model.step(embeds, self.position.expand(3, batch, 1), None, cache)
            self.position.add_(1)
            self.greedy.copy_(logits[:, -1].float().argmax(dim=-1))
            return logits[:, -1]

        self.eager_fn = step
        self.fn = torch.compile(step, dynamic=False) if compile_step else step
        self.graph = None
        if not capture:
            return
        observers, model.step_observers = model.step_observers, []  # warm-up logits are not real steps
        try:
            with decode_attention(model):
                self._capture(model, cache, compile_step)
        finally:
            model.step_observers = observers

    def begin(self, request: DecodeRequest) -> None:
        """Set the request's pad and end tokens, no row finished, the first commit at index 0."""
        self.position.copy_(request.next_position)
        self.pad.fill_(request.pad)
        self.eos.fill_(-1)
        if request.eos:
            self.eos[: len(request.eos)] = torch.tensor(request.eos, dtype=torch.long)
        self.finished.zero_()
        self.index.zero_()

    def commit(self) -> torch.Tensor:
        """The token of the current index (host's or greedy, pad where finished) written to ``out``, its rows'
        end marked; a replay's first half, and run alone for the last token (no model step on it)."""
        token = torch.where(self.finished, self.pad, torch.where(self.host_choice, self.token, self.greedy))
        self.out.index_copy_(1, self.index, token[:, None])
        self.index.add_(1)
        # not torch.isin: for one token against the slots it sorts, which a capture does not allow
        self.finished.logical_or_((token[:, None] == self.eos).any(dim=-1))
        return token

    def state(self) -> tuple[torch.Tensor, ...]:
        """What running the step advances (cache position and validity, the step's position, its commit
        index, finished rows and greedy choice), to restore."""
        return tuple(t.clone() for t in self._advanced())

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        for tensor, saved in zip(self._advanced(), state, strict=True):
            tensor.copy_(saved)

    def _advanced(self) -> tuple[torch.Tensor, ...]:
        return self.cache.position, self.cache.valid, self.position, self.index, self.finished, self.greedy

    def _capture(self, model, cache: GraphStaticCache, compile_step: bool) -> None:
        device = cache.valid.device
        saved = self.state()
        if compile_step:  # one eager step first: options pick their kernels outside the trace
            self.eager_fn()
            self.restore(saved)
        # Warm up on a side stream (compiles, picks kernels), then restore the cache state the
        # warm-up advanced, then capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3 if compile_step else 2):
                self.fn()
                self.restore(saved)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn()
        self.restore(saved)

    def run(self) -> torch.Tensor:
        """Commit the current token, then the logits [B, V] of the step on it."""
        if self.graph is None:
            with decode_attention(self.model):
                return self.fn()
        self.graph.replay()
        for observer in self.model.step_observers:  # a copy: the next replay overwrites the buffer
            observer(self.logits[:, None].clone())
        return self.logits


class CudaGraphExecution:
    name = "cuda_graph"

    def __init__(self, model, target: Target, fuse: bool = True, bucket: int = 256, check_every: int = 8,
                 compile_step: bool = False, capture: bool = True, prefill_graphs: int = 8,
                 prefill_bucket: int = 64, host_choice: bool = False, prefill_compile: bool = False) -> None:
        if capture and (not torch.cuda.is_available() or target.device_type != "cuda"):
            raise RuntimeError("CUDA-graph execution needs a CUDA device")
        self.capture = capture
        self.fused_layers = fuse_projections(model) if fuse else 0
        self.fused_norms = 0
        for module in model.language_model.modules():
            if type(module) is RMSNorm:
                module.__class__ = FusedRMSNorm
                self.fused_norms += 1
        self.bucket, self.check_every, self.compile_step = bucket, check_every, compile_step
        self.host_choice = host_choice  # the host chooses every token, greedy too (to measure the difference)
        self.device = torch.device(target.device)
        self.cache: GraphStaticCache | None = None
        self.captured: CapturedStep | None = None
        self.captures = 0
        self.capture_error = ""  # why capture failed, when it did (decoding then runs eagerly)
        self.prefills = PrefillGraphs(prefill_graphs, prefill_bucket, capture, prefill_compile)

    def prefill(self, model, cache, prompt) -> torch.Tensor | None:
        """The prompt's last logits through a captured prefill, or None for the reference prefill (see
        ``prefill_graph.py``)."""
        return self.prefills.prefill(model, cache, prompt)

    def new_cache(self, model, batch: int, max_tokens: int) -> GraphStaticCache:
        tokens = math.ceil(max_tokens / self.bucket) * self.bucket
        cache = self.cache
        if cache is None or cache.batch != batch or cache.max_tokens < tokens:
            self.cache = GraphStaticCache(KVShape.of(model), batch, tokens, self.device)
            self.captured = None  # new buffers: the old graph points at the old ones
        self.cache.reset()
        return self.cache

    def decode(self, model, request: DecodeRequest) -> torch.Tensor:
        cache = request.cache
        if not isinstance(cache, GraphStaticCache):
            raise RuntimeError("CUDA-graph decoding needs the cache made by its own new_cache()")
        if self.capture_error or len(request.eos) > EOS_SLOTS:
            return decode_loop(model, request)
        cache.enter_graph_mode()
        if self.captured is None:
            try:
                self.captured = CapturedStep(model, cache, self.compile_step, self.capture)
            except Exception as exc:  # recorded and visible in describe(); this model decodes eagerly
                self.capture_error = failure_text(exc)
                cache.graph_mode = False
                warnings.warn(f"{self.name}: capturing the decode step failed, decoding eagerly: "
                              f"{self.capture_error}", RuntimeWarning, stacklevel=2)
                return decode_loop(model, request)
            self.captures += 1
        step = self.captured
        step.begin(request)
        logits, host_mode, produced = request.logits[:, -1], None, 0
        for index in range(request.max_new_tokens):
            # The host chooses the first token (from the prefill's logits), sampled ones and those with end
            # tokens banned; otherwise the previous replay's greedy choice is committed by the next one.
            host = self.host_choice or index == 0 or request.do_sample or bool(request.banned(index))
            if host:
                step.token.copy_(request.choose(logits, index, step.finished))
            if host != host_mode:
                step.host_choice.fill_(host)
                host_mode = host
            last = index == request.max_new_tokens - 1
            if last:
                step.commit()
            else:
                logits = step.run()
            produced = index + 1
            if request.streamer is not None:
                request.streamer.put(step.out[:, index].cpu())
            if last or (request.eos and produced % self.check_every == 0 and bool(step.finished.all())):
                break
        cache.seen_tokens = int(cache.position)  # one sync at the end: host bookkeeping catches up
        cache.graph_mode = False
        tokens = step.out[:, :produced].clone()
        if request.eos:  # the reference stops at the first step where every row has ended
            eos_ids = torch.tensor(request.eos, device=self.device, dtype=torch.long)
            ended = torch.isin(tokens, eos_ids).cummax(dim=1).values.all(dim=0)
            last = int(ended.nonzero()[0]) + 1 if bool(ended.any()) else produced
            tokens = tokens[:, :last]
        return tokens

    def describe(self) -> dict:
        return {"option": self.name, "fused_layers": self.fused_layers, "fused_norms": self.fused_norms,
                "captures": self.captures,
                "bucket": self.bucket, "compiled": self.compile_step, "capture_error": self.capture_error,
                "prefill": self.prefills.describe()}


def _no_cuda_reason(target: Target) -> str | None:
    if target.device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda is not available"
    return None


# The decode step must be capturable: no host synchronisation or host-dependent shapes inside it.
# These are the options it is built and tested with.
NEEDS = ("kv_cache=static", "attention=eager|sdpa", "rope=standard", "memory=resident", "quant=none",
         "vision=full|conditional")

OPTION = Optimization(
    name="cuda_graph",
    axis="execution",
    exact=True,
    summary=(
        "Decode step captured once in a CUDA graph and replayed per token (static KV buffers with a "
        "device-side position, fused q/k/v and gate/up projections, tokens chosen on the device, no "
        "per-token host sync); the prefill (vision tower included) replayed from a graph per prompt shape, "
        "lengths bucketed (prefill_graphs graphs kept, 0: eager prefill)."
    ),
    build=lambda model, target, fuse=True, bucket=256, prefill_graphs=8, prefill_bucket=64: CudaGraphExecution(
        model, target, fuse, bucket, prefill_graphs=prefill_graphs, prefill_bucket=prefill_bucket),
    requires=Requirements(devices=("cuda",)),
    probe=_no_cuda_reason,
    needs=NEEDS,
    fallback="eager",
    defaults={"fuse": True, "bucket": 256, "prefill_graphs": 8, "prefill_bucket": 64},
)
