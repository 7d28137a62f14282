"""CPU execution: the decoder's weights in the layout the CPU's GEMV kernels read fastest, fused
projections and fewer operations per layer. Exact (float reassociation only).

A decode step is memory-bound: it reads every text weight once (mini: 1.23 GB in fp32), so what
matters is how close each matrix-vector product gets to the memory bandwidth, and then how little
else a step does. Measured on the 2-core CI machine (one thread, mini, every weight cold): plain
``F.linear`` on fp32 weights reads about 19 GB/s, MKL's packed sgemm about 26 GB/s; on bf16
weights ``F.linear`` about 15 GB/s, oneDNN's prepacked bf16 matmul about 32 GB/s; and the model's
own fp16-storage path (each weight cast to fp32 whole, every call) about 2 GB/s.

Kernels (``kernel`` parameter; ``auto`` takes the first of ``available_kernels(storage)``):

- ``mkl`` (fp32 weights): ``torch.ops.mkl._mkl_linear`` on a copy of the weight packed by MKL for
  one row; inputs of other row counts (prefill) take ``F.linear`` on the original weight, which
  therefore stays: the packed copy is extra memory (reported by ``describe``).
- ``mkldnn`` (fp32 or bf16 weights): oneDNN's prepacked matmul (``torch.ops.mkldnn``) for every
  row count; the packed weight replaces the original (a tied output matrix keeps the original
  for the embedding lookups).
- ``avx2`` (fp32, fp16 or bf16 weights): our GEMV (``qwen3_vl/kernels``) for decode rows, fp32
  accumulation; fp16/bf16 weights are held in its eight-row interleaved layout (replacing the
  original), which reads 23 GB/s of fp16 on the CI machine against ``fp16_chunks``' 15; prefill
  takes PyTorch's GEMMs (fp16/bf16: the ``fp16_chunks`` block cast from the interleaved copy).
- ``fp16_chunks`` (fp16 storage, fp32 compute): the weight is cast to fp32 a block of rows at a
  time into a buffer that stays in cache, then multiplied in fp32: the same products as the
  reference's whole-matrix cast, reading 2 bytes per weight instead of 10 (read, write, re-read).
- ``none``: no packing (fusion and the lighter layers only).

Only plain ``Linear`` layers of the text decoder and the output matrix are repacked; quantized
layers (``quant=int8_weight`` / ``int4_weight``) keep their own kernels, and the vision tower keeps
its layers (its cost is prefill compute, where packing was not faster). q/k/v and gate/up are fused
(``fusion.py``) before packing. Each decoder layer then runs with fewer operations: one
``rms_norm`` call per norm for fp32 activations (in a decode step our single-threaded kernel:
PyTorch's composite op spent 3.9 of a 26 ms int8 mini step in 48 norms on the AVX2 machine), and in
a decode step one call each for the q/k norms and rotary, the attention over the cache (under the
exact attention options, sdpa and eager; approximate ones keep their own algorithm) and the MLP's
``silu(gate) * up`` (in-process A/B, int8 mini step: 26.6 -> 25.2 ms for the last two).

``huge_pages`` (default on): the text weights, in whatever form the kernels read them, are copied
into 2 MiB pages (``qwen3_vl/hardware/huge_pages.py``: a decode step streams every weight once,
and 4 KiB pages cost a TLB miss every 4 KiB; our GEMV read 23.2 -> 26.8 GB/s over mini's weights).
``describe()`` reports how many bytes the kernel actually backed, or why none were asked for.
oneDNN's packed weights are opaque and stay where oneDNN put them.

``batch_invariant`` (default off): every row of the text decoder, prefill rows included, runs through
our kernels (the GEMVs, norms, q/k norm + rotary, causal attention over the cache, activation), whose
per-row sums run in an order that does not depend on how many rows or sequences a call holds. A row
then gives the same bits in a prefill, a decode step or a turn prefilled over a reused cache, so a
``vision=conditional`` session's reused prefix is bitwise a full recompute (PyTorch's GEMMs and SDPA
block by row count, which is why the two otherwise differ in the last bits). Needs our AVX2 kernels,
fp32 compute, an exact attention option (sdpa, eager) and, quantized, int8/int4's avx2 kernels; refused
with the reason otherwise. Measured on mini (AVX2 CI machine, 115-token image prompt, one process): fp32
prefill 500 ms against the default plan's 653 (our GEMV takes prefill rows three at a time through shared
weight loads, ~100 GFLOP/s), int8 821 against 644 (the default dequantizes blocks for a GEMM); decode
unchanged. A second turn reusing its prefix: 0.11 s against 1.51 s recomputed (run
``20261203T154119Z-c0a392``, 228-token prompt).

``screened_argmax`` (default on): greedy decode steps choose their token through an int8 copy of the
output matrix, recomputing with our GEMV only the rows an error bound cannot rule out
(``screened_argmax.py``), so they skip most of the largest read of the step; the tokens are bitwise those
of the full logits, which sampling, observers that need logits and ``model(...)`` still compute. Costs
1 byte per output-matrix weight of memory (mini: 150 MiB) and about 1 s at build. Mini fp32 on the AVX2
machine, in one process: 54 against 74 ms/token. Needs the output matrix on our avx2 kernel and fp32
compute; ``describe()`` says why it is off otherwise, and how many rows it recomputed.

``threads`` (0: leave the process's setting) runs prefill and decode with that many threads and
restores the setting afterwards: on a machine whose cores are busy with other work, OpenMP with
more threads than free cores waits at every barrier (measured on the CI machine under a load of 4:
a mini fp32 decode step took 720 ms with 2 threads, 64 ms with 1).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from qwen3_vl.generate import DecodeRequest, decode_loop
from qwen3_vl.hardware.huge_pages import move_to_huge_pages
from qwen3_vl.hardware.huge_pages import unavailable_reason as huge_pages_reason
from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.model.layers import Linear, RMSNorm, apply_rotary
from qwen3_vl.model.text import AttentionMask, DecoderLayer
from qwen3_vl.optim.execution import screened_argmax as screen
from qwen3_vl.optim.execution.fusion import FusedTextMLP, fuse_projections
from qwen3_vl.optim.plan import Optimization, Requirements, Target
from qwen3_vl.optim.quant.weights import SMALL_BATCH_ROWS, QuantLinear

KERNELS = ("auto", "avx2", "mkl", "mkldnn", "fp16_chunks", "none")
CHUNK_BYTES = 1 << 20  # fp32 rows cast at a time by fp16_chunks: about one core's L2


def _has_mkl_linear() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _has_mkldnn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _mkldnn_packs(storage: torch.dtype) -> bool:
    """Whether oneDNN packs ``storage`` weights on this CPU: its bf16 path needs AVX-512 (BW/VL/DQ) or
    AVX-NE-CONVERT, which AVX2 laptops such as the i5-10210U lack; tried, not inferred from flags."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=storage), 1)
        return True
    except RuntimeError:
        return False


def available_kernels(storage: torch.dtype) -> list[str]:
    """Kernels that run here for weights stored as ``storage``, fastest measured first.

    fp32 on the AVX2 CI machine (mini, one process, interleaved): our GEMV on weights in 2 MiB pages
    decoded at 72 ms/token against oneDNN's 84 (whose packed weights are opaque to the huge-page
    copy), while oneDNN prefilled the image prompt in 569 ms against 640; so ``avx2`` leads where huge
    pages are available (it is ahead after about 6 generated tokens) and ``mkldnn`` leads otherwise
    (the two then decode at the same speed and oneDNN prefills faster). bf16 keeps oneDNN first where it
    packs bf16 (AVX-512 machines), not measured against huge pages."""
    ours = storage in (torch.float32, torch.float16, torch.bfloat16) and cpu_gemv.unavailable_reason() is None
    onednn = storage in (torch.float32, torch.bfloat16) and _has_mkldnn_linear() and _mkldnn_packs(storage)
    found = ["avx2", "mkldnn"] if storage == torch.float32 and huge_pages_reason() is None else ["mkldnn", "avx2"]
    found = [k for k in found if (k == "avx2" and ours) or (k == "mkldnn" and onednn)]
    if storage == torch.float32 and _has_mkl_linear():
        found.append("mkl")
    if storage == torch.float16:
        found.append("fp16_chunks")
    return [*found, "none"]


class PackedLinear(Linear):
    """A ``Linear`` whose product runs through ``self.kernel`` (one of the functions below)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.kernel(self, x.reshape(-1, shape[-1]))
        return out.view(*shape[:-1], out.shape[-1])


def mkl_kernel(mod: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != 1 or x.dtype != torch.float32:
        return F.linear(x, mod.weight.to(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype))
    return torch.ops.mkl._mkl_linear(x, mod.packed, mod.weight, mod.bias, 1)


def mkldnn_kernel(mod: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != mod.packed.dtype:
        x = x.to(mod.packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), mod.packed, mod.bias, "none", [], "")


def avx2_gemv(mod: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """Every row through our GEMV (fp16/bf16 weights in ``pack8``'s layout, fp32 row-major): each row's
    sums run in the same order whatever the row count (``batch_invariant`` uses it for prefill too)."""
    x32 = x.float().contiguous()
    out = cpu_gemv.gemv(x32, mod.weight) if mod.packed is None else cpu_gemv.gemv_packed8(x32, mod.packed)
    if mod.bias is not None:
        out += mod.bias.float()
    return out.to(x.dtype)


GEMV_PREFILL_ROWS = 1024  # fp32 prefill rows our GEMV takes (inputs stay in L2 between weight blocks)


def avx2_kernel(mod: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """Decode rows through our GEMV, and fp32 prompts of up to ``GEMV_PREFILL_ROWS`` rows too (it takes
    them three at a time through shared weight loads: on the AVX2 CI machine as fast as PyTorch's GEMM
    on 3072x1024 up to 1000 rows, 56 against 88 GFLOP/s at 2000; mini's 115-token image prompt
    prefilled in 598 ms against 759 in one process); longer prompts and fp16/bf16 storage through
    PyTorch's GEMMs."""
    if x.shape[0] > SMALL_BATCH_ROWS and (mod.packed is not None or x.shape[0] > GEMV_PREFILL_ROWS):
        if mod.packed is None:
            return F.linear(x, mod.weight.to(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype))
        if x.dtype == torch.float32:
            return fp16_chunks_kernel(mod, x)
        weight = cpu_gemv.unpack8_float(mod.packed).to(x.dtype)
        return F.linear(x, weight, None if mod.bias is None else mod.bias.to(x.dtype))
    return avx2_gemv(mod, x)


avx2_kernel.all_rows = avx2_gemv  # the row-invariant path, for batch_invariant (int8/int4's avx2 kernels too)


def fp16_chunks_kernel(mod: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(mod, "packed", None)  # avx2's interleaved copy, read back a block at a time
    rows = mod.out_features
    out = torch.empty(x.shape[0], rows, dtype=x.dtype)
    buffer = mod.buffer  # [rows per block, k] fp32, shared by every layer of this width
    step = buffer.shape[0]
    for start in range(0, rows, step):
        end = min(rows, start + step)
        block = buffer[: end - start]
        block.copy_(mod.weight[start:end] if packed is None else cpu_gemv.unpack8_float(packed, start, end))
        torch.mm(x, block.T, out=out[:, start:end])
    if mod.bias is not None:
        out += mod.bias.to(out.dtype)
    return out


def pack_linear(linear: Linear, kernel: str, buffers: dict[int, torch.Tensor], keep_weight: bool) -> int:
    """Turn ``linear`` into a ``PackedLinear`` in place; returns the extra bytes it now holds."""
    weight = linear.weight
    linear.__class__ = PackedLinear
    if kernel == "mkl":
        linear.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
        linear.kernel = mkl_kernel
        return linear.packed.numel() * linear.packed.element_size()
    if kernel == "mkldnn":
        linear.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        linear.kernel = mkldnn_kernel
        if not keep_weight:  # the packed copy replaces it (the module's weight becomes an empty stub)
            linear.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)
            return 0
        return weight.numel() * weight.element_size()
    if kernel == "avx2":
        linear.kernel = avx2_kernel
        linear.packed = None
        if weight.dtype == torch.float32 or weight.shape[0] % 8:
            return 0  # fp32: the row-major kernel reads at the bandwidth already (gemv_avx2.cpp)
        linear.packed = cpu_gemv.pack8(weight)
        if not keep_weight:
            linear.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)
        _chunk_buffer(linear, buffers)
        return weight.numel() * weight.element_size() if keep_weight else 0
    if kernel == "fp16_chunks":
        linear.kernel = fp16_chunks_kernel
        _chunk_buffer(linear, buffers)
        return 0
    raise ValueError(f"unknown kernel {kernel}")


def _chunk_buffer(linear: Linear, buffers: dict[int, torch.Tensor]) -> None:
    """Give ``linear`` the fp32 block buffer for its input width, shared by every layer of that width
    (a multiple of 8 rows, so blocks of ``pack8``'s layout fit)."""
    k = linear.in_features
    if k not in buffers:
        buffers[k] = torch.empty(max(2, CHUNK_BYTES // (32 * k)) * 8, k, dtype=torch.float32)
    linear.buffer = buffers[k]


_SMALL_NORM = 1 << 16  # elements: a decode step's norms (1-16 rows), where dispatch costs more than the work


def _ours_take(*tensors: torch.Tensor) -> bool:
    """Whether our single-call kernels take these tensors: fp32 on a CPU where the kernels built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and \
        cpu_gemv.unavailable_reason() is None


def rms_norm(x: torch.Tensor, norm, every_size: bool = False) -> torch.Tensor:
    """One fused call for fp32 activations: our single-threaded kernel on decode-sized inputs (sum of
    squares reassociated, within 1e-7 of the reference's; on inputs of every size with ``every_size``),
    else ``F.rms_norm`` (bitwise the reference's); other dtypes take the module."""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(x)
    if (every_size or x.numel() <= _SMALL_NORM) and _ours_take(x):
        return cpu_gemv.rms_norm(x.contiguous(), norm.weight, norm.eps)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class KernelRMSNorm(RMSNorm):
    """The decoder's final norm through our kernel at every size (``batch_invariant``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self, every_size=True)


def _one_call_qk(attn, h: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether ``qk_norm_rope`` serves this call: one new token per row, fused q/k/v, fp32 on a CPU
    where our kernels built, cos/sin one row of head_dim per sequence ([B, 1, 1, d] as the layers get them)."""
    b, n, _ = h.shape
    return (n == 1 and hasattr(attn, "qkv_sizes") and _ours_take(h, attn.q_norm.weight, cos)
            and cos.numel() == b * attn.head_dim and cos.is_contiguous())


_EXACT_ATTENTION = ("sdpa", "eager")  # whose decode rows our kernel may compute instead (same softmax, reassociated)


def _one_call_attention(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``causal_attention`` serves this decode call: one query per sequence, fp32 on a CPU where our
    kernels built, under an exact attention option (the approximate ones keep their own algorithm)."""
    return (q.shape[2] == 1 and getattr(attention, "name", None) in _EXACT_ATTENTION and _ours_take(q, k, v)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


class LeanDecoderLayer(DecoderLayer):
    """``DecoderLayer`` with the same arithmetic in fewer operations (see the module docstring).

    Calls without a cache (unless ``batch_invariant``), caches that watch the queries (H2O) and
    attention modules something hooks (FastV scores layer K-1's attention from a forward hook) take the
    reference layer. With ``batch_invariant`` every row of every call takes our kernels."""

    batch_invariant = False

    def forward(self, x, cos, sin, mask, cache, attention) -> torch.Tensor:
        attn = self.self_attn
        invariant = self.batch_invariant
        if (cache is None and not invariant) or getattr(cache, "observes_queries", False) or attn._forward_hooks \
                or attn._forward_pre_hooks:
            return super().forward(x, cos, sin, mask, cache, attention)
        b, n, _ = x.shape
        h = rms_norm(x, self.input_layernorm, every_size=invariant)
        if invariant or _one_call_qk(attn, h, cos):  # norms and rotary of q/k in one kernel call
            hq, hk = attn.qkv_sizes[0] // attn.head_dim, attn.qkv_sizes[1] // attn.head_dim
            q, k, v = cpu_gemv.qk_norm_rope(attn.qkv_proj(h).view(b * n, -1), attn.q_norm, attn.k_norm,
                                            cos.reshape(b * n, -1), sin.reshape(b * n, -1), hq, hk)
            q, k, v = (t.view(b, n, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = attn.project(h)
            q = rms_norm(q.view(b, n, -1, attn.head_dim), attn.q_norm).transpose(1, 2)
            k = rms_norm(k.view(b, n, -1, attn.head_dim), attn.k_norm).transpose(1, 2)
            v = v.view(b, n, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v, key_valid = (k, v, mask.key_valid) if cache is None else cache.update(attn.layer_idx, k, v)
        if invariant or _one_call_attention(attention, q, k, v):  # the rows' keys are all cached: causal
            out = cpu_gemv.causal_attention(q, k, v, key_valid, attn.head_dim**-0.5)
        else:
            out = attention.text(q, k, v, AttentionMask(key_valid, mask.causal), attn.head_dim**-0.5)
        h = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        h2 = rms_norm(h, self.post_attention_layernorm, every_size=invariant)
        mlp = self.mlp
        if invariant or (n == 1 and type(mlp) is FusedTextMLP and _ours_take(h2)):
            return h + mlp.down_proj(cpu_gemv.silu_mul(mlp.gate_up_proj(h2).contiguous()))
        return h + mlp(h2)


class CpuPackedExecution:
    name = "cpu_packed"

    def __init__(self, model, target: Target, kernel: str = "auto", fuse: bool = True, lean: bool = True,
                 threads: int = 0, huge_pages: bool = True, batch_invariant: bool = False,
                 screened_argmax: bool = True) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"cpu_packed kernel '{kernel}' unknown; kernels are: {', '.join(KERNELS)}")
        if threads < 0:
            raise ValueError(f"cpu_packed threads must be >= 0 (0: the process's setting), got {threads}")
        storage = model.lm_head.weight.dtype if isinstance(model.lm_head, Linear) else model.compute_dtype
        choices = available_kernels(storage)
        if batch_invariant:
            _check_batch_invariant(model, kernel, choices, fuse, lean)
            kernel = "avx2"
        if kernel == "auto":
            kernel = choices[0]
        elif kernel not in choices:
            raise ValueError(f"cpu_packed kernel '{kernel}' does not run on {storage} weights here; "
                             f"available: {', '.join(choices)}")
        self.kernel, self.threads = kernel, threads
        self.fused_layers = fuse_projections(model) if fuse else 0
        self.packed_layers, self.extra_bytes = 0, 0
        if kernel != "none":
            buffers: dict[int, torch.Tensor] = {}
            tied = model.lm_head.weight is getattr(model.language_model.embed_tokens, "weight", None)
            linears = [m for m in model.language_model.layers.modules() if type(m) is Linear]
            if type(model.lm_head) is Linear:
                linears.append(model.lm_head)
            for linear in linears:
                keep = tied and linear is model.lm_head  # the embedding still looks rows up in it
                self.extra_bytes += pack_linear(linear, kernel, buffers, keep)
            self.packed_layers = len(linears)
            self.extra_bytes += sum(b.numel() * b.element_size() for b in buffers.values())
        self.argmax, self.screen_off = None, "off"  # screen_off: why there is no screen (None: there is one)
        if screened_argmax:
            reason = _screen_reason(model)
            if reason is None:
                self.argmax, self.screen_off = screen.ScreenedArgmax(model.lm_head), None
                self.extra_bytes += self.argmax.nbytes()
            else:
                self.screen_off = f"off: {reason}"
        # last: packing and fusion made new tensors, and the quant layers' codes are already in place
        self.huge_pages = "off" if not huge_pages else huge_pages_reason()
        if self.huge_pages is None:
            screens = [] if self.argmax is None else [self.argmax]
            moved, backed = move_to_huge_pages([model.language_model, model.lm_head, *screens])
            self.huge_pages = f"{backed / 2**20:.0f} of {moved / 2**20:.0f} MiB in 2 MiB pages"
        self.lean_layers = 0
        if lean:
            for layer in model.language_model.layers:
                if type(layer) is DecoderLayer:
                    layer.__class__ = LeanDecoderLayer
                    self.lean_layers += 1
        self.batch_invariant = batch_invariant
        if batch_invariant:
            _make_batch_invariant(model)

    @contextlib.contextmanager
    def _threads(self):
        if not self.threads or self.threads == torch.get_num_threads():
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def new_cache(self, model, batch: int, max_tokens: int):
        return model.kv_cache.new(batch, max_tokens)

    def decode(self, model, request: DecodeRequest) -> torch.Tensor:
        with self._threads():
            return decode_loop(model, request, self.argmax)

    def describe(self) -> dict:
        return {"option": self.name, "kernel": self.kernel, "fused_layers": self.fused_layers,
                "packed_layers": self.packed_layers, "lean_layers": self.lean_layers,
                "extra_bytes": self.extra_bytes, "threads": self.threads or torch.get_num_threads(),
                "huge_pages": self.huge_pages, "batch_invariant": self.batch_invariant,
                "screened_argmax": self.screen_off or self._screen_stats()}

    def _screen_stats(self) -> str:
        a = self.argmax
        mean = a.candidates / max(1, a.rows - a.full)
        return (f"int8 copy of the output matrix ({a.nbytes() / 2**20:.0f} MiB); {a.rows} greedy rows, "
                f"{mean:.1f} rows recomputed on average, {a.full} took the full product")


def _check_batch_invariant(model, kernel: str, choices: list[str], fuse: bool, lean: bool) -> None:
    """Refuse, naming the problem, a model whose text path cannot run every row through our kernels."""
    problems = []
    if cpu_gemv.unavailable_reason() is not None:
        problems.append(cpu_gemv.unavailable_reason())
    if kernel not in ("auto", "avx2") or "avx2" not in choices:
        problems.append(f"it runs on our avx2 kernel, not '{kernel}' (available here: {', '.join(choices)})")
    if model.compute_dtype != torch.float32:
        problems.append(f"our kernels compute in fp32, this model in {model.compute_dtype}")
    if not (fuse and lean):
        problems.append("it needs fuse and lean")
    if getattr(model.attention, "name", None) not in _EXACT_ATTENTION:
        problems.append(f"attention={model.attention.name} is not one our kernel replaces exactly "
                        f"({', '.join(_EXACT_ATTENTION)})")
    for mod in [*model.language_model.layers.modules(), model.lm_head]:
        if isinstance(mod, QuantLinear) and not hasattr(mod.kernel, "all_rows"):
            problems.append(f"quant kernel {mod.kernel.__name__} has no row-invariant path (int8/int4's avx2 do)")
            break
    if problems:
        raise ValueError("cpu_packed batch_invariant: " + "; ".join(problems))


def _make_batch_invariant(model) -> None:
    """Every text-decoder row through kernels whose per-row sums do not depend on the row count."""
    for mod in [*model.language_model.layers.modules(), model.lm_head]:
        if isinstance(mod, (PackedLinear, QuantLinear)):
            mod.kernel = mod.kernel.all_rows
    for layer in model.language_model.layers:
        layer.batch_invariant = True
    model.language_model.norm.__class__ = KernelRMSNorm


def _screen_reason(model) -> str | None:
    head = model.lm_head
    if type(head) is not PackedLinear or head.kernel not in (avx2_kernel, avx2_gemv):
        return "the output matrix is not on our avx2 kernel"
    return screen.unavailable_reason(head, model.compute_dtype)


def _cpu_kernels_reason(target: Target) -> str | None:
    if not (_has_mkl_linear() or _has_mkldnn_linear()):
        return "this PyTorch build has neither MKL nor oneDNN linear kernels"
    return None


OPTION = Optimization(
    name="cpu_packed",
    axis="execution",
    exact=True,
    summary=(
        "CPU decode and prefill: text weights read by our AVX2 GEMV from 2 MiB pages (fp16/bf16 storage interleaved "
        "for it) or prepacked for oneDNN/MKL, fused q/k/v and gate/up projections, one kernel call each for a decode "
        "row's norms, rotary, attention and activation, greedy tokens through an int8-screened output matrix "
        "(bitwise the full argmax); optional thread count."
    ),
    build=lambda model, target, **params: CpuPackedExecution(model, target, **params),
    requires=Requirements(devices=("cpu",)),
    probe=_cpu_kernels_reason,
    # Packing replaces the weights the memory options stream; the lean layer writes through update().
    needs=("memory=resident",),
    fallback="eager",
    defaults={"kernel": "auto", "fuse": True, "lean": True, "threads": 0, "huge_pages": True,
              "batch_invariant": False, "screened_argmax": True},
    variants=({"kernel": "auto"}, {"kernel": "none"}),
)
