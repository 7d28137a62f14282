"""Timing: a clock suites put around what they measure, rounds interleaved across models, and statistics.

Why interleaved: on a shared machine the same forward pass measured in separate processes moved by up
to 40% (8.2 to 13.6 ms on this project's 2-core CI machine), while the ratio of two models measured
alternately in one process stayed within 2%. So every round times each model once, the order rotates
each round (no model always runs first, right after the previous one warmed the caches), and each
combination is stored both as absolute times and as the per-round ratio to the reference plan.

Statistics and the JSON file come from pytest-benchmark (``pytest_benchmark.stats.Stats`` and its
saved-run format, so ``pytest-benchmark compare <file>`` reads it); its fixture is not used because it
times all rounds of one function back to back, which is exactly the drift interleaving removes.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch


class Clock:
    """``with clock():`` around the region to time; ``with clock(tokens=n):`` also counts tokens.

    On CUDA the region is timed with CUDA events (start and end recorded on the stream, then the end
    event is waited for), so the time is the device's, not the host's launch time.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = True
        self.rounds: list[list[float]] = []  # samples per round
        self.tokens = 0  # tokens per timed region (the last one given)

    def new_round(self) -> None:
        if self.enabled:
            self.rounds.append([])

    @contextlib.contextmanager
    def __call__(self, tokens: int = 0) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            yield
            seconds = time.perf_counter() - t0
        if self.enabled:
            if not self.rounds:
                self.rounds.append([])
            self.rounds[-1].append(seconds)
            self.tokens = tokens

    @property
    def samples(self) -> list[float]:
        return [s for r in self.rounds for s in r]

    def add(self, seconds: float, tokens: int = 0) -> None:
        """Record one sample measured elsewhere (see ``marks``)."""
        if self.enabled:
            if not self.rounds:
                self.rounds.append([])
            self.rounds[-1].append(seconds)
            self.tokens = tokens

    def marks(self) -> Marks:
        return Marks(self)


class Marks:
    """Timestamps taken by calling the object (e.g. as a step observer); ``record_intervals`` adds
    the time between consecutive marks to the clock. On CUDA the marks are events on the stream,
    so an interval is the device time between two points of the work, with no synchronisation
    while the work runs."""

    needs_logits = False  # a step observer that only takes the time (model.step skips logits it need not make)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.points: list = []

    def __call__(self, *_args) -> None:
        if self.clock.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def record_intervals(self, tokens: int = 0) -> None:
        if self.clock.cuda and self.points:
            self.points[-1].synchronize()
        for a, b in zip(self.points, self.points[1:], strict=False):
            seconds = a.elapsed_time(b) / 1e3 if self.clock.cuda else b - a
            self.clock.add(seconds, tokens)


@dataclass
class Timed:
    """The outcome of one model in an interleaved measurement."""

    clock: Clock
    error: str = ""


def interleaved(
    targets: dict[str, Callable[[Clock], Any]],
    rounds: int,
    warmup: int,
    device: str | torch.device = "cpu",
) -> dict[str, Timed]:
    """Call every target once per round (``warmup`` untimed rounds first), rotating the order each round.

    A target that raises is dropped from later rounds with its error recorded; the others go on.
    The garbage collector is off while timing (as pytest-benchmark's ``--benchmark-disable-gc``).
    """
    names = list(targets)
    out = {name: Timed(Clock(device)) for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(warmup + rounds):
            gc.collect()
            gc.disable()
            shift = r % max(1, len(names))
            for name in names[shift:] + names[:shift]:
                timed = out[name]
                if timed.error:
                    continue
                timed.clock.enabled = r >= warmup
                timed.clock.new_round()
                try:
                    targets[name](timed.clock)
                except Exception as exc:
                    timed.error = f"{type(exc).__name__}: {exc}"
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def capture_graph(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` run once on a side stream (kernels chosen, memory allocated), captured in a CUDA graph and
    replayed once (the first replay uploads the graph, so the next ones are what a timing should see)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Device milliseconds per replay of ``graph`` over ``replays`` back-to-back replays (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def read_bandwidth(nbytes: int = 1 << 30, seconds: float = 1.0) -> float:
    """Bytes per second of a sum over ``nbytes`` of fp32 (more than every cache), best of ~``seconds``,
    with the current threads: what a memory-bound CPU decode step can read."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of the samples."""
    data = sorted(samples)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def round_ratios(candidate: Clock, baseline: Clock) -> list[float]:
    """Per round: median of the candidate's samples / median of the baseline's samples in that round."""
    out = []
    for ours, ref in zip(candidate.rounds, baseline.rounds, strict=False):
        if ours and ref and statistics.median(ref) > 0:
            out.append(statistics.median(ours) / statistics.median(ref))
    return out


# ---------------------------------------------------------------------------------------------
# pytest-benchmark's saved-run JSON


@dataclass
class BenchmarkRecord:
    group: str  # suite.case
    name: str  # case[plan_short]
    fullname: str
    params: dict[str, str]
    samples: list[float]
    extra_info: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _stats(samples: list[float]) -> dict[str, Any]:
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for s in samples:
        stats.update(s)
    out = stats.as_dict()
    out["data"] = list(samples)
    out["iterations"] = 1
    return out


def benchmark_json(records: list[BenchmarkRecord], fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A document in pytest-benchmark's saved-run format (``--benchmark-json``)."""
    from pytest_benchmark import __version__
    from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
    from pytest_benchmark.utils import get_commit_info

    machine = pytest_benchmark_generate_machine_info()
    machine["harness_fingerprint_id"] = fingerprint.get("id")
    return {
        "machine_info": machine,
        "commit_info": get_commit_info(),
        "benchmarks": [
            {
                "group": r.group,
                "name": r.name,
                "fullname": r.fullname,
                "params": r.params,
                "param": r.params.get("plan"),
                "extra_info": r.extra_info,
                "options": r.options,
                "stats": _stats(r.samples),
            }
            for r in records
            if r.samples
        ],
        "datetime": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
    }
