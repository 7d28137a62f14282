"""Import every module of the project, each in a fresh process, and report precisely what failed.

A fresh process per module means one broken module cannot hide (or cause) another's failure, and
import-order accidents do not mask missing imports. Each process is forked from an import server that
has loaded only third-party libraries (torch alone takes a second to import), so no project module is
loaded when the child imports its one module. Modules are found on disk, not by importing
packages, so a package whose ``__init__`` is broken still has all of its modules listed and tried.
For each module: ok/failed, exception type, the ``file:line`` that raised (for a syntax error, the
line of the error itself) and the message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("qwen3_vl", "harness", "suites")
REPO_ROOT = Path(__file__).resolve().parent.parent

# The import server: preloads third-party libraries (torch takes ~1 s to import), then for each module
# name on stdin forks a child that imports it and reports one JSON line. The child starts with no
# project module loaded, which is what "a fresh interpreter" buys, at a fraction of the cost.
_SERVER = r"""
import importlib, json, os, sys, time, traceback
root, preload, timeout = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
for lib in filter(None, preload):
    try:
        importlib.import_module(lib)
    except Exception:
        pass

def outcome(name):
    start = time.perf_counter()
    try:
        importlib.import_module(name)
        out = {"ok": True}
    except BaseException as exc:
        if isinstance(exc, SyntaxError) and exc.filename:
            where = (exc.filename, exc.lineno)
        else:
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if f.filename.startswith(root)] or frames
            where = (ours[-1].filename, ours[-1].lineno) if ours else ("", None)
        message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
        out = {"ok": False, "type": type(exc).__name__, "file": where[0], "line": where[1], "message": message}
    out["seconds"] = time.perf_counter() - start
    return out

for line in sys.stdin:
    name = line.strip()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # what a module prints while importing must not mix with the protocol
        os.dup2(devnull, 2)
        data = json.dumps(outcome(name)).encode()
        os.write(write_end, data)
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.005)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    if data:
        out = json.loads(data)
    elif status is None:
        out = {"ok": False, "type": "Timeout", "file": "", "line": None,
               "message": f"import took longer than {timeout:.0f} s", "seconds": timeout}
    else:
        code = os.waitstatus_to_exitcode(status)
        out = {"ok": False, "type": f"exit code {code}", "file": "", "line": None,
               "message": "the interpreter died while importing (crash in an extension or os._exit)", "seconds": 0}
    out["module"] = name
    print(json.dumps(out), flush=True)
"""
PRELOAD = ("torch", "numpy", "pandas", "pyarrow", "safetensors", "tokenizers", "hypothesis", "rich", "psutil")


@dataclass
class ImportResult:
    module: str
    ok: bool
    seconds: float = 0.0
    error_type: str = ""
    file: str = ""
    line: int | None = None
    message: str = ""

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.file else ""

    def describe(self) -> str:
        if self.ok:
            return f"{self.module}: ok"
        return f"{self.module}: {self.error_type} at {self.location}: {self.message}"


def discover(root: Path = REPO_ROOT, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Dotted names of every ``.py`` module under the packages, found on disk, sorted."""
    names = []
    for package in packages:
        base = root / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if all(p.isidentifier() for p in parts):
                names.append(".".join(parts))
    return sorted(set(names))


def _server(root: Path, timeout: float, stderr) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", _SERVER, str(root), ",".join(PRELOAD), str(timeout)], cwd=root,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, bufsize=1)


def _result(out: dict) -> ImportResult:
    return ImportResult(out["module"], out["ok"], out.get("seconds", 0.0), out.get("type", ""),
                        out.get("file") or "", out.get("line"), out.get("message", ""))


def _run_server(modules: list[str], root: Path, timeout: float, report) -> None:
    with tempfile.TemporaryFile("w+") as stderr:
        proc = _server(root, timeout, stderr)
        try:
            for i, module in enumerate(modules):
                try:
                    proc.stdin.write(module + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                except BrokenPipeError:
                    line = ""
                if not line:  # the server itself died: report the rest, each with the reason
                    stderr.seek(0)
                    err = (stderr.read().strip().splitlines() or ["no output"])[-1]
                    for rest in modules[i:]:
                        report(ImportResult(rest, False, 0.0, "ImportServerError", message=err))
                    return
                report(_result(json.loads(line)))
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=30)


def check_all(modules: list[str] | None = None, root: Path = REPO_ROOT, workers: int | None = None,
              timeout: float = 120.0, on_result=None) -> list[ImportResult]:
    """Import every module (discovered under ``root`` when not given), one forked child each, with
    ``workers`` import servers in parallel; results come back in module order."""
    modules = discover(root) if modules is None else list(modules)
    if not modules:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(modules)))
    found: dict[str, ImportResult] = {}
    lock = threading.Lock()

    def report(result: ImportResult) -> None:
        with lock:
            found[result.module] = result
        if on_result is not None:
            on_result(result)

    parts = [modules[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(_run_server, part, root, timeout, report) for part in parts]:
            future.result()
    return [found[m] for m in modules]
