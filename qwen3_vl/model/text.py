"""Qwen3 text decoder with DeepStack injection: the language half of Qwen3-VL.

Each layer is ``h = x + o_proj(attn(rmsnorm(x))); out = h + mlp(rmsnorm(h))`` with per-head q/k
RMSNorm before RoPE and grouped-query attention whose KV heads are stored unexpanded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen3_vl.config import TextConfig
from qwen3_vl.model.layers import Linear, RMSNorm, apply_rotary


@dataclass
class AttentionMask:
    """Which keys each query may see.

    The queries of a step are the last ``Lq`` of the ``Lk`` keys (everything cached precedes
    them), so "causal" means key ``j`` is visible to query ``i`` when ``j <= i + Lk - Lq``.
    ``key_valid`` ([batch, Lk] bool, or None when every key is real) removes padding.
    """

    key_valid: torch.Tensor | None = None
    causal: bool = True

    def allowed(self, lq: int, lk: int, device: torch.device) -> torch.Tensor:
        """Dense boolean mask [batch or 1, 1, lq, lk]; True where attention is allowed."""
        allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)
        if self.causal:
            q_idx = torch.arange(lq, device=device)[:, None] + (lk - lq)
            allowed = allowed & (torch.arange(lk, device=device)[None, :] <= q_idx)
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :].to(device)
        return allowed


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v projections (one fused matmul in ``qwen3_vl/optim/execution/fusion.py``)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask: AttentionMask, cache, attention) -> torch.Tensor:
        return self.o_proj(self.attend(*self.project(x), cos, sin, mask, cache, attention))

    def attend(self, q, k, v, cos, sin, mask: AttentionMask, cache, attention) -> torch.Tensor:
        """From the projections [b, n, heads * d] to the attention output [b, n, heads * d], before ``o_proj``."""
        b, n, _ = q.shape
        q, k = self.position(q, k, cos, sin)
        return self.cached_attention(q, k, v.view(b, n, -1, self.head_dim).transpose(1, 2), mask, cache, attention)

    def cached_attention(self, q, k, v, mask: AttentionMask, cache, attention) -> torch.Tensor:
        """The new keys and values into ``cache`` (when there is one), then the attention: [b, heads, n, d] each
        to [b, n, heads * d]."""
        b, _, n, _ = q.shape
        if cache is not None:
            k, v, key_valid = cache.update(self.layer_idx, k, v)
            mask = AttentionMask(key_valid, mask.causal)
            if getattr(cache, "observes_queries", False):  # eviction scores (H2O) need the queries
                cache.observe(self.layer_idx, q, mask)
        out = attention.text(q, k, v, mask, self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(b, n, -1)

    def position(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The q/k RMSNorms and M-RoPE: projections [b, n, heads * d] to [b, heads, n, d]."""
        b, n, _ = q.shape
        q = self.q_norm(q.view(b, n, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, n, -1, self.head_dim)).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class TextMLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(config, layer_idx)
        self.mlp = TextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, attention) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache,
        attention,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
        layer_hook=None,
        visual_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states. DeepStack feature ``k`` is added after layer ``k``.

        ``visual_rows``: the flat indices (into batch x seq) of ``visual_mask``'s rows, when the caller has
        them (a captured prefill must not find them on the device: that reads a count back); else found once.
        ``layer_hook`` (the vision runtime's, see ``qwen3_vl/optim/vision/full.py``) runs before
        every layer and may drop rows from ``x`` and everything aligned with it (token pruning).
        """
        x = embeds
        rows, rows_of = visual_rows, visual_mask  # the rows of visual_mask as flat indices
        for index, layer in enumerate(self.layers):
            if layer_hook is not None:
                x, cos, sin, visual_mask, deepstack = layer_hook(self, index, x, cos, sin, mask, visual_mask, deepstack)
            x = layer(x, cos, sin, mask, cache, attention)
            if deepstack and index < len(deepstack):
                if rows is None or rows_of is not visual_mask:
                    rows, rows_of = visual_mask.reshape(-1).nonzero().squeeze(1), visual_mask
                flat = x.reshape(-1, x.shape[-1])
                x = flat.index_copy(0, rows, flat.index_select(0, rows) + deepstack[index].to(x.dtype)).view_as(x)
        return self.norm(x)
