"""Suites are discovered by convention: a new file in a suites package is picked up with no registration."""

from __future__ import annotations

import textwrap

import pytest

from harness import suite
from harness.settings import Settings, load


def test_discovery_by_prefix_and_part(tmp_path, monkeypatch):
    package = tmp_path / "my_suites"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "speed.py").write_text(textwrap.dedent('''
        def time_forward(bench, clock):
            """Forward pass."""
        def peakmem_forward(bench):
            pass
        def track_error(bench):
            return []
        def helper():
            pass
    '''))
    (package / "quality.py").write_text("PART = 'numerics'\ndef track_logits(bench):\n    return []\n")
    (package / "broken.py").write_text("def oops(:\n")
    (package / "_private.py").write_text("def time_hidden(bench, clock):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases, broken = suite.discover("my_suites")
    assert [(c.suite, c.kind, c.name, c.part) for c in cases] == [
        ("quality", "track", "logits", "numerics"),
        ("speed", "time", "forward", "speed"),
        ("speed", "peakmem", "forward", "speed"),
        ("speed", "track", "error", "speed"),
    ]
    assert cases[1].doc == "Forward pass."
    assert "SyntaxError" in broken["broken"]
    assert suite.parts(cases) == ["numerics", "speed"]


def test_the_project_suites():
    cases, broken = suite.discover()
    assert not broken
    names = {(c.suite, c.kind, c.name) for c in cases}
    assert {("latency", "time", "prefill"), ("latency", "time", "decode_per_token"), ("latency", "time", "generate"),
            ("latency", "time", "vision_encode"), ("memory", "peakmem", "decode"),
            ("accuracy", "track", "logits_vs_reference")} <= names


def test_settings_from_pyproject(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.harness]\nrounds = 9\nbudget_s = 60\n[tool.harness.gate]\nlatency = 0.1\n")
    assert load(path) == Settings(rounds=9, budget_s=60.0)
    path.write_text("[tool.harness]\nround = 9\n")
    with pytest.raises(ValueError, match="unknown setting 'round'"):
        load(path)
    path.write_text("[tool.harness]\nrounds = 'many'\n")
    with pytest.raises(ValueError, match="rounds must be int"):
        load(path)
