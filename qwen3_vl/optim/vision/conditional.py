"""Conditional vision extraction: run the ViT only when a request has pixels it has not seen.

Exact by construction: a cache hit returns the very tensors the ViT produced for the same pixels,
grid and compute dtype, so the logits are bitwise those of ``full``.

- Text-only requests never reach the vision runtime (``Qwen3VL.embed`` calls ``encode`` only for
  pixels), so the ViT does not run.
- Vision outputs (merged tokens + DeepStack features) are cached per request's pixel set in an
  LRU bounded in bytes, optionally backed by a directory of safetensors files.
- ``reuses_prefix``: a ``qwen3_vl.session.Session`` keeps the KV of an unchanged conversation
  prefix and prefills only the new turn. The new turn's logits equal a full recompute to fp32
  rounding (PyTorch's GEMMs and attention block by row count); bitwise with
  ``execution=cpu_packed[batch_invariant=true]``, whose kernels compute every row the same way
  whatever the row count.

The cache key is a SHA-256 over a header (pixel shape and dtype, grid, compute dtype) and the pixel
bytes. Each entry also stores that header and a BLAKE2b digest of the bytes, compared on every
hit: a key collision (or a crafted one) is a miss, never another image's features.

A request's new entries are committed when its decoder step starts (``before_llm``), after the
prompt has been checked against the grids, so a bad request caches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen3_vl.optim.plan import Optimization
from qwen3_vl.optim.vision.full import FullVision

MiB = 1 << 20


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (copied to the CPU if needed), for hashing."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.cpu().numpy())


def content_key(pixels: torch.Tensor, grid_thw: torch.Tensor, compute_dtype: torch.dtype) -> tuple[str, str]:
    """(key, identity) of one request's pixels. ``identity`` is what a cached entry must match."""
    header = json.dumps({
        "shape": list(pixels.shape),
        "dtype": str(pixels.dtype),
        "grid": [list(map(int, g)) for g in grid_thw.tolist()],
        "compute": str(compute_dtype),
    })
    data = tensor_bytes(pixels)
    key = hashlib.sha256(header.encode())
    key.update(data)
    check = hashlib.blake2b(data, digest_size=16).hexdigest()
    return key.hexdigest(), f"{header}|{check}"


@dataclass
class Entry:
    identity: str
    tokens: torch.Tensor
    deepstack: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tokens, *self.deepstack))


class VisionCache:
    """LRU of vision outputs bounded by ``max_bytes``, with an optional on-disk tier.

    ``stats`` counts hits, misses, disk_hits, evictions, collisions (key matched, identity did
    not), too_large (an entry over the whole budget is not kept) and disk_writes.
    """

    def __init__(self, max_bytes: int, disk_dir: str | Path | None = None, disk_max_bytes: int = 0,
                 model_id=lambda: "") -> None:
        if max_bytes < 0 or disk_max_bytes < 0:
            raise ValueError("cache byte budgets must be >= 0")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.stats: Counter[str] = Counter()
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_max_bytes = disk_max_bytes
        self._model_id = model_id  # called lazily: fingerprinting the weights costs a pass over them
        self._clock = 0  # last access time given to a disk file (ns), strictly increasing
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, identity: str, device: torch.device | str = "cpu"):
        entry = self.entries.get(key)
        if entry is not None and entry.identity != identity:
            self.stats["collisions"] += 1
            entry = None
        if entry is not None:
            self.entries.move_to_end(key)
            self.stats["hits"] += 1
            return entry.tokens, entry.deepstack
        found = self._read_disk(key, identity, device)
        if found is None:
            self.stats["misses"] += 1
            return None
        self.stats["disk_hits"] += 1
        self._keep(key, found)
        return found.tokens, found.deepstack

    def put(self, key: str, identity: str, tokens: torch.Tensor, deepstack: list[torch.Tensor]) -> None:
        entry = Entry(identity, tokens, list(deepstack))
        self._keep(key, entry)
        self._write_disk(key, entry)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _keep(self, key: str, entry: Entry) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        if entry.nbytes > self.max_bytes:
            self.stats["too_large"] += 1
            return
        while self.entries and self.bytes + entry.nbytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.stats["evictions"] += 1
        self.entries[key] = entry
        self.bytes += entry.nbytes

    # -- disk tier -------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.disk_dir / f"{key}.safetensors"

    def _read_disk(self, key: str, identity: str, device) -> Entry | None:
        if self.disk_dir is None or not self._path(key).exists():
            return None
        from safetensors import safe_open

        path = self._path(key)
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("identity") != identity or meta.get("model") != self._model_id():
                self.stats["collisions" if meta.get("model") == self._model_id() else "stale"] += 1
                return None
            count = int(meta["deepstack"])
            entry = Entry(identity, f.get_tensor("tokens"), [f.get_tensor(f"deepstack.{i}") for i in range(count)])
        self._touch(path)
        return entry

    def _write_disk(self, key: str, entry: Entry) -> None:
        if self.disk_dir is None or entry.nbytes > self.disk_max_bytes:
            return
        from safetensors.torch import save_file

        tensors = {"tokens": entry.tokens.contiguous()}
        tensors.update({f"deepstack.{i}": t.contiguous() for i, t in enumerate(entry.deepstack)})
        meta = {"identity": entry.identity, "model": self._model_id(), "deepstack": str(len(entry.deepstack))}
        final = self._path(key)
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        try:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(partial), metadata=meta)
            os.replace(partial, final)  # atomic: readers never see a half-written file
        finally:
            partial.unlink(missing_ok=True)
        self._touch(final)
        self.stats["disk_writes"] += 1
        files = sorted(self.disk_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.disk_max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


    def _touch(self, path: Path) -> None:
        """The disk tier evicts by least recent use, kept in mtime (made strictly increasing here,
        so accesses within one clock tick stay ordered)."""
        self._clock = max(time.time_ns(), self._clock + 1)
        os.utime(path, ns=(self._clock, self._clock))


def model_fingerprint(model) -> str:
    """What the disk tier's entries depend on: vision weights, config, dtypes, kernels, torch."""
    digest = hashlib.blake2b(digest_size=16)
    plan = {axis: str(model.plan[axis]) for axis in ("attention", "rope", "quant")} if model.plan else {}
    digest.update(repr((model.config.vision, model.visual.compute_dtype, model.device.type, plan,
                        torch.__version__)).encode())
    for name, tensor in sorted(model.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


class ConditionalVision(FullVision):
    name = "conditional"
    reuses_prefix = True

    def __init__(self, model, cache_mb: float, disk_dir: str, disk_mb: float) -> None:
        fingerprint: list[str] = []

        def model_id() -> str:
            if not fingerprint:
                fingerprint.append(model_fingerprint(model))
            return fingerprint[0]

        self.cache = VisionCache(int(cache_mb * MiB), disk_dir or None, int(disk_mb * MiB), model_id)
        # One record per encode since the last embed: (key, identity, tokens, deepstack), or None for a hit.
        self._records: list[tuple | None] = []
        self._request: list[tuple | None] = []  # the last embedded prompt's records, committed by its step

    def encode(self, model, pixel_values, grid_thw):
        key, identity = content_key(pixel_values, grid_thw, model.visual.compute_dtype)
        del self._records[:-1]  # a prompt has at most two visual kinds: older records are never used
        found = self.cache.get(key, identity, model.device)
        if found is not None:
            self._records.append(None)
            return found
        tokens, deepstack = super().encode(model, pixel_values, grid_thw)
        self._records.append((key, identity, tokens, deepstack))
        return tokens, deepstack

    def after_embed(self, model, input_ids) -> None:
        # The prompt's records are the last ones (one per visual kind it holds); older ones belong to
        # an embed that failed after encoding and are dropped.
        kinds = sum(int((input_ids == t).any()) for t in (model.config.image_token_id, model.config.video_token_id))
        self._request = self._records[max(0, len(self._records) - kinds):] if kinds else []
        self._records = []

    def before_llm(self, model, embeds, positions, attention_mask, visual_mask, deepstack):
        # Reached only once the prompt has been checked against the grids (positions exist).
        for record in self._request:
            if record is not None:
                self.cache.put(*record)
        self._request = []
        return embeds, positions, attention_mask, visual_mask, deepstack


def _build(model, target, cache_mb: float = 256, disk_dir: str = "", disk_mb: float = 1024) -> ConditionalVision:
    return ConditionalVision(model, cache_mb, str(disk_dir), disk_mb)


OPTION = Optimization(
    name="conditional",
    axis="vision",
    exact=True,
    summary="Skip the ViT for text-only requests, cache vision outputs by content hash (LRU in bytes, "
    "optional disk tier), and let sessions reuse the KV of an unchanged conversation prefix.",
    build=_build,
    defaults={"cache_mb": 256, "disk_dir": "", "disk_mb": 1024},
    reference=False,
)
