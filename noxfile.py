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
    """Smoke generation on the tiny preset, then the test suite."""
    install(session, "test,harness")
    session.run(
        "python", "-m", "qwen3_vl", "generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "8"
    )
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
