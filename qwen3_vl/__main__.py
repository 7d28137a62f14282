"""Command line: ``python -m qwen3_vl generate|info``."""

from __future__ import annotations

import argparse
import sys

import torch

from qwen3_vl.hardware.profiles import PROFILES


def _generate(args: argparse.Namespace) -> int:
    import qwen3_vl

    source = args.model or args.preset
    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give either --prompt TEXT or --prompt-ids IDS")
    if args.prompt_ids is not None and (args.image or args.video):
        raise ValueError("--image/--video need --prompt TEXT (--prompt-ids takes token ids only)")
    processor = None
    if args.prompt is not None:  # preprocess before loading the model, so bad input fails fast
        processor, inputs = _prompt_inputs(args, source)
    else:
        try:
            inputs = {"input_ids": torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])}
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    plan = args.plan
    if args.memory_budget:
        from qwen3_vl.optim.memory.planner import plan_with_budget

        plan = plan_with_budget(plan, args.memory_budget, args.device)
    model = qwen3_vl.from_pretrained(source, dtype=args.dtype, device=args.device, plan=plan, seed=args.seed,
                                     emulate=args.emulate)
    if args.verbose:
        print(model.hardware.report(), file=sys.stderr)
        print(model.plan_report(), file=sys.stderr)
        if hasattr(model.memory, "report"):  # the memory planner's placement
            print(model.memory.report(), file=sys.stderr)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.verbose and hasattr(model.attention, "describe"):  # which kernels actually ran
        print(f"attention: {model.attention.describe()}", file=sys.stderr)
    new_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    if processor is None:
        print(" ".join(str(t) for t in new_tokens))
        return 0
    if args.preset:
        print(f"note: preset '{args.preset}' has random weights and no tokenizer; text uses the byte-level "
              "fallback tokenizer (not Qwen's vocabulary)", file=sys.stderr)
    print(processor.tokenizer.decode(new_tokens, skip_special_tokens=True))
    return 0


def _prompt_inputs(args: argparse.Namespace, source: str) -> tuple:
    """The chat-formatted prompt with its images/video, as model inputs (and the processor for decoding)."""
    from qwen3_vl.processing import Processor, load_video

    min_pixels, max_pixels = args.min_pixels, args.max_pixels
    if args.pixel_budget:  # a hardware profile's image-size budget; explicit bounds still win
        from qwen3_vl.optim.vision.budget import pixel_budget

        budget = pixel_budget(args.pixel_budget, min_pixels, max_pixels, device=args.device)
        min_pixels, max_pixels = budget.min_pixels, budget.max_pixels
        if args.verbose:
            print(f"pixel budget: {min_pixels}..{max_pixels} pixels ({budget.source})", file=sys.stderr)
    processor = Processor.from_pretrained(
        source, min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=args.max_image_pixels
    )
    content = [{"type": "image", "image": path} for path in args.image or []]
    if args.video:
        video = load_video(args.video, fps=args.video_fps, max_image_pixels=processor.config.max_image_pixels)
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": args.prompt})
    return processor, processor(messages=[{"role": "user", "content": content}])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _info(args: argparse.Namespace) -> int:
    from qwen3_vl.config import from_hf, parameter_count, preset

    config = preset(args.preset) if args.preset else from_hf(args.model)
    t, v = config.text, config.vision
    counts = parameter_count(config)
    print(f"text:   {t.num_hidden_layers} layers, {t.num_attention_heads} attention heads, "
          f"{t.num_key_value_heads} KV heads, head_dim {t.head_dim}, hidden {t.hidden_size}, "
          f"intermediate {t.intermediate_size}, vocab {t.vocab_size}, tied={config.tie_word_embeddings}")
    print(f"vision: {v.depth} blocks, {v.num_heads} heads (head_dim {v.head_dim}), hidden {v.hidden_size}, "
          f"intermediate {v.intermediate_size}, DeepStack taps {list(v.deepstack_visual_indexes)}")
    for part in ("text", "lm_head", "vision", "total"):
        print(f"params {part + ':':8} {counts[part]:>15,}")
    for name, size in (("fp32", 4), ("fp16/bf16", 2), ("int8", 1), ("int4", 0.5)):
        print(f"bytes  {name + ':':10} {_human(counts['total'] * size):>12}")
    return 0


def _options(args: argparse.Namespace) -> int:
    """Every registered option: axis, exact or its error budget, requirements, fallback."""
    from qwen3_vl.optim import AXES, options

    rows = []
    for axis in AXES:
        for opt in options(axis):
            req = opt.requires
            needs = [f"devices {'/'.join(req.devices)}"] if set(req.devices) != {"cpu", "cuda"} else []
            if req.min_compute_capability:
                needs.append("sm" + "".join(map(str, req.min_compute_capability)) + "+")
            needs += [f"package {p}" for p in req.packages] + [f"with {n}" for n in opt.needs]
            budget = "exact" if opt.exact else ", ".join(f"{k}<={v:g}" if k != "top1_agreement" else f"{k}>={v:g}"
                                                         for k, v in opt.error_budget.items())
            rows.append((axis, opt.name + (" (reference)" if opt.reference else ""), budget,
                         "; ".join(needs) or "-", opt.fallback or "-", opt.summary))
    if args.markdown:
        print("| axis | option | exact / error budget | requires | falls back to | what it does |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    else:
        for axis, name, budget, needs, fallback, _summary in rows:
            print(f"{axis:10} {name:26} {budget:40} needs: {needs}; fallback: {fallback}")
    return 0


def _hardware(args: argparse.Namespace) -> int:
    from qwen3_vl.hardware.auto import choose
    from qwen3_vl.hardware.detect import detect_machine

    machine = detect_machine()
    flags = " ".join(sorted(machine.cpu_flags)) or "none detected"
    print(f"cpu:     {machine.cpu_name}, {machine.physical_cores} cores / {machine.logical_cores} threads, "
          f"ISA {machine.isa} ({flags}), RAM {_human(machine.ram_bytes)}")
    for gpu in machine.gpus:
        cc = ".".join(map(str, gpu.compute_capability))
        print(f"gpu {gpu.index}:   {gpu.name}, compute capability {cc}, {_human(gpu.memory_bytes)}")
    if not machine.gpus:
        print(f"gpu:     none visible to PyTorch {torch.__version__}")
    choice = choose(args.device, "auto", "auto")
    p = choice.profile
    print(choice.report())
    print(f"dtype policy: {p.dtype}; SDPA kernels: {', '.join(p.sdpa_backends)}; tiles: {dict(p.tiles)}; "
          f"max visual tokens per image: {p.max_visual_tokens}")
    print(f"auto plan: {choice.plan.short_id}")
    for fb in choice.skipped:
        print(f"  skipped {fb}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3_vl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate tokens from a prompt")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--preset", help="preset name (seeded random weights)")
    gen.add_argument("--prompt", help="prompt text, wrapped in the chat template; prints text (uses the "
                     "checkpoint's tokenizer.json, or for presets a byte-level fallback that is not Qwen's vocabulary)")
    gen.add_argument("--prompt-ids", help="comma-separated prompt token ids; prints token ids")
    gen.add_argument("--image", action="append", help="image file (repeat for several); placed before the text")
    gen.add_argument("--video", help="animated GIF/WebP/PNG, or a .npy [T,H,W,3] uint8 array (with --video-fps)")
    gen.add_argument("--video-fps", type=float, help="source frame rate of --video (needed for .npy)")
    gen.add_argument("--min-pixels", type=int, help="lower bound of the resized image area (default 65536)")
    gen.add_argument("--max-pixels", type=int, help="upper bound of the resized image area (default 16777216)")
    gen.add_argument("--pixel-budget", metavar="PROFILE",
                     help="take min/max pixels from a hardware profile (e.g. cpu-avx2, sm61-laptop) or 'auto' "
                     "(this machine's); --min-pixels/--max-pixels override it")
    gen.add_argument("--max-image-pixels", type=int,
                     help="refuse larger source images (decompression-bomb guard; default 89478485)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    gen.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                     help="fp16 = fp16 storage, fp32 compute; auto = the hardware profile's policy")
    gen.add_argument("--plan", default=None,
                     help="plan id, e.g. attention=sdpa,kv_cache=static; 'auto' = best plan for this hardware")
    gen.add_argument("--emulate", default=None, choices=sorted(PROFILES),
                     help="apply a hardware profile's constraints on this (stronger) machine")
    gen.add_argument("--memory-budget", metavar="SIZE",
                     help="device memory budget, e.g. 4GiB: the memory planner keeps what fits resident and "
                          "streams the rest (offload_cpu on a GPU, offload_disk on a CPU)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--verbose", action="store_true", help="print the plan report (fallbacks and reasons)")
    gen.set_defaults(func=_generate)

    info = sub.add_parser("info", help="parameter counts, layers, heads, bytes per dtype")
    isrc = info.add_mutually_exclusive_group(required=True)
    isrc.add_argument("--preset")
    isrc.add_argument("--model")
    info.set_defaults(func=_info)

    opts = sub.add_parser("options", help="every registered optimization with its exactness and requirements")
    opts.add_argument("--markdown", action="store_true", help="a Markdown table (as in the README)")
    opts.set_defaults(func=_options)

    hw = sub.add_parser("hardware", help="the detected machine, its hardware profile and the auto plan")
    hw.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    hw.set_defaults(func=_hardware)

    args = parser.parse_args(argv)
    from qwen3_vl import CheckpointError, ConfigError, InputError, PlanError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, InputError, PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
