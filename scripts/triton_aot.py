"""Compile our Triton kernels ahead of time for a GPU this machine does not have, and read their resources.

No GPU needed: Triton's compiler and ptxas run on the CPU. For each kernel form the decode step uses (2b
shapes), prints registers, spills, shared memory and how the big loads were compiled (``cp.async``: pipelined
through shared memory; ``ld.global.v4``: 16-byte loads; ``ld.global.b16``: one element at a time). This is the
check that Triton's interpreter (how the tests run the kernels on a CPU) cannot make: that the kernel compiles
for the card at all, and that its loads are wide. Pointers, strides and the GEMV's sizes are marked divisible by
16, as Triton's launcher marks them at run time for our aligned buffers and every 2b and 8b shape.

    pip install --target /tmp/triton triton==3.6.0      # the device image's version
    PYTHONPATH=/tmp/triton:. python scripts/triton_aot.py [--arch 90] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from qwen3_vl.kernels import triton_decode_attention, triton_gemv
from qwen3_vl.optim.plan import failure_text

BF16 = "*bf16"
ATTENTION_ARGS = {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "q_norm_ptr", "k_norm_ptr", "cos_ptr", "sin_ptr",
                                   "keys_ptr", "values_ptr"], BF16),
                  "position_ptr": "*i64", "valid_ptr": "*i1", "stats_ptr": "*fp32", "partial_ptr": "*fp32",
                  **dict.fromkeys(["stride_qb", "stride_kb", "stride_vb", "stride_cb", "stride_cache_b",
                                   "stride_cache_h", "stride_cache_t", "stride_valid_b"], "i32"),
                  "eps": "fp64", "scale": "fp64"}  # fp64: how Inductor types a Python float argument
COMBINE_ARGS = {"stats_ptr": "*fp32", "partial_ptr": "*fp32", "out_ptr": BF16}
QK_ARGS = {**dict.fromkeys(["q_ptr", "k_ptr", "q_norm_ptr", "k_norm_ptr", "cos_ptr", "sin_ptr", "q_out_ptr",
                            "k_out_ptr"], BF16),
           **dict.fromkeys(["stride_qb", "stride_qt", "stride_kb", "stride_kt", "stride_cb", "stride_ct", "n"], "i32"),
           "eps": "fp64"}
VISION_ARGS = {**dict.fromkeys(["q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr"], BF16), "cos_ptr": "*fp32",
               "sin_ptr": "*fp32", **dict.fromkeys(["stride_q", "stride_k", "stride_c"], "i32")}
GEMV_ARGS = {**dict.fromkeys(["x_ptr", "w_ptr", "out_ptr", "norm_ptr", "res_ptr"], BF16), "n": "i32", "k": "i32",
             "stride_w": "i32", "eps": "fp64"}


def forms() -> list[tuple[str, object, dict, dict, int]]:
    """(label, kernel, runtime argument types, constexprs, warps) for each form the 2b decode step (and the
    prefill's q/k kernel) runs."""
    rows, block_k, warps = triton_gemv.tile(2048, 2048)
    gemv = [(f"gemv {label}", triton_gemv._kernel(), GEMV_ARGS,
             dict(BLOCK_N=rows, BLOCK_K=block_k, NORM=norm, GATED=gated, RESIDUAL=residual), warps)
            for label, norm, gated, residual in [("plain", False, False, False),
                                                 ("norm (q/k/v, gate/up)", True, False, False),
                                                 ("residual (o_proj)", False, False, True),
                                                 ("gated+residual (down)", False, True, True)]]
    split, combine, qk, vision = triton_decode_attention._kernels()
    count, tiles = triton_decode_attention.splits(512)  # a 2b step's cache at the benchmark's prompt
    _, long_tiles = triton_decode_attention.splits(8192)  # past MAX_SPLITS tiles: slices of several
    block = triton_decode_attention.BLOCK_T
    attention = [("decode_attention split, 16 heads / 8 KV, d 128", split, ATTENTION_ARGS,
                  dict(HEADS=16, GROUPS=2, D=128, BLOCK_T=block, TILES=tiles, GROUPED=False, G_PAD=1), 4),
                 (f"decode_attention split, 8192-row cache ({long_tiles} tiles a slice)", split, ATTENTION_ARGS,
                  dict(HEADS=16, GROUPS=2, D=128, BLOCK_T=block, TILES=long_tiles, GROUPED=False, G_PAD=1), 4),
                 ("decode_attention grouped, 16 heads / 8 KV, d 128", split, ATTENTION_ARGS,
                  dict(HEADS=16, GROUPS=2, D=128, BLOCK_T=block, TILES=tiles, GROUPED=True, G_PAD=16), 4),
                 (f"decode_attention grouped, 8b: 32 heads / 8 KV, 8192-row cache ({long_tiles} tiles a slice)",
                  split, ATTENTION_ARGS,
                  dict(HEADS=32, GROUPS=4, D=128, BLOCK_T=block, TILES=long_tiles, GROUPED=True, G_PAD=16), 4),
                 ("decode_attention combine", combine, COMBINE_ARGS, dict(SPLITS=count, SPLITS_P2=count, D=128), 4),
                 ("qk_norm_rotary (prefill), 16 heads / 8 KV, d 128", qk, QK_ARGS,
                  dict(HEADS=16, KV_HEADS=8, D=128), 1),
                 ("vision_rotary (prefill ViT), 16 heads, d 64", vision, VISION_ARGS, dict(HEADS=16, D=64), 1)]
    return [*gemv, *attention]


def compile_form(kernel, args: dict, constexprs: dict, warps: int, arch: int):
    signature = {**args, **dict.fromkeys(constexprs, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
               if name.endswith("_ptr") or name.startswith("stride") or name in ("n", "k")}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def ptxas_report(ptx: str, arch: int, workdir: Path) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    path = workdir / "kernel.ptx"
    path.write_text(ptx)
    suffix = "a" if arch >= 90 else ""
    done = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(path), "-o", str(workdir / "k.cubin")],
                          capture_output=True, text=True, check=True)
    used = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return f"{used.group(1) if used else '?'} registers, spills {spills.group(1)}/{spills.group(2)} B" if spills \
        else done.stderr.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--keep", type=Path, help="write each form's PTX here")
    args = parser.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, kernel, types, constexprs, warps in forms():
            # Inductor types a Python float argument fp64, Triton's own launcher fp32: the kernel must take both
            # (the report is of the fp64 form, the one the compiled decode step runs).
            launcher_types = {name: "fp32" if kind == "fp64" else kind for name, kind in types.items()}
            try:
                compile_form(kernel, launcher_types, constexprs, warps, args.arch)
                compiled = compile_form(kernel, types, constexprs, warps, args.arch)
            except Exception as exc:  # one form failing does not hide the others
                failed += 1
                print(f"FAIL {label}: {failure_text(exc)}")
                continue
            ptx = compiled.asm["ptx"]
            loads = {kind: len(re.findall(pattern, ptx)) for kind, pattern in
                     [("cp.async", r"cp\.async\.(?:ca|cg)"), ("v4", r"ld\.global(?:\.\w+)*\.v4"),
                      ("v2", r"ld\.global(?:\.\w+)*\.v2"), ("b16", r"ld\.global(?:\.\w+)*\.b16\s")]}
            print(f"ok   {label}: {ptxas_report(ptx, args.arch, Path(tmp))}, shared {compiled.metadata.shared} B, "
                  f"loads {loads}")
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / (re.sub(r"\W+", "_", label) + ".ptx")).write_text(ptx)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
