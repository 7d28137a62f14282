"""Weights copied into 2 MiB pages: same values, same ties, nothing a view shares, and a reason
wherever the copy cannot be asked for."""

from __future__ import annotations

import gc

import pytest
import torch

from qwen3_vl.hardware import huge_pages
from qwen3_vl.hardware.huge_pages import PAGE, huge_page_copy, move_to_huge_pages

needs_thp = pytest.mark.skipif(huge_pages.unavailable_reason() is not None,
                               reason=str(huge_pages.unavailable_reason()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_a_copy_has_the_values_and_a_2mib_aligned_start(dtype):
    t = (torch.randn(1000, 700) * 50).to(dtype)
    copy = huge_page_copy(t)
    gc.collect()  # the mapping lives as long as the tensor, not the Python mmap object
    assert copy.dtype == t.dtype and copy.shape == t.shape and copy.is_contiguous()
    assert torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()
    assert copy.data_ptr() % PAGE == 0
    copy.add_(1)  # writable, and not shared with the original
    assert not torch.equal(copy, t)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(4096, 256)
        self.head = torch.nn.Linear(256, 4096, bias=False)
        self.head.weight = self.embed.weight  # tied, as Qwen3-VL's 2b/4b
        self.small = torch.nn.Linear(8, 8)
        big = torch.randn(2048, 512)
        self.register_buffer("codes", big.clone())
        self.register_buffer("view", big[:1024])  # a view of a bigger storage: left where it is
        self.packed = torch.randn(1024, 1024)


@needs_thp
def test_move_keeps_values_and_ties_and_skips_views_and_small_tensors():
    m = Tied()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    view_ptr, small_ptr, packed = m.view.data_ptr(), m.small.weight.data_ptr(), m.packed.clone()
    moved, backed = move_to_huge_pages([m])
    assert moved == (4096 * 256 + 2048 * 512 + 1024 * 1024) * 4  # tied weight once, codes once, packed
    assert 0 <= backed <= moved
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items()) and torch.equal(m.packed, packed)
    assert m.head.weight is m.embed.weight and m.embed.weight.data_ptr() % PAGE == 0
    assert m.codes.data_ptr() % PAGE == 0 and m.packed.data_ptr() % PAGE == 0
    assert m.view.data_ptr() == view_ptr and m.small.weight.data_ptr() == small_ptr
    assert move_to_huge_pages([m])[0] == 0  # already moved: nothing copied twice


def test_the_reason_names_what_is_missing(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    assert "disabled" in huge_pages.unavailable_reason() and "[never]" in huge_pages.unavailable_reason()
    setting.write_text("always [madvise] never\n")
    assert huge_pages.unavailable_reason() is None
    monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "missing")
    assert "cannot read" in huge_pages.unavailable_reason()
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    assert "Linux-only" in huge_pages.unavailable_reason()
