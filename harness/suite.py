"""Suites are files in ``suites/``, found by convention: adding one is adding one file (as in asv).

A suite module holds plain functions whose name prefix says what the harness does with them:

- ``time_<case>(bench, clock)``: called once per round, interleaved with the reference plan and the
  other combinations of its group; it wraps what it measures in ``with clock():`` (several regions
  per call give several samples, e.g. one per decoded token; ``clock(tokens=n)`` counts tokens for a
  throughput figure). Warm-up rounds are not recorded.
- ``peakmem_<case>(bench)``: called once with peak memory measured around it (``harness.memory``); it
  may return extra measurements (e.g. the KV-cache bytes it saw).
- ``track_<case>(bench)``: called once; returns ``Measurement``s, or ``(case, Measurement)`` pairs for
  several cases.

A module-level ``PART`` names the ``--suites`` entry that runs it (default: the module's name), so
``suites/accuracy.py`` with ``PART = "numerics"`` runs under ``--suites numerics``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.workload import Prompt

KINDS = ("time", "peakmem", "track")


@dataclass(frozen=True)
class SuiteCase:
    part: str  # the --suites name that selects it
    suite: str  # the module name
    name: str  # the case name (function name without its prefix)
    kind: str  # time, peakmem or track
    fn: Callable[..., Any]

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""


@dataclass
class Bench:
    """What a suite function gets: the model under test and the fixed inputs of the run."""

    model: Any
    reference: Any  # the reference-plan model: same device, dtype and weights
    prompt: Prompt
    new_tokens: int
    fp32_reference: Callable[[], Any] | None = None  # builds (once) an fp32 reference when dtype is not fp32
    shared: dict[str, Any] = field(default_factory=dict)  # memo shared by all benches of a run

    @property
    def is_reference(self) -> bool:
        return self.model is self.reference


def discover(package: str = "suites") -> tuple[list[SuiteCase], dict[str, str]]:
    """Every case of every suite module, in file and definition order; plus {module: import error}."""
    pkg = importlib.import_module(package)
    cases: list[SuiteCase] = []
    broken: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except Exception as exc:
            broken[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        part = getattr(module, "PART", info.name)
        for name, fn in vars(module).items():
            if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            prefix, _, case = name.partition("_")
            if prefix in KINDS and case:
                cases.append(SuiteCase(part, info.name, case, prefix, fn))
    return cases, broken


def parts(cases: list[SuiteCase]) -> list[str]:
    return list(dict.fromkeys(c.part for c in cases))
