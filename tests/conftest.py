"""Shared fixtures: a seeded random tiny checkpoint on disk and its transformers twin (the oracle)."""

from __future__ import annotations

import pytest
import torch

import qwen3_vl


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-ckpt")
    qwen3_vl.save_pretrained(qwen3_vl.from_pretrained("tiny", seed=1234), path)
    return str(path)


@pytest.fixture(scope="session")
def hf_tiny(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="session")
def ours_tiny(tiny_checkpoint):
    return qwen3_vl.from_pretrained(tiny_checkpoint)
