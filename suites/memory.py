"""Memory: peak memory of time-to-first-token and of a whole generation, the KV-cache bytes, and
where the weights live.

Peak figures are measured around each call by ``harness.memory.peak`` (process RSS high-water mark,
torch CUDA allocator peaks, NVML); the KV-cache size is the ``nbytes()`` of the cache ``generate``
itself created; weight placement and offloaded bytes are what the plan's memory and quant options
report. Nothing is computed from a formula. (The harness adds a ``load`` case: the same peaks
around building each combination's model.)
"""

from __future__ import annotations

from harness.results import Measurement
from harness.workload import generate


def _cache_bytes(cache) -> list[Measurement]:
    if cache is None:
        return []
    return [Measurement("kv_cache_bytes", cache.nbytes(), "B", better="lower")]


def peakmem_prefill(bench) -> list[Measurement]:
    """``generate`` of one token: the prompt (with its image) through the vision tower and the decoder."""
    _, _, cache = generate(bench.model, bench.prompt, 1)
    return _cache_bytes(cache)


def peakmem_decode(bench) -> list[Measurement]:
    """``generate`` of ``new_tokens`` tokens; the cache's bytes at the end."""
    _, _, cache = generate(bench.model, bench.prompt, bench.new_tokens)
    return _cache_bytes(cache)


def track_placement(bench) -> list[Measurement]:
    """Every number the memory and quant options report (resident, offloaded, weight bytes ...)."""
    out = []
    for axis in ("memory", "quant"):
        for key, value in sorted(getattr(bench.model, axis).describe().items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                unit = "B" if key.endswith("bytes") else ""
                out.append(Measurement(f"{axis}.{key}", value, unit, better="lower" if unit else ""))
    return out
