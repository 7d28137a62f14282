"""Bad model inputs: one clear error naming the problem."""

from __future__ import annotations

import pytest
import torch

from qwen3_vl.model.positions import InputError

from .prompts import image_prompt


@pytest.fixture()
def prompt(ours_tiny):
    return image_prompt(ours_tiny.config, [(1, 4, 6)], seed=13)


def test_too_many_placeholders(ours_tiny, prompt):
    ids, pixels, grid = prompt
    extra = torch.cat([ids, torch.tensor([[ours_tiny.config.image_token_id]])], 1)
    with pytest.raises(InputError, match="image token count does not match the image grid: the prompt has 7"):
        ours_tiny(extra, pixel_values=pixels, image_grid_thw=grid)


def test_placeholders_without_pixels(ours_tiny, prompt):
    with pytest.raises(InputError, match="6 image placeholder tokens but no image given"):
        ours_tiny(prompt[0])


def test_pixels_that_do_not_fit_the_grid(ours_tiny, prompt):
    ids, pixels, grid = prompt
    with pytest.raises(InputError, match=r"image pixel values have shape \(23, 1536\), the grid needs \[24, 1536\]"):
        ours_tiny(ids, pixel_values=pixels[:-1], image_grid_thw=grid)
    with pytest.raises(InputError, match="multiples of 2"):
        ours_tiny(ids, pixel_values=torch.randn(15, 1536), image_grid_thw=torch.tensor([[1, 3, 5]]))
    with pytest.raises(InputError, match="zero or negative"):
        ours_tiny(ids, pixel_values=torch.randn(0, 1536), image_grid_thw=torch.tensor([[1, 0, 4]]))


def test_grid_without_pixels(ours_tiny, prompt):
    with pytest.raises(InputError, match="image_grid_thw given without the image pixel values"):
        ours_tiny(prompt[0][:, :3], image_grid_thw=prompt[2])


def test_prompt_longer_than_context(ours_tiny):
    config = ours_tiny.config
    short = config.replace(text=config.text.__class__(**{**config.text.__dict__, "max_position_embeddings": 8}))
    import qwen3_vl

    model = qwen3_vl.build(short, None)
    with pytest.raises(InputError, match="prompt of 9 tokens is longer than the context \\(8 tokens\\)"):
        model(torch.arange(9)[None])


@pytest.mark.parametrize(("ids", "message"), [
    (torch.tensor([1, 2]), r"\[batch, seq\] integer tensor"),
    (torch.tensor([[1.0, 2.0]]), "must be integers"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.tensor([[1, 10**6]]), "outside the vocabulary"),
])
def test_malformed_ids(ours_tiny, ids, message):
    with pytest.raises(InputError, match=message):
        ours_tiny(ids)


def test_mask_shape_and_empty_rows(ours_tiny):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="attention_mask shape"):
        ours_tiny(ids, attention_mask=torch.ones(1, 2))
    with pytest.raises(InputError, match="row with no real token"):
        ours_tiny(ids, attention_mask=torch.zeros(1, 3))
