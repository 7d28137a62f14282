"""The decode step's attention alone on a GPU: ``compile``'s Triton attention kernels (attend) against the eager ops
they replace, compiled by Inductor (what the ``compile`` step runs) and eager, for one step of every layer
captured in one CUDA graph (each layer its own cache, as in the model), interleaved rounds.

A diagnostic for choosing the kernel's form, cheaper than a model's compile: the weights' reads between layers
are absent here, so the caches may stay in L2 and the times are the attention's latency, not the step's.
Then the prompt's kernels (``compile[prefill_qk=true]``) the same way: a 2b prompt's q/k norms and rotary for
every text layer, and the ViT's q/k rotary for every ViT layer, against the eager ops they replace.

    python scripts/gpu_attention_kernel.py [--dtype bf16] [--rounds 3] [--tiles 16,32,64]

Both forms of the kernels: ``kernels/R`` a program per query head (the default), ``grouped/R`` a program per KV
head reading each tile once for its query heads (``decode_attention(grouped=True)``), R cached rows a tile.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

from harness.timing import capture_graph, graph_replay_ms
from qwen3_vl.kernels import triton_decode_attention as kernel

SHAPES = {  # name: (query heads, KV heads, head size, layers, cache capacity, position)
    "2b at the benchmark's prompt": (16, 8, 128, 28, 512, 300),
    "8b at the benchmark's prompt": (32, 8, 128, 36, 512, 300),
    "8b at 4000 of 4096": (32, 8, 128, 36, 4096, 4000),
}


def layer_inputs(heads, kv_heads, d, capacity, position, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    qkv = draw(1, 1, (heads + 2 * kv_heads) * d, scale=3.0)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    angles = torch.rand(1, 1, d // 2, generator=gen, device="cuda") * 100
    angles = torch.cat([angles, angles], dim=-1)
    valid = torch.zeros(1, capacity, dtype=torch.bool, device="cuda")
    valid[:, : position + 1] = True
    return dict(q=q, k=k, v=v, q_norm=1 + 0.5 * draw(d), k_norm=1 + 0.5 * draw(d), eps=1e-6,
                cos=angles.cos().to(dtype), sin=angles.sin().to(dtype), keys=draw(1, kv_heads, capacity, d),
                values=draw(1, kv_heads, capacity, d), position=torch.tensor([position], device="cuda"),
                valid=valid, scale=d**-0.5, heads=heads, kv_heads=kv_heads)


PROMPT_SHAPES = {  # name: (text rows, query heads, KV heads, head size, text layers, patches, ViT heads, ViT head size,
    #                 ViT layers): the 2b benchmark's prompt (262 tokens padded to 320, one 448x448 image)
    "2b prompt": (320, 16, 8, 128, 28, 1024, 16, 64, 24),
}


def prompt_inputs(n, heads, kv_heads, d, patches, vit_heads, vit_d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    q, k, _ = draw(1, n, (heads + 2 * kv_heads) * d, scale=3.0).split([heads * d, kv_heads * d, kv_heads * d], -1)
    angles = torch.rand(1, 1, n, d // 2, generator=gen, device="cuda") * 100
    angles = torch.cat([angles, angles], dim=-1)
    text = dict(q=q, k=k, q_norm=1 + 0.5 * draw(d), k_norm=1 + 0.5 * draw(d), eps=1e-6, cos=angles.cos().to(dtype),
                sin=angles.sin().to(dtype), heads=heads, kv_heads=kv_heads)
    vq, vk, _ = draw(patches, 3, vit_heads, vit_d, scale=3.0).unbind(1)
    vit_angles = torch.rand(patches, 1, vit_d // 2, generator=gen, device="cuda") * 50
    vit_angles = torch.cat([vit_angles, vit_angles], dim=-1)
    return text, dict(q=vq, k=vk, cos=vit_angles.cos(), sin=vit_angles.sin())


def time_forms(forms: dict, steps: dict[str, list[dict]], rounds: int, replays: int) -> dict[str, list[float]]:
    """Microseconds per layer of each form, one sample a round: the form's calls over its ``steps`` (one layer's
    inputs each) captured in one graph, rounds interleaved (order rotated). ``steps`` outlives the graphs: a
    capture empties the allocator's cache, so a graph whose buffers were freed would replay into unmapped memory
    (an illegal address)."""
    graphs = {form: capture_graph(lambda fn=fn, inputs=steps[form]: [fn(**x) for x in inputs])
              for form, fn in forms.items()}
    times = {form: [] for form in forms}
    for r in range(rounds):
        for form in list(forms)[r % len(forms):] + list(forms)[: r % len(forms)]:
            times[form].append(1000 * graph_replay_ms(graphs[form], replays) / len(steps[form]))
    return times


def median(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def medians(forms: dict, steps: list[dict], rounds: int, replays: int) -> dict[str, float]:
    """``time_forms``' median per form, every form over the same ``steps`` (forms that write nothing)."""
    return {form: median(samples) for form, samples in time_forms(forms, dict.fromkeys(forms, steps), rounds,
                                                                   replays).items()}


def prompt_kernels(dtype, rounds: int, replays: int) -> None:
    for name, (n, heads, kv_heads, d, layers, patches, vit_heads, vit_d, vit_layers) in PROMPT_SHAPES.items():
        shape = (n, heads, kv_heads, d, patches, vit_heads, vit_d)
        text, vit = prompt_inputs(*shape, torch.float32, 0)
        err_text = max(rel(a, b) for a, b in zip(kernel.qk_norm_rotary(**text), kernel.qk_reference(**text),
                                                 strict=True))
        err_vit = max(rel(a, b) for a, b in zip(kernel.vision_rotary(**vit), kernel.vision_reference(**vit),
                                                strict=True))
        steps = [prompt_inputs(*shape, dtype, seed) for seed in range(max(layers, vit_layers))]
        texts, vits = [text for text, _ in steps[:layers]], [vit for _, vit in steps[:vit_layers]]
        text_us = medians({"kernel": kernel.qk_norm_rotary, "eager": kernel.qk_reference}, texts, rounds, replays)
        vit_us = medians({"kernel": kernel.vision_rotary, "eager": kernel.vision_reference}, vits, rounds, replays)
        print(f"{name}: text q/k norm+rotary, {n} rows, {heads} / {kv_heads} heads of {d}: kernel "
              f"{text_us['kernel']:.2f} us a layer, eager {text_us['eager']:.2f} (fp32 rel err {err_text:.1e}); "
              f"ViT q/k rotary, {patches} patches, {vit_heads} heads of {vit_d}: kernel {vit_us['kernel']:.2f}, "
              f"eager {vit_us['eager']:.2f} (fp32 rel err {err_vit:.1e})")


def own_caches(inputs: dict) -> dict:
    """One layer's inputs with copies of its caches (the kernels and the eager ops write the step's row)."""
    return {**inputs, "keys": inputs["keys"].clone(), "values": inputs["values"].clone()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--tiles", type=lambda text: [int(x) for x in text.split(",")], default=[16, 32, 64],
                        help="cached rows per tile to time the kernels at (the module's BLOCK_T is the default)")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"decode attention on {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; "
          f"split kernel of {kernel.BLOCK_T}-row tiles, at most {kernel.MAX_SPLITS} slices a head")
    inductor = torch.compile(kernel.reference, dynamic=False, fullgraph=True)

    def tiled(rows, grouped=False):  # the kernels with another tile size (the module's constant is read at each call)
        def call(**inputs):
            with mock.patch.object(kernel, "BLOCK_T", rows):
                return kernel.decode_attention(**inputs, grouped=grouped)
        return call

    forms = {**{f"kernels/{rows}": tiled(rows) for rows in args.tiles},
             **{f"grouped/{rows}": tiled(rows, grouped=True) for rows in args.tiles},
             "inductor": inductor, "eager": kernel.reference}
    for name, (heads, kv_heads, d, layers, capacity, position) in SHAPES.items():
        # exactness first, on fresh fp32 inputs: both kernel forms against the eager ops
        one = layer_inputs(heads, kv_heads, d, capacity, position, torch.float32, 0)
        want = kernel.reference(**own_caches(one))
        err32 = max(rel(kernel.decode_attention(**own_caches(one), grouped=grouped), want) for grouped in (False, True))
        steps = [layer_inputs(heads, kv_heads, d, capacity, position, dtype, seed) for seed in range(layers)]
        caches = {form: [own_caches(x) for x in steps] for form in forms}  # each form writes its own
        times = time_forms(forms, caches, args.rounds, args.replays)
        print(f"{name}: {heads} heads / {kv_heads} KV of {d}, cache {capacity}, position {position}; "
              f"fp32 kernels (both forms) vs eager rel err {err32:.1e} at most")
        for form, samples in times.items():
            print(f"  {form:12} {median(samples):6.2f} us a layer  (samples "
                  f"{', '.join(f'{s:.2f}' for s in samples)})")
    prompt_kernels(dtype, args.rounds, args.replays // 4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
