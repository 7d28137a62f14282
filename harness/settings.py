"""Harness settings: defaults sized for the ``tiny`` preset on a 2-core CPU, overridable in
``pyproject.toml`` under ``[tool.harness]`` (sub-tables such as ``[tool.harness.gate]`` belong to
other commands and are left alone here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@dataclass(frozen=True)
class Settings:
    budget_s: float = 480.0  # validate's wall clock: no new contract or combination starts past it (0: none)
    numerics_budget_share: float = 0.5  # of each device's budget, at most this for the option contracts
    rounds: int = 5  # timed rounds per latency case (each round times every model of a group once)
    warmup: int = 1  # untimed rounds first
    new_tokens: int = 8  # decode length (min_new_tokens == max_new_tokens)
    group_size: int = 4  # combinations measured interleaved with one reference (and with each other)
    numerics_examples: int = 6  # hypothesis examples per plan contract
    numerics_dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    numerics_shrink: bool = False  # shrink failing examples (slower; gives the minimal failing prompt)
    seed: int = 0  # weights and prompts

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def load(path: Path = PYPROJECT) -> Settings:
    """``Settings`` with ``[tool.harness]`` applied; unknown keys or wrong types raise ``ValueError``."""
    if not path.exists():
        return Settings()
    if tomllib is None:
        if "[tool.harness" in path.read_text():
            raise ValueError(f"reading [tool.harness] from {path} needs Python 3.11+ or the tomli package")
        return Settings()
    table = tomllib.loads(path.read_text()).get("tool", {}).get("harness", {})
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            continue  # a sub-table: another command's settings
        if key not in fields:
            raise ValueError(f"unknown setting '{key}' in [tool.harness] of {path}; settings are: {', '.join(fields)}")
        default = getattr(Settings(), key)
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        if type(value) is not type(default):
            raise ValueError(f"[tool.harness] {key} must be {type(default).__name__}, got {value!r}")
        values[key] = value
    return Settings(**values)
