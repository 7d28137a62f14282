"""Exact greedy tokens without reading the whole output matrix: an int8 copy screens, the matrix decides.

Why: the output matrix is the largest read of a decode step (mini's tied 151936 x 1024 matrix is 622 MB
of its 1.23 GB of fp32 text weights), yet a greedy step needs only the row with the largest logit.
``ScreenedArgmax`` keeps an int8 copy of the matrix (one scale per row, 1 byte per weight, in
``pack8``'s layout), scores every row with it, bounds how far each score can be from the logit the
matrix's own kernel computes, and recomputes with that kernel only the rows whose upper bound reaches
the best lower bound (1-6 rows on mini's random weights).

The bound. For a hidden row ``h`` (fp32, K columns), weight row ``w`` with codes ``q`` and scale ``s``,
screening score ``t = fl(s * fl(sum h_k q_k))`` and the kernel's logit ``e = fl(sum h_k w_k)``:

    |t - e| <= |h|_2 * (|w - s q|_2 + g * (s |q|_2 + |w|_2)) + 2 u |t|,    g = (K + 2) u / (1 - (K + 2) u)

(Cauchy-Schwarz on the quantization error, and the error of a K-term fp32 dot product in any summation
order, u = 2^-24). The bracket is computed per row once, with margins for its own rounding; each step scales
it by ``|h|_2`` with a 2^-10 margin and doubles the ``|t|`` term, which covers the rounding of the
bound's own fp32 arithmetic. The row the kernel's argmax picks has an upper bound at least every
row's lower bound, so it is among the candidates. The candidates are recomputed by the kernel the
output matrix uses (our GEMV, whose result for a row does not depend on which other rows a call
holds), so the token is bitwise the one the full logits give, ties included (the first index wins).
Non-fp32 or non-finite hidden states and more than ``MAX_CANDIDATES`` candidates take the full product.
"""

from __future__ import annotations

import math

import torch

from qwen3_vl.kernels import cpu_gemv
from qwen3_vl.optim.quant.weights import quantize_int8

MAX_CANDIDATES = 4096  # beyond this, recomputing rows costs more than the full product saves
_U = 2.0**-24
MAX_COLUMNS = 16384  # the step's 2^-10 margin covers |h|_2's fp32 rounding (relative K u at most) up to here
_BUILD_ROWS = 512  # rows quantized at a time: the temporaries stay in cache (mini: 0.8 s against 1.9 with 8192)


def unavailable_reason(head, compute_dtype: torch.dtype) -> str | None:
    """None when ``ScreenedArgmax(head)`` can serve this output matrix (one on ``cpu_packed``'s avx2
    kernel, which the caller checks), else why not."""
    reason = cpu_gemv.unavailable_reason()
    if reason is not None:
        return reason
    if compute_dtype != torch.float32:
        return f"greedy tokens come from {compute_dtype} logits, whose rounding the fp32 screen does not model"
    if getattr(head, "bias", None) is not None:
        return "the output matrix has a bias"
    if head.out_features % 8:
        return f"the output matrix has {head.out_features} rows, not a multiple of 8"
    if head.in_features > MAX_COLUMNS:
        return f"hidden size {head.in_features} is above {MAX_COLUMNS}, where the 2^-10 margin covers an fp32 norm"
    return None


class ScreenedArgmax(torch.nn.Module):
    """``argmax(hidden [B, K], banned ids) -> [B]`` over ``head``'s logits (a ``cpu_packed`` avx2
    ``PackedLinear``: fp32 row-major, or fp16/bf16 in ``pack8``'s layout), reading an int8 copy."""

    def __init__(self, head) -> None:
        super().__init__()
        self.head = [head]  # a list: not a submodule (its weights are the model's, not this module's)
        n, k = head.out_features, head.in_features
        self.register_buffer("codes", torch.empty(n // 8, k, 8, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(n))
        self.register_buffer("bound", torch.empty(n))  # the per-row bracket of the module docstring
        # g of the module docstring, with 6 u more for the fp32 arithmetic of the bracket itself (its
        # norms' relative error is at most g, covered by the factor 1 + 2 g)
        g = (k + 8) * _U / (1 - (k + 8) * _U)
        for start in range(0, n, _BUILD_ROWS):
            end = min(n, start + _BUILD_ROWS)
            w = self._rows(start, end)
            q, s = quantize_int8(w)
            qf = q.float()
            error = torch.linalg.vector_norm(torch.addcmul(w, qf, s[:, None], value=-1), dim=1)
            sizes = s * torch.linalg.vector_norm(qf, dim=1) + torch.linalg.vector_norm(w, dim=1)
            self.bound[start:end] = (error + g * sizes) * (1 + 2 * g)
            self.codes[start // 8 : end // 8] = cpu_gemv.pack8(q)
            self.scale[start:end] = s
        self.rows = 0  # hidden rows (greedy choices) asked for, for describe's statistics
        self.full = 0  # of them, those that took the full product
        self.candidates = 0  # rows of the matrix recomputed for the others

    def _rows(self, start: int, end: int) -> torch.Tensor:
        head = self.head[0]
        if head.packed is None:
            return head.weight[start:end].float()
        return cpu_gemv.unpack8_float(head.packed, start, end)

    def _exact(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The head kernel's logits of ``rows`` (ascending) for one hidden row ``h`` [1, K]."""
        head = self.head[0]
        if head.packed is None:
            return cpu_gemv.gemv(h, head.weight.index_select(0, rows))[0]
        blocks = torch.unique_consecutive(rows // 8)
        logits = cpu_gemv.gemv_packed8(h, head.packed.index_select(0, blocks))[0].view(-1, 8)
        return logits[torch.searchsorted(blocks, rows // 8), rows % 8]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, hidden: torch.Tensor, banned: list[int] | tuple = ()) -> torch.Tensor:
        self.rows += hidden.shape[0]
        if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
            return self._full(hidden, banned)
        hidden = hidden.contiguous()
        scores = cpu_gemv.gemv_packed8(hidden, self.codes, self.scale)
        return torch.stack([self._one(hidden[b : b + 1], scores[b], banned) for b in range(hidden.shape[0])])

    def _full(self, hidden: torch.Tensor, banned) -> torch.Tensor:
        self.full += hidden.shape[0]
        logits = self.head[0](hidden).float()
        logits[:, list(banned)] = -math.inf
        return logits.argmax(dim=-1)

    def _one(self, h: torch.Tensor, t: torch.Tensor, banned) -> torch.Tensor:
        norm = float(torch.linalg.vector_norm(h))
        if not math.isfinite(norm):
            return self._full(h, banned)[0]
        margin = t.abs().mul_(4 * _U).add_(self.bound, alpha=norm * (1 + 2**-10))
        upper, lower = t + margin, t.sub_(margin)  # t (this row of the scores) is not needed after
        if banned:
            ids = torch.tensor(list(banned))
            upper[ids], lower[ids] = -math.inf, -math.inf
        best_lower = float(lower.max())
        if not math.isfinite(best_lower):
            return self._full(h, banned)[0]
        rows = (upper >= best_lower).nonzero().flatten()
        if len(rows) > MAX_CANDIDATES:
            return self._full(h, banned)[0]
        exact = self._exact(h, rows)
        if not bool(torch.isfinite(exact).all()):
            return self._full(h, banned)[0]
        self.candidates += len(rows)
        return rows[exact.argmax()]
