"""Planted faults for ``python -m harness selftest``: each a small source change a real bug could make.

A fault names one file, an exact snippet of it (which must occur exactly once, so a catalogue entry
that no longer matches the code is reported, never silently skipped), its replacement, the real
bug it stands for, and the plans whose numerical contracts should see it (faults in code every plan
shares need none: the golden outputs and the reference plan's invariants must catch them).

Grow the catalogue with the options: a new option gets at least one fault in its own file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    name: str
    path: str  # relative to the project root
    old: str
    new: str
    why: str
    plans: tuple[str, ...] = ()  # plans to check besides the reference plan


FAULTS: tuple[Fault, ...] = (
    # --- shared model code: the reference plan (golden outputs from transformers, invariants) -------------
    Fault("rope_section_order", "qwen3_vl/optim/rope/standard.py",
          "    out[..., 1 : 3 * section[1] : 3] = freqs[1, ..., 1 : 3 * section[1] : 3]\n"
          "    out[..., 2 : 3 * section[2] : 3] = freqs[2, ..., 2 : 3 * section[2] : 3]",
          "    out[..., 1 : 3 * section[1] : 3] = freqs[2, ..., 1 : 3 * section[1] : 3]\n"
          "    out[..., 2 : 3 * section[2] : 3] = freqs[1, ..., 2 : 3 * section[2] : 3]",
          "M-RoPE sections in the wrong order (H and W angles swapped)"),
    Fault("gelu_variant_merger", "qwen3_vl/model/vision.py",
          "return self.linear_fc2(F.gelu(self.linear_fc1(x)))",
          'return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))',
          "tanh GELU in the patch merger, which uses the erf GELU"),
    Fault("gelu_variant_vit_mlp", "qwen3_vl/model/vision.py",
          'F.gelu(self.linear_fc1(x), approximate="tanh")',
          "F.gelu(self.linear_fc1(x))",
          "erf GELU in the ViT MLP, which uses gelu_pytorch_tanh"),
    Fault("deepstack_wrong_decoder_layer", "qwen3_vl/model/text.py",
          "            if deepstack and index < len(deepstack):\n"
          "                if rows is None or rows_of is not visual_mask:\n"
          "                    rows, rows_of = visual_mask.reshape(-1).nonzero().squeeze(1), visual_mask\n"
          "                flat = x.reshape(-1, x.shape[-1])\n"
          "                x = flat.index_copy(0, rows, flat.index_select(0, rows) + deepstack[index].to(x.dtype))",
          "            if deepstack and 0 < index <= len(deepstack):\n"
          "                if rows is None or rows_of is not visual_mask:\n"
          "                    rows, rows_of = visual_mask.reshape(-1).nonzero().squeeze(1), visual_mask\n"
          "                flat = x.reshape(-1, x.shape[-1])\n"
          "                x = flat.index_copy(0, rows, flat.index_select(0, rows) + deepstack[index - 1].to(x.dtype))",
          "DeepStack feature k added after decoder layer k+1 instead of k"),
    Fault("deepstack_wrong_vit_block", "qwen3_vl/model/vision.py",
          "            x = block(x, grid.cos, grid.sin, grid.cu_seqlens, attention)\n"
          "            if index in taps:\n"
          "                deepstack.append(self.deepstack_merger_list[taps.index(index)](x))",
          "            if index in taps:\n"
          "                deepstack.append(self.deepstack_merger_list[taps.index(index)](x))\n"
          "            x = block(x, grid.cos, grid.sin, grid.cu_seqlens, attention)",
          "DeepStack tapped at the input of the ViT block instead of its output"),
    Fault("dropped_k_norm", "qwen3_vl/model/text.py",
          "k = self.k_norm(k.view(b, n, -1, self.head_dim)).transpose(1, 2)",
          "k = k.view(b, n, -1, self.head_dim).transpose(1, 2)",
          "per-head k RMSNorm dropped (Qwen2-style attention)"),
    Fault("dropped_q_norm", "qwen3_vl/model/text.py",
          "q = self.q_norm(q.view(b, n, -1, self.head_dim)).transpose(1, 2)",
          "q = q.view(b, n, -1, self.head_dim).transpose(1, 2)",
          "per-head q RMSNorm dropped"),
    Fault("softmax_scale_without_sqrt", "qwen3_vl/model/text.py",
          "out = attention.text(q, k, v, mask, self.head_dim**-0.5)",
          "out = attention.text(q, k, v, mask, 1.0 / self.head_dim)",
          "text softmax scale 1/d instead of 1/sqrt(d)"),
    Fault("vision_softmax_scale", "qwen3_vl/model/vision.py",
          "return attention.vision(q, k, v, cu_seqlens, self.head_dim**-0.5)",
          "return attention.vision(q, k, v, cu_seqlens, 1.0 / self.head_dim)",
          "vision softmax scale 1/d instead of 1/sqrt(d)"),
    Fault("decode_position_off_by_one", "qwen3_vl/generate.py",
          "next_position = (torch.as_tensor(real_len) + deltas.cpu())",
          "next_position = (torch.as_tensor(real_len) + deltas.cpu() + 1)",
          "the first decode step's cache position one too far"),
    Fault("rms_norm_one_plus_weight", "qwen3_vl/model/layers.py",
          "return weight.to(dtype) * x32.to(dtype)",
          "return (1 + weight.to(dtype)) * x32.to(dtype)",
          "Gemma-style (1 + w) RMSNorm scale in a model whose weight is w"),
    Fault("rotate_half_sign", "qwen3_vl/model/layers.py",
          "return torch.cat((-x[..., half:], x[..., :half]), dim=-1)",
          "return torch.cat((x[..., half:], -x[..., :half]), dim=-1)",
          "rotate_half with the sign on the wrong half (rotation by -theta)"),
    Fault("causal_mask_off_by_one", "qwen3_vl/model/text.py",
          "allowed = allowed & (torch.arange(lk, device=device)[None, :] <= q_idx)",
          "allowed = allowed & (torch.arange(lk, device=device)[None, :] <= q_idx + 1)",
          "causal mask lets each query see the next token"),
    Fault("padding_mask_ignored", "qwen3_vl/model/text.py",
          "            allowed = allowed & self.key_valid[:, None, None, :].to(device)",
          "            pass",
          "left padding not masked: padded rows attend to pad tokens"),
    Fault("gqa_heads_tiled", "qwen3_vl/optim/attention/eager.py",
          "return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)",
          "return x.repeat(1, groups, 1, 1)",
          "GQA KV heads tiled (kv0, kv1, kv0, kv1) instead of repeated per group (kv0, kv0, kv1, kv1)"),
    Fault("vision_pos_embed_align_corners", "qwen3_vl/model/vision.py",
          "src = coord.float() * (side - 1) / torch.clamp(size - 1, min=1)",
          "src = coord.float() * side / size",
          "position-embedding interpolation without align-corners"),
    Fault("vision_segments_merged", "qwen3_vl/model/vision.py",
          "lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])",
          "lengths = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum().view(1)",
          "ViT attention across image boundaries (one segment for all images)"),
    Fault("text_mlp_gelu", "qwen3_vl/model/text.py",
          "F.silu(self.gate_proj(x))",
          "F.gelu(self.gate_proj(x))",
          "GELU instead of SiLU in the decoder MLP"),
    Fault("final_norm_skipped", "qwen3_vl/model/text.py",
          "        return self.norm(x)",
          "        return x",
          "final RMSNorm skipped before the LM head"),
    Fault("mrope_image_position_gap", "qwen3_vl/model/positions.py",
          "pos += max(gh, gw)",
          "pos += max(gh, gw) + 1",
          "text after an image starts one position too late"),
    Fault("syntax_error_after_line_continuation", "qwen3_vl/model/positions.py",
          "    merge = config.vision.spatial_merge_size\n",
          "    merge = config.vision.spatial_merge_size + \\\n        # a comment cannot follow a line continuation\n"
          "        0\n",
          "a syntax error after a line continuation"),
    # --- options: their contracts against the reference plan ----------------------------------------
    Fault("sdpa_prefill_not_causal", "qwen3_vl/optim/attention/sdpa.py",
          "return self.run(kind, q, k, v, None, True, scale)",
          "return self.run(kind, q, k, v, None, False, scale)",
          "SDPA prefill without is_causal",
          ("attention=sdpa",)),
    Fault("tiled_running_sum_not_rescaled", "qwen3_vl/optim/attention/tiled.py",
          "row_sum = row_sum.mul_(correction).add_(",
          "row_sum = row_sum.add_(",
          "online softmax: the running sum is not rescaled when the maximum grows",
          ("attention=tiled[block_k=16;block_k_decode=16;block_q=8]",)),
    Fault("tiled_causal_tile_boundary", "qwen3_vl/optim/attention/tiled.py",
          "if causal and j1 - 1 > offset + i0:",
          "if causal and j1 > offset + i1:",
          "causal mask skipped for key tiles that straddle the query tile",
          ("attention=tiled[block_k=16;block_k_decode=16;block_q=8]",)),
    Fault("rope_cached_slot_axis", "qwen3_vl/optim/rope/cached.py",
          "        axis[1 : 3 * self.section[1] : 3] = 1\n        axis[2 : 3 * self.section[2] : 3] = 2",
          "        axis[1 : 3 * self.section[1] : 3] = 2\n        axis[2 : 3 * self.section[2] : 3] = 1",
          "cached RoPE table indexed with the H and W axes swapped",
          ("rope=cached",)),
    Fault("static_cache_write_off_by_one", "qwen3_vl/optim/kv_cache/static.py",
          "start, end = self.seen_tokens, self.seen_tokens + self._pending",
          "start, end = max(self.seen_tokens - 1, 0), max(self.seen_tokens - 1, 0) + self._pending",
          "static cache writes each decode step's key one slot early (over the last cached one)",
          ("kv_cache=static",)),
    Fault("int8_weight_per_tensor_scale", "qwen3_vl/optim/quant/weights.py",
          "scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)",
          "scale = (w.abs().amax() / 127).clamp(min=1e-12).expand(w.shape[0]).contiguous()",
          "int8 weights with one per-tensor scale instead of per-channel scales",
          ("quant=int8_weight",)),
    Fault("int4_weight_zero_point", "qwen3_vl/optim/quant/weights.py",
          "zero = lo + 8 * scale",
          "zero = lo + 7 * scale",
          "int4 weights dequantized with a zero point one step off",
          ("quant=int4_weight",)),
    Fault("kv_int8_per_tensor_scale", "qwen3_vl/optim/kv_cache/kivi.py",
          "lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)",
          "lo, hi = x.amin().expand_as(x.amin(dim, keepdim=True)), x.amax().expand_as(x.amax(dim, keepdim=True))",
          "KV cache quantized with one per-tensor scale instead of per-channel/per-token scales",
          ("kv_cache=quant_int8[residual=0]",)),
    Fault("conditional_cache_key_ignores_pixels", "qwen3_vl/optim/vision/conditional.py",
          "    key.update(data)\n    check = hashlib.blake2b(data, digest_size=16).hexdigest()",
          '    check = ""',
          "vision cache keyed on shapes only: a different image of the same size gets the first one's features",
          ("vision=conditional",)),
)
