"""Sessions: tests, validate (the main job on the embedded default), lint.

PyTorch is pinned through QWEN3VL_TORCH (default ``torch==2.13.0``, the CPU build this project's
CI machines carry). A Pascal GPU needs a CUDA 12.6 build instead, for example
``QWEN3VL_TORCH="torch==2.7.1 --index-url https://download.pytorch.org/whl/cu126" nox -s validate``.
"""

import os
import shlex

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = shlex.split(os.environ.get("QWEN3VL_TORCH", "torch==2.13.0"))


def install(session: nox.Session, extras: str) -> None:
    session.install(*TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (parity with transformers, properties, faults, harness)."""
    install(session, "test,harness")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def validate(session: nox.Session) -> None:
    """The harness on the embedded default: tiny preset, full matrix, CPU (and CUDA when present).

    Imports, numerics, latency and memory for every combination, stored under results/. Extra
    arguments go to ``python -m harness validate`` (e.g. ``-- --mode pairwise`` or ``-- --shard 1/4``).
    """
    install(session, "harness")
    session.run("python", "-m", "harness", "validate", "--preset", "tiny", "--mode", "full", "--device", "auto",
                *session.posargs)


@nox.session
def gate(session: nox.Session) -> None:
    """Pre-merge gate: measure this checkout now and compare it with the results committed at a baseline.

    ``nox -s gate`` compares against ``HEAD``'s committed results/ (env ``GATE_BASELINE`` picks another git
    ref, run id or folder); extra arguments replace the defaults, e.g.
    ``nox -s gate -- --baseline main --candidate results --report gate.md``. Exit 0 pass, 1 regression,
    2 harness error, 3 nothing comparable (the message says how to record a baseline).
    """
    install(session, "harness")
    args = session.posargs or ["--baseline", os.environ.get("GATE_BASELINE", "HEAD"), "--measure", "--confirm",
                               "--report", "gate.md"]
    session.run("python", "-m", "harness", "gate", *args)


@nox.session
def dashboard(session: nox.Session) -> None:
    """Static HTML dashboard of every stored result: site/index.html (opens from disk)."""
    install(session, "harness")
    session.run("python", "-m", "harness", "dashboard", "--results", "results", "--out", "site", *session.posargs)


@nox.session
def selftest(session: nox.Session) -> None:
    """Plant every catalogued fault in a copy of the project; fail if the checks miss one."""
    install(session, "harness")
    session.run("python", "-m", "harness", "selftest", "--preset", "tiny", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
