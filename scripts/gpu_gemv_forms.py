"""One-row matrix products of a preset's text weights on a GPU in the forms PyTorch offers, each form over
every weight of a shape in one captured graph (so each weight is read from memory, not L2), interleaved:
which form reaches the bandwidth for which shape.

    python scripts/gpu_gemv_forms.py [--preset 2b] [--dtype bf16]
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
from qwen3_vl.model.layers import Linear
from qwen3_vl.optim.execution.fusion import fuse_projections

FORMS = {
    "linear": lambda x, w: F.linear(x, w),
    "mv": lambda x, w: torch.mv(w, x[0])[None],
    "w @ x.T": lambda x, w: (w @ x.T).T,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    model = qwen3_vl.build(preset(args.preset), dtype=args.dtype, device="cuda", seed=0)
    fuse_projections(model)
    by_shape = collections.defaultdict(list)
    for module in [*model.language_model.modules(), model.lm_head]:
        if type(module) is Linear:
            by_shape[tuple(module.weight.shape)].append(module.weight)
    bandwidth = copy_bandwidth(torch.device("cuda"))
    print(f"{args.preset} {args.dtype} on {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"copy {bandwidth / 1e12:.2f} TB/s")
    with torch.inference_mode():
        for shape, weights in by_shape.items():
            x = torch.randn(1, shape[1], device="cuda", dtype=weights[0].dtype)
            ref = F.linear(x, weights[0]).float()
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            times = {name: [] for name in FORMS}
            for _ in range(3):
                for name, form in FORMS.items():
                    graph = capture_graph(lambda form=form, x=x, ws=weights: [form(x, w) for w in ws])
                    times[name].append(graph_replay_ms(graph, 50))
            cells = []
            for name, form in FORMS.items():
                ms = sorted(times[name])[1]
                err = float((form(x, weights[0]).float() - ref).abs().max() / ref.abs().max())
                cells.append(f"{name} {ms / len(weights) * 1e3:6.1f} us ({nbytes / ms / 1e9:5.2f} TB/s, rel {err:.0e})")
            print(f"{shape!s:16s} x{len(weights):3d}  " + " | ".join(cells))


if __name__ == "__main__":
    main()
