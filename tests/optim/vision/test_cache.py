"""The vision cache: byte budget, LRU eviction order, collisions that cannot leak features, disk tier."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_vl.optim.vision import conditional
from qwen3_vl.optim.vision.conditional import VisionCache, content_key
from tests.model.prompts import image_prompt

from .conftest import SEED, VitCalls, build


def _features(rows: int, fill: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """rows x 8 fp32 tokens + one DeepStack level: 64 bytes per row."""
    return torch.full((rows, 8), float(fill)), [torch.full((rows, 8), float(fill))]


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(0, 4096),
    ops=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 7), st.integers(1, 40)), max_size=40),
)
def test_byte_budget_is_never_exceeded(budget, ops):
    cache = VisionCache(budget)
    for op, key, rows in ops:
        if op == "put":
            cache.put(str(key), f"id{key}", *_features(rows))
            size = 64 * rows
            assert (str(key) in cache.entries) == (size <= budget)  # kept unless larger than the whole budget
        else:
            cache.get(str(key), f"id{key}")
        assert cache.bytes == sum(e.nbytes for e in cache.entries.values()) <= budget


def test_least_recently_used_goes_first():
    cache = VisionCache(3 * 64)  # room for three 1-row entries
    for key in "abc":
        cache.put(key, key, *_features(1))
    assert cache.get("a", "a") is not None  # a becomes the most recent: order b, c, a
    cache.put("d", "d", *_features(1))
    assert list(cache.entries) == ["c", "a", "d"]
    cache.put("e", "e", *_features(2))  # needs two slots: evicts c then a
    assert list(cache.entries) == ["d", "e"]
    assert cache.stats["evictions"] == 3
    cache.put("huge", "huge", *_features(4))
    assert "huge" not in cache.entries and cache.stats["too_large"] == 1 and list(cache.entries) == ["d", "e"]


def test_key_covers_grid_and_dtypes():
    pixels = torch.randn(96, 1536)
    grid, transposed = torch.tensor([[1, 8, 12]]), torch.tensor([[1, 12, 8]])
    keys = {
        content_key(pixels, grid, torch.float32),
        content_key(pixels, transposed, torch.float32),  # same bytes, other grid
        content_key(pixels.view(torch.int32), grid, torch.float32),  # same bytes, other dtype
        content_key(pixels, grid, torch.bfloat16),  # other compute dtype
    }
    assert len({k for k, _ in keys}) == 4 and len({i for _, i in keys}) == 4


def test_same_pixels_with_another_grid_get_their_own_features(full, cond):
    config = full.config
    ids, pixels, grid = image_prompt(config, [(1, 8, 12)], seed=1)
    transposed = torch.tensor([[1, 12, 8]])  # the same 96 rows and the same token count, another image
    calls = VitCalls(cond)
    for g in (grid, transposed):
        out = cond(ids, pixel_values=pixels, image_grid_thw=g)
        assert torch.equal(out, full(ids, pixel_values=pixels, image_grid_thw=g))
    assert calls.count == 2


def test_a_key_collision_cannot_return_another_images_features(full, cond, monkeypatch):
    real = conditional.content_key
    monkeypatch.setattr(conditional, "content_key", lambda p, g, d: ("one-key-for-all", real(p, g, d)[1]))
    ids, a, grid = image_prompt(full.config, [(1, 8, 12)], seed=2)
    b = a.flip(0)  # other pixels, same grid
    for pixels in (a, b, a):
        out = cond(ids, pixel_values=pixels, image_grid_thw=grid)
        assert torch.equal(out, full(ids, pixel_values=pixels, image_grid_thw=grid))
    assert cond.vision.cache.stats["collisions"] == 2 and cond.vision.cache.stats["hits"] == 0


def test_disk_tier_serves_a_new_process_and_refuses_other_weights(tmp_path, full):
    ids, pixels, grid = image_prompt(full.config, [(1, 8, 12)], seed=3)
    ref = full(ids, pixel_values=pixels, image_grid_thw=grid)
    plan = f"vision=conditional[disk_dir={tmp_path}]"
    build(plan)(ids, pixel_values=pixels, image_grid_thw=grid)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    fresh = build(plan)  # same weights, empty memory tier: like a new process
    calls = VitCalls(fresh)
    assert torch.equal(fresh(ids, pixel_values=pixels, image_grid_thw=grid), ref)
    assert calls.count == 0 and fresh.vision.cache.stats["disk_hits"] == 1

    import qwen3_vl

    other = qwen3_vl.from_pretrained("tiny", seed=SEED + 1, plan=plan)  # other weights, same directory
    calls = VitCalls(other)
    other(ids, pixel_values=pixels, image_grid_thw=grid)
    assert calls.count == 1 and other.vision.cache.stats["stale"] == 1
    assert not list(tmp_path.glob(".*partial"))


def test_disk_tier_respects_its_budget(tmp_path):
    cache = VisionCache(1 << 20, tmp_path, disk_max_bytes=3000)
    for key in range(6):
        cache.put(f"k{key}", f"id{key}", *_features(16, fill=key))  # files of ~1.2 KiB
        assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) <= 3000
    cache.clear()
    assert cache.get("k4", "id4") is not None  # read back from disk: k4 is now the most recent
    cache.put("k6", "id6", *_features(16))
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["k4", "k6"]
