"""One-row matrix products of a preset's text weights on a GPU in the forms PyTorch offers, each form over
every weight of a shape in one captured graph (so each weight is read from memory, not L2), interleaved:
which form reaches the bandwidth for which shape. Our Triton GEMV (``qwen3_vl/kernels/triton_gemv.py``) is
swept over its tiles beside them (the three fastest shown), which is what ``tile()``'s rule comes from, and
for each layer matrix its ``compile[fold=true]`` form too (the RMSNorm, SiLU gate or residual it carries),
so the prologue's and epilogue's cost shows beside the plain kernel's.

    python scripts/gpu_gemv_forms.py [--preset 2b,8b] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F

import qwen3_vl
from harness.bench import copy_bandwidth
from harness.timing import capture_graph, graph_replay_ms
from qwen3_vl.config import preset
from qwen3_vl.kernels.triton_gemv import gemv_tiled
from qwen3_vl.kernels.triton_gemv import reference as gemv_reference
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim.execution.fusion import fuse_projections

FORMS = {
    "linear": lambda x, w: F.linear(x, w),
    "mv": lambda x, w: torch.mv(w, x[0])[None],
    "w @ x.T": lambda x, w: (w @ x.T).T,
}
TILES = [(1, 2048, 8), (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8),
         (16, 256, 4), (16, 512, 8), (32, 256, 8)]  # (rows per program, tile columns, warps)


def triton_forms(shape: tuple[int, int], **folded) -> dict:
    return {f"triton {n}x{k} w{warps}": lambda x, w, t=(n, k, warps): gemv_tiled(x, w, *t, **folded)
            for n, k, warps in TILES if shape[1] % k == 0 and shape[0] >= n}


def fold_roles(model) -> dict[tuple[int, int], str]:
    """What ``compile[fold=true]`` folds into each layer matrix's product, by the matrix's shape."""
    layer = model.language_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    return {tuple(attn.qkv_proj.weight.shape): "norm", tuple(attn.o_proj.weight.shape): "residual",
            tuple(mlp.gate_up_proj.weight.shape): "norm", tuple(mlp.down_proj.weight.shape): "gated+residual"}


def fold_inputs(role: str, shape: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The input row and the folded tensors of ``role``'s product."""
    n, k = shape
    x = torch.randn(1, 2 * k if "gated" in role else k, device="cuda", dtype=dtype)
    folded = {}
    if "norm" in role:
        folded.update(norm=torch.randn(k, device="cuda", dtype=dtype), eps=1e-6)
    if "gated" in role:
        folded["gated"] = True
    if "residual" in role:
        folded["residual"] = torch.randn(1, n, device="cuda", dtype=dtype)
    return x, folded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b,8b", help="comma-separated presets")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    for name in args.preset.split(","):
        measure(name, args.dtype)


def measure(preset_name: str, dtype: str) -> None:
    model = qwen3_vl.build(preset(preset_name), dtype=dtype, device="cuda", seed=0)
    fuse_projections(model)
    roles = fold_roles(model)
    by_shape = collections.defaultdict(list)
    for module in [*model.language_model.modules(), model.lm_head]:
        if type(module) is Linear:
            by_shape[tuple(module.weight.shape)].append(module.weight)
    bandwidth = copy_bandwidth(torch.device("cuda"))
    print(f"{preset_name} {dtype} on {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"copy {bandwidth / 1e12:.2f} TB/s")
    with torch.inference_mode():
        for shape, weights in by_shape.items():
            x = torch.randn(1, shape[1], device="cuda", dtype=weights[0].dtype)
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            tiled = triton_forms(shape)
            times = time_forms({**FORMS, **tiled}, x, weights)
            rows = [(name, FORMS[name], x, {}) for name in FORMS]
            rows += [(name, tiled[name], x, {}) for name in sorted(tiled, key=times.get)[:3]]
            if shape in roles:  # the folded form beside the plain one: what the prologue/epilogue costs
                role = roles[shape]
                fx, folded = fold_inputs(role, shape, weights[0].dtype)
                folded_tiles = {f"{name} +{role}": form for name, form in triton_forms(shape, **folded).items()}
                times.update(time_forms(folded_tiles, fx, weights))
                rows += [(name, folded_tiles[name], fx, folded) for name in sorted(folded_tiles, key=times.get)[:3]]
            print(f"{shape!s:16s} x{len(weights):3d}")
            for name, form, inp, folded in rows:
                expected = gemv_reference(inp, weights[0], **folded).float()
                y = form(inp, weights[0]).float()
                err = float((y - expected).abs().max() / expected.abs().max())
                ms = times[name]
                per_weight = ms / len(weights) * 1e3
                print(f"    {name:40s} {per_weight:6.1f} us ({nbytes / ms / 1e9:5.2f} TB/s, rel {err:.0e})")
    del model
    torch.cuda.empty_cache()


def time_forms(forms: dict, x: torch.Tensor, weights: list[torch.Tensor]) -> dict[str, float]:
    """Median ms per replay of each form over all ``weights`` in one graph, three interleaved rounds."""
    samples = {name: [] for name in forms}
    for _ in range(3):
        for name, form in forms.items():
            graph = capture_graph(lambda form=form: [form(x, w) for w in weights])
            samples[name].append(graph_replay_ms(graph, 50))
    return {name: sorted(values)[1] for name, values in samples.items()}


if __name__ == "__main__":
    main()
