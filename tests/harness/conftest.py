"""Fixtures for the harness tests: test-only options added to the registry, tiny models, fast settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qwen3_vl
from harness import numerics
from harness.settings import Settings
from qwen3_vl.checkpoint import hf_state_dict
from qwen3_vl.config import PRESETS, preset
from qwen3_vl.optim import registry


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's matrices are too small to split, and on a busy 2-core
    machine OpenMP's spinning threads made these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def extra_options(monkeypatch):
    """``extra_options(opt, ...)`` registers test-only options for the rest of the test."""
    registry._load()

    def add(*options):
        table = dict(registry._OPTIONS)
        for opt in options:
            table[(opt.axis, opt.name)] = opt
        monkeypatch.setattr(registry, "_OPTIONS", table)

    return add


def small_vocab_config():
    """The tiny preset with a 2048-token vocabulary: the 151936-way LM head dominates every forward pass
    of the tiny model, and these tests need many of them. Special tokens move inside the vocabulary."""
    config = preset("tiny")
    return config.replace(
        text=dataclasses.replace(config.text, vocab_size=2048), image_token_id=2001, video_token_id=2002,
        vision_start_token_id=2003, vision_end_token_id=2004, eos_token_ids=(2005,), pad_token_id=2006,
    ).validate()


@pytest.fixture
def references_only(monkeypatch):
    """A registry holding only each axis's reference option (add test options with ``extra_options``)."""
    registry._load()
    monkeypatch.setattr(registry, "_OPTIONS", {k: v for k, v in registry._OPTIONS.items() if v.reference})


def copy_of_reference(axis: str, name: str):
    """An exact option that is the axis's reference under another name (an honest, cheap option)."""
    return dataclasses.replace(registry.reference_option(axis), name=name, reference=False)


@pytest.fixture(scope="session")
def tiny_weights():
    """(config, HF-keyed seeded weights) of the small-vocabulary tiny model."""
    reference = qwen3_vl.build(small_vocab_config(), None, seed=0)
    return reference.config, hf_state_dict(reference)


@pytest.fixture
def small_preset(monkeypatch) -> str:
    """Registers the small-vocabulary tiny model as preset ``test-small`` for commands that take a name."""
    monkeypatch.setitem(PRESETS, "test-small", small_vocab_config())
    return "test-small"


@pytest.fixture
def models(tiny_weights):
    config, weights = tiny_weights

    def build(plan, dtype):
        return qwen3_vl.build(config, {k: v.clone() for k, v in weights.items()}, dtype=dtype, plan=plan)

    return numerics.Models(build)


@pytest.fixture
def fast_settings() -> Settings:
    """Enough rounds and examples to exercise every path, few enough for a 2-core CI machine."""
    return Settings(budget_s=0.0, rounds=2, warmup=1, new_tokens=2, group_size=2, numerics_examples=3,
                    numerics_dtypes=("fp32",))
