"""Tiny models sharing seeded random weights, one per vision option, and a ViT call counter."""

from __future__ import annotations

import pytest
import torch

import qwen3_vl

SEED = 7


def build(plan: str = "reference", **kwargs):
    return qwen3_vl.from_pretrained("tiny", seed=SEED, plan=plan, **kwargs)


@pytest.fixture(scope="module")
def full():
    return build()


@pytest.fixture
def cond():
    """A fresh ``vision=conditional`` model (empty cache) per test."""
    return build("vision=conditional")


class VitCalls:
    """Counts the ViT forwards of a model and remembers how many pixel rows each one got."""

    def __init__(self, model) -> None:
        self.rows: list[int] = []
        self._forward = model.visual.forward
        model.visual.forward = self

    def __call__(self, pixel_values, grid_thw, *args):
        self.rows.append(pixel_values.shape[0])
        return self._forward(pixel_values, grid_thw, *args)

    @property
    def count(self) -> int:
        return len(self.rows)


def forbid_vit(model) -> None:
    def fail(*args):
        raise AssertionError("the vision tower ran")

    model.visual.forward = fail


def last_logits(model, ids, **inputs) -> torch.Tensor:
    """The next-token logits as generation computes them (prefill with logits_to_keep=1)."""
    return model(ids, logits_to_keep=1, **inputs)[:, -1]
