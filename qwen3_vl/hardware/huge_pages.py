"""Weights in 2 MiB pages (Linux transparent huge pages) for CPU decode.

Why: a batch-1 decode step streams every text weight once, and with 4 KiB pages that stream takes a
TLB miss every 4 KiB. Measured on the 2-core AVX2 CI machine over mini's text weights (1.23 GB fp32,
our GEMV, interleaved in one process): 23.2 GB/s from PyTorch's allocation, 26.8 GB/s from the same
bytes in 2 MiB pages. PyTorch's CPU allocator asks for huge pages only under
``THP_MEM_ALLOC_ENABLE=1``, read once at start-up, and most Linux distributions run THP in
``madvise`` mode, where memory gets huge pages only when asked; so the weights are copied into an
anonymous mapping that is 2 MiB-aligned and advised ``MADV_HUGEPAGE`` before its first write.

Whether the kernel actually backed the copies with huge pages (it may not: fragmented memory, a
``never`` setting, a container limit) is read back from ``/proc/self/smaps_rollup``, not assumed.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import torch

PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")


def unavailable_reason() -> str | None:
    """None when weights can be asked into huge pages here, else why not."""
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are Linux-only; this is {sys.platform}"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this Python's mmap module has no MADV_HUGEPAGE"
    try:
        setting = THP_SETTING.read_text()
    except OSError as e:
        return f"cannot read {THP_SETTING} ({e.strerror})"
    if "[never]" in setting:
        return f"transparent huge pages are disabled ({THP_SETTING}: {setting.strip()})"
    return None


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``tensor`` in a fresh 2 MiB-aligned mapping advised ``MADV_HUGEPAGE``
    (the tensor keeps the mapping alive)."""
    nbytes = tensor.numel() * tensor.element_size()
    mapping = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the copy's first write, so the faults take huge pages
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -raw.data_ptr() % PAGE
    out = raw[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


def anon_huge_bytes() -> int:
    """The process's anonymous memory in huge pages now (``AnonHugePages`` of ``/proc/self/smaps_rollup``;
    0 where it cannot be read). Adjacent mappings merge into one entry in ``smaps``, so the growth of
    this total across a move is what tells how much of the move landed in huge pages."""
    try:
        for line in SMAPS_ROLLUP.read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def move_to_huge_pages(modules: list[torch.nn.Module], min_bytes: int = PAGE) -> tuple[int, int]:
    """Copy every CPU parameter, buffer and ``packed`` tensor of ``modules`` (and their children) of at
    least ``min_bytes`` into huge pages, in place (tied tensors once). Returns (bytes moved, how many of
    them the kernel backs with huge pages, from ``anon_huge_bytes`` before and after)."""
    before, moved = anon_huge_bytes(), 0
    copies: dict[int, torch.Tensor] = {}  # original storage -> its copy, so tied tensors stay tied
    for module in modules:
        for owner in module.modules():
            slots = [(name, t, True) for name, t in owner.named_parameters(recurse=False)]
            slots += [(name, t, False) for name, t in owner.named_buffers(recurse=False) if t is not None]
            packed = owner.__dict__.get("packed")
            if isinstance(packed, torch.Tensor):
                slots.append(("packed", packed, False))
            for name, t, is_param in slots:
                nbytes = t.numel() * t.element_size()
                # only tensors that are their whole storage: copying a view would unshare its storage
                if (t.device.type != "cpu" or t.layout != torch.strided or nbytes < min_bytes
                        or not t.is_contiguous() or t.untyped_storage().nbytes() != nbytes):
                    continue
                key = t.untyped_storage().data_ptr()
                if key not in copies:
                    copies[key] = huge_page_copy(t)
                    moved += nbytes
                if is_param:
                    t.data = copies[key]  # the Parameter object stays (tied modules share it)
                elif name == "packed":
                    owner.packed = copies[key]
                else:
                    owner._buffers[name] = copies[key]
    return moved, min(moved, max(0, anon_huge_bytes() - before))
