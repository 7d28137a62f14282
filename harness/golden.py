"""Golden outputs: the reference plan checked against numbers recorded from transformers (the oracle).

Comparing an option with the reference plan cannot catch a fault in code both share (the vision
merger, RoPE sections, DeepStack, the decode positions in ``generate``): both would be wrong the same
way. So the reference plan itself is compared with a small file of outputs that transformers'
``Qwen3VLForConditionalGeneration`` produced for the same seeded weights and prompts.

Per prompt and real position the file keeps a fingerprint of the whole next-token distribution: the
logsumexp over the vocabulary, the argmax, and the logits of a fixed set of probe token ids. For a
greedy decode it keeps the generated tokens and the same summary per step; for the image prompt, the
vision tower's merged tokens and DeepStack features (where a vision fault is not diluted by the text
layers). ``python -m harness golden --write`` regenerates the file (needs transformers, a test-only
dependency of this project).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.results import Measurement
from harness.workload import PromptSpec, RowSpec, build_prompt, generate

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
SEED = 0  # the weights' seed (qwen3_vl.from_pretrained(preset, seed=SEED))
PROMPTS: dict[str, PromptSpec] = {
    "text": PromptSpec((RowSpec(12),), seed=1),
    # Two rows with images of different sizes and lengths: vision, DeepStack, M-RoPE and left padding.
    "images_padded": PromptSpec((RowSpec(5, (8, 12), 3), RowSpec(4, (4, 6), 6)), seed=2),
}
DECODE_PROMPT = "images_padded"
NEW_TOKENS = 6
NUM_PROBES = 16
# Relative to max |value|. transformers and the reference agree to ~1e-6; a GELU variant swapped in the
# merger moves the logits by ~9e-5 and the vision features by far more.
TOLERANCE = 1e-5


def path_for(preset: str) -> Path:
    return GOLDEN_DIR / f"{preset}.json"


def probe_ids(vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(1234)
    return sorted(torch.randperm(vocab, generator=gen)[:NUM_PROBES].tolist())


def summarize(logits: torch.Tensor, probes: list[int]) -> dict[str, list]:
    """[N, V] logits -> per-row logsumexp, argmax and probe logits (what the file stores)."""
    logits = logits.double()
    return {
        "lse": logits.logsumexp(-1).tolist(),
        "argmax": logits.argmax(-1).tolist(),
        "probes": logits[:, probes].tolist(),
    }


def record(model) -> dict[str, Any]:
    """Our model's summaries for every golden prompt and the greedy decode."""
    probes = probe_ids(model.config.text.vocab_size)
    out: dict[str, Any] = {"probe_ids": probes, "prompts": {}}
    for name, spec in PROMPTS.items():
        prompt = build_prompt(model.config, spec)
        logits = model(prompt.input_ids, **prompt.inputs()).float().cpu()
        out["prompts"][name] = summarize(logits[prompt.valid()], probes)
    prompt = build_prompt(model.config, PROMPTS[DECODE_PROMPT])
    with torch.inference_mode():
        tokens, deepstack = model.vision.encode(model, prompt.pixel_values.to(model.device), prompt.image_grid_thw)
    out["vision"] = {"tokens": tokens.float().cpu().tolist(),
                     "deepstack": [d.float().cpu().tolist() for d in deepstack]}
    tokens, step_logits, _ = generate(model, prompt, NEW_TOKENS)  # [B, N], [B, N, V]
    out["decode"] = {
        "tokens": tokens.tolist(),
        **summarize(step_logits.reshape(-1, step_logits.shape[-1]), probes),
    }
    return out


def record_transformers(preset: str) -> dict[str, Any]:
    """The oracle's summaries for the preset's seeded weights (needs transformers)."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError("recording golden outputs needs transformers (pip install -e '.[test]')") from None
    import qwen3_vl

    ours = qwen3_vl.from_pretrained(preset, seed=SEED)
    with tempfile.TemporaryDirectory() as tmp:
        qwen3_vl.save_pretrained(ours, tmp)
        hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager").eval()
    config = ours.config
    probes = probe_ids(config.text.vocab_size)
    out: dict[str, Any] = {"probe_ids": probes, "prompts": {}}

    def hf_inputs(prompt):
        ids = prompt.input_ids
        types = (ids == config.image_token_id).long()
        kw = {"input_ids": ids, "mm_token_type_ids": types}
        if prompt.pixel_values is not None:
            kw.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
        if prompt.attention_mask is not None:
            kw["attention_mask"] = prompt.attention_mask
        return kw

    with torch.no_grad():
        for name, spec in PROMPTS.items():
            prompt = build_prompt(config, spec)
            kw = hf_inputs(prompt)
            if prompt.attention_mask is not None:  # transformers' generate-path positions for padded rows
                kw["position_ids"] = hf._prepare_position_ids_for_generation(
                    kw["input_ids"], {k: v for k, v in kw.items() if k != "input_ids"})
            logits = hf(**kw).logits.float()
            out["prompts"][name] = summarize(logits[prompt.valid()], probes)
        prompt = build_prompt(config, PROMPTS[DECODE_PROMPT])
        vision = hf.model.visual(prompt.pixel_values, grid_thw=prompt.image_grid_thw)
        out["vision"] = {"tokens": vision.pooler_output.float().tolist(),
                         "deepstack": [d.float().tolist() for d in vision.deepstack_features]}
        gen = hf.generate(**hf_inputs(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=config.pad_token_id,
                          output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(gen.logits, dim=1).float()
    out["decode"] = {
        "tokens": gen.sequences[:, prompt.length:].tolist(),
        **summarize(step_logits.reshape(-1, step_logits.shape[-1]), probes),
    }
    out["source"] = {"transformers": transformers.__version__, "torch": torch.__version__, "preset": preset,
                     "seed": SEED}
    return out


def _compact(value: Any) -> Any:
    """Floats to 9 significant digits (fp32 carries ~7; the file stays small and diffable)."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def write(preset: str) -> Path:
    path = path_for(preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_compact(record_transformers(preset))) + "\n")
    return path


def load(preset: str) -> dict[str, Any] | None:
    path = path_for(preset)
    return json.loads(path.read_text()) if path.exists() else None


def _rel(ours: dict, gold: dict) -> float:
    a = torch.tensor(ours["probes"], dtype=torch.float64)
    b = torch.tensor(gold["probes"], dtype=torch.float64)
    lse_a = torch.tensor(ours["lse"], dtype=torch.float64)
    lse_b = torch.tensor(gold["lse"], dtype=torch.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(b.abs().max().item(), lse_b.abs().max().item())
    return max((a - b).abs().max().item(), (lse_a - lse_b).abs().max().item()) / scale


def _tensor_rel(ours: list, gold: list) -> float:
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(gold, dtype=torch.float64)
    if a.shape != b.shape:
        return float("inf")
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(ours: dict[str, Any], gold: dict[str, Any]) -> list[tuple[str, Measurement]]:
    """(case, measurement) per golden prompt and for the decode: relative error and argmax agreement."""
    out = []
    parts = [(f"golden_{name}", ours["prompts"].get(name), g) for name, g in gold["prompts"].items()]
    parts.append(("golden_decode", ours["decode"], gold["decode"]))
    for case, mine, theirs in parts:
        if mine is None:
            out.append((case, Measurement("logits_rel", None, status="failed", error="prompt not recorded")))
            continue
        rel = _rel(mine, theirs)
        ok = rel <= TOLERANCE
        out.append((case, Measurement("logits_rel", rel, "ratio", status="ok" if ok else "failed",
                                      error="" if ok else f"differs from the transformers golden output by {rel:.3g}"
                                      f" (tolerance {TOLERANCE:g})", bound=TOLERANCE, better="lower")))
        agree = sum(a == b for a, b in zip(mine["argmax"], theirs["argmax"], strict=False)) / max(
            1, len(theirs["argmax"]))
        out.append((case, Measurement("top1_agreement", agree, "fraction", status="ok" if agree == 1 else "failed",
                                      error="" if agree == 1 else "argmax differs from the golden output",
                                      bound=1.0, better="higher")))
    pairs = zip(ours["vision"]["deepstack"], gold["vision"]["deepstack"], strict=True)
    rel = max(_tensor_rel(ours["vision"]["tokens"], gold["vision"]["tokens"]), *(_tensor_rel(a, b) for a, b in pairs))
    ok = rel <= TOLERANCE
    out.append(("golden_vision", Measurement("features_rel", rel, "ratio", status="ok" if ok else "failed",
                                             error="" if ok else f"vision features differ from the golden output by "
                                             f"{rel:.3g} (tolerance {TOLERANCE:g})", bound=TOLERANCE, better="lower")))
    same = ours["decode"]["tokens"] == gold["decode"]["tokens"]
    out.append(("golden_decode", Measurement("greedy_match", float(same), "fraction", status="ok" if same else "failed",
                                             error="" if same else "greedy tokens differ from the golden output",
                                             bound=1.0, better="higher")))
    return out
