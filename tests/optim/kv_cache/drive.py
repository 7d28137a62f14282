"""The conversations the KV, quantization and offload tests share (seeded tiny weights, seed 0);
driving and comparing them is ``harness/conversation.py``."""

from __future__ import annotations

import functools

from harness.conversation import Prompt, compare, conversation, named_prompt, within_budget

__all__ = ["compare", "conversation", "prompt", "reference", "within_budget"]


def prompt(name: str) -> Prompt:
    import qwen3_vl

    return named_prompt(name, qwen3_vl.config.preset("tiny"))


@functools.cache
def reference(name: str, plan: str = "reference", steps: int = 64):
    """The greedy conversation of ``plan`` (the reference plan by default) on prompt ``name``:
    (logits, tokens), computed once per test session."""
    import qwen3_vl

    kwargs = {} if steps == 64 else {"turn2": 0, "steps2": 0}
    logits, tokens, _ = conversation(qwen3_vl.from_pretrained("tiny", seed=0, plan=plan), prompt(name), steps=steps,
                                     **kwargs)
    return logits, tokens
