"""One-row matrix products of a preset's text weights on a GPU in the forms PyTorch offers, each form over
every weight of a shape in one captured graph (so each weight is read from memory, not L2), interleaved:
which form reaches the bandwidth for which shape. Our Triton GEMV (``qwen3_vl/kernels/triton_gemv.py``) is
swept over its tile configurations beside them (its split-K partial sums timed alone: in the compiled step
that sum is fused into the next kernel; the best split configuration is also timed with its sum).

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
from qwen3_vl.kernels.triton_gemv import GemvConfig, gemv, gemv_partials
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim.execution.fusion import fuse_projections

FORMS = {
    "linear": lambda x, w: F.linear(x, w),
    "mv": lambda x, w: torch.mv(w, x[0])[None],
    "w @ x.T": lambda x, w: (w @ x.T).T,
}
TILES = [(1, 2048, 8), (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8),
         (16, 256, 4), (16, 512, 8), (32, 256, 8)]
SPLITS = (1, 2, 4, 8)


def triton_forms(shape: tuple[int, int]) -> dict:
    forms = {}
    for block_n, block_k, warps in TILES:
        for split in SPLITS:
            config = GemvConfig(block_n, block_k, split, warps)
            if config.fits(*shape):
                forms[f"triton {block_n}x{block_k}/{split} w{warps}"] = (
                    lambda x, w, c=config: gemv_partials(x, w, c), config)
    return forms


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
            ref = F.linear(x, weights[0]).float()
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            tiled = triton_forms(shape)
            forms = {**FORMS, **{name: form for name, (form, _) in tiled.items()}}
            times = time_forms(forms, x, weights)
            best = sorted(tiled, key=lambda name: times[name])
            split = next((name for name in best if tiled[name][1].split_k > 1), None)
            if split is not None:  # the best split configuration again, with its partial sums added
                config = tiled[split][1]
                forms[split + " +sum"] = lambda x, w, c=config: gemv(x, w, c)
                times.update(time_forms({split + " +sum": forms[split + " +sum"]}, x, weights))
            shown = [*FORMS, *best[:3], *([split + " +sum"] if split else [])]
            print(f"{shape!s:16s} x{len(weights):3d}")
            for name in shown:
                y = forms[name](x, weights[0]).float()
                y = y.sum(0, keepdim=True) if y.shape[0] > 1 else y
                err = float((y - ref).abs().max() / ref.abs().max())
                ms = times[name]
                per_weight = ms / len(weights) * 1e3
                print(f"    {name:28s} {per_weight:6.1f} us ({nbytes / ms / 1e9:5.2f} TB/s, rel {err:.0e})")
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
