"""Tiered KV memory: a hot window on the device in full precision, warm tokens int8 in host memory,
cold tokens int8 in a memory-mapped file on disk. Transparent to attention.

Why a ``kv_cache`` option and not a ``memory`` one: it is a way of storing the KV cache and it
must combine with every weight placement (a 2 GB GPU wants streamed weights *and* tiered KV),
which two options of one axis could not. The memory axis enables it by sizing it: with
``hot=-1`` the hot window is the one the memory planner computed for the device budget
(``model.memory.kv_hot_tokens``), see ``qwen3_vl/optim/memory/planner.py``.

The quantization is KIVI int8 (``kivi.py``) with the hot window as the full-precision residual,
so this cache holds exactly what ``quant_int8[residual=hot]`` holds, only elsewhere: the tier
moves themselves are exact (a test checks equal logits). Warm blocks go to pinned host memory
when the device is a GPU; once ``warm`` tokens are there, the whole warm tier is appended to the
cold file. Every step each layer reads its cold and warm blocks back (bytes moved per token =
the int8 KV of all older tokens) and dequantizes them on the device. Cold data lives in the page
cache like any mmap (the kernel writes it back and drops it under memory pressure).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from qwen3_vl.optim.kv_cache.common import KVShape
from qwen3_vl.optim.kv_cache.kivi import MemoryStore, QuantizedCache, store_layout
from qwen3_vl.optim.plan import Optimization

BITS = 8


def file_backing(path: Path, nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` backed by a shared memory map of ``path`` (created sparse)."""
    with open(path, "wb") as f:
        f.truncate(max(nbytes, 1))
    return torch.from_file(str(path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]


class TieredStore:
    def __init__(self, batch: int, shape: KVShape, group: int, warm_tokens: int, capacity: int, device,
                 cold_path: Path) -> None:
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        warm_tokens = max(group, min(warm_tokens, capacity) // group * group)
        _, warm_bytes = store_layout(batch, shape, BITS, group, warm_tokens)
        warm_backing = torch.zeros(warm_bytes, dtype=torch.uint8, pin_memory=pin)
        self.warm = MemoryStore(batch, shape, BITS, group, warm_tokens, "cpu", warm_backing)
        _, cold_bytes = store_layout(batch, shape, BITS, group, capacity)
        self.cold = MemoryStore(batch, shape, BITS, group, capacity, "cpu", file_backing(cold_path, cold_bytes))
        self.bytes_read = 0  # host -> device traffic, for the memory report

    def append(self, stored) -> None:
        stored = [t.to("cpu") for t in stored]
        new = stored[1].shape[2]
        if self.warm.blocks + new > self.warm.capacity_blocks:
            if self.warm.blocks:
                self.cold.append(self.warm.read("cpu"))
                self.warm.blocks = 0
            if new > self.warm.capacity_blocks:
                self.cold.append(stored)
                return
        self.warm.append(stored)

    def read(self, device) -> list[torch.Tensor]:
        out = []
        for cold, warm in zip(self.cold.read("cpu"), self.warm.read("cpu"), strict=True):
            both = torch.cat([cold, warm], dim=2)
            self.bytes_read += both.numel() * both.element_size()
            out.append(both.to(device, non_blocking=True))
        return out

    def nbytes(self) -> int:
        """Bytes of quantized KV actually held (warm buffer allocated + cold blocks written)."""
        return self.warm.nbytes() + self.cold_bytes()

    def cold_bytes(self) -> int:
        return sum(b.numel() * b.element_size() * self.cold.blocks // max(self.cold.capacity_blocks, 1)
                   for b in self.cold.buffers)


def tier_bytes(cache: QuantizedCache) -> dict[str, int]:
    """Where a hierarchical cache's bytes are: the device (hot window), host memory (warm), disk (cold)."""
    out = {"device": 0, "host": 0, "disk": 0}
    for state in cache.layers:
        if state is not None:
            out["device"] += state.k_res.numel() * state.k_res.element_size() * 2
            out["host"] += state.store.warm.nbytes()
            out["disk"] += state.store.cold_bytes()
    return out


class HierarchicalCacheFactory:
    name = "hierarchical_kv"

    def __init__(self, shape: KVShape, hot: int, warm: int, group: int, folder: str) -> None:
        if hot < 0 or warm < group:
            raise ValueError(f"hierarchical_kv needs hot >= 0 and warm >= group ({group}), got hot={hot}, warm={warm}")
        self.shape, self.hot, self.warm, self.group, self.folder = shape, hot, warm, group, folder

    def new(self, batch: int, max_tokens: int) -> QuantizedCache:
        root = Path(tempfile.mkdtemp(prefix="qwen3vl-kv-", dir=self.folder or None))

        def make_store(layer: int, like: torch.Tensor) -> TieredStore:
            return TieredStore(batch, self.shape, self.group, self.warm, max_tokens, like.device,
                               root / f"layer{layer:03d}.kv")

        cache = QuantizedCache(self.shape, batch, max_tokens, BITS, self.group, self.hot, make_store)
        weakref.finalize(cache, shutil.rmtree, root, True)
        return cache


def build(model, target, hot: int = -1, warm: int = 4096, group: int = 32,
          folder: str = "") -> HierarchicalCacheFactory:
    if hot == -1:
        hot = int(getattr(getattr(model, "memory", None), "kv_hot_tokens", 0) or 256)
    if folder and not os.path.isdir(folder):
        raise ValueError(f"hierarchical_kv folder '{folder}' does not exist")
    return HierarchicalCacheFactory(KVShape.of(model), hot, warm, group, folder)


OPTION = Optimization(
    name="hierarchical_kv",
    axis="kv_cache",
    exact=False,
    summary="Tiered KV: hot window full precision on the device, warm int8 in host memory, cold int8 "
    "memory-mapped on disk (KIVI int8 quantization; tier moves are exact).",
    build=build,
    error_budget={"logits_rel": 0.02, "kl": 1e-3, "top1_agreement": 0.95},
    defaults={"hot": -1, "warm": 4096, "group": 32, "folder": ""},
    variants=({"hot": -1, "warm": 4096}, {"hot": 32, "warm": 64}),
)
