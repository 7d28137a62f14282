"""Import checks: a syntax error planted in a copy of the package is reported with its file and line,
and the other modules are still checked."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import imports

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broken_copy(tmp_path_factory) -> Path:
    """A copy of the project with a syntax error in qwen3_vl/optim/rope/standard.py and a module that
    raises at import time."""
    root = tmp_path_factory.mktemp("copy")
    for package in imports.PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "qwen3_vl" / "optim" / "rope" / "standard.py"
    lines = target.read_text().splitlines()
    lines.append("def broken(:")
    target.write_text("\n".join(lines) + "\n")
    (root / "line.txt").write_text(str(len(lines)))
    (root / "harness" / "planted_error.py").write_text("X = 1\nraise RuntimeError('planted at import')\n")
    return root


def test_syntax_error_is_reported_with_file_and_line(broken_copy):
    results = {r.module: r for r in imports.check_all(
        ["qwen3_vl.optim.rope.standard", "qwen3_vl.config", "harness.planted_error", "qwen3_vl.optim.plan"],
        root=broken_copy)}
    bad = results["qwen3_vl.optim.rope.standard"]
    assert not bad.ok and bad.error_type == "SyntaxError"
    assert bad.file.endswith("qwen3_vl/optim/rope/standard.py")
    assert bad.line == int((broken_copy / "line.txt").read_text())
    raised = results["harness.planted_error"]
    assert raised.error_type == "RuntimeError" and raised.line == 2 and "planted at import" in raised.message
    assert results["qwen3_vl.config"].ok and results["qwen3_vl.optim.plan"].ok


def test_cli_exits_1_and_names_the_file(broken_copy):
    modules = ["qwen3_vl.config", "qwen3_vl.optim.rope.standard", "qwen3_vl.optim", "harness.results"]
    proc = subprocess.run([sys.executable, "-m", "harness", "imports", "--root", str(broken_copy), *modules],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    line = (broken_copy / "line.txt").read_text()
    assert f"qwen3_vl/optim/rope/standard.py:{line}" in proc.stdout
    assert "ok   qwen3_vl.config: ok" in proc.stdout  # the others were still checked


def test_the_broken_copys_own_cli_still_reports(tmp_path):
    """The CLI of a broken tree itself (not this checkout's) must start and name the file, even when
    the broken module is one that every part of the model imports (the plan module)."""
    import os

    for package in imports.PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "qwen3_vl" / "optim" / "plan.py"
    lines = [*target.read_text().splitlines(), "value = (1 +", "    2", "def broken(:"]
    target.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "harness", "imports", "--root", str(tmp_path),
                           "qwen3_vl.optim.plan", "qwen3_vl.config", "harness.results"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"qwen3_vl/optim/plan.py:{len(lines)}" in proc.stdout
    assert "ok   harness.results: ok" in proc.stdout  # the other modules are still checked


def test_discovery_lists_modules_of_a_broken_package(broken_copy):
    found = imports.discover(broken_copy)
    assert "qwen3_vl.optim.rope.standard" in found and "harness.planted_error" in found
    assert "qwen3_vl" in found and "suites" in found


def test_this_checkout_imports():
    results = imports.check_all(imports.discover(ROOT)[:4], root=ROOT, workers=1)
    assert all(r.ok for r in results), [r.describe() for r in results if not r.ok]
