"""The results store: one tidy long-format parquet table per run, one folder per hardware fingerprint.

Layout: ``<results>/<fingerprint_id>/fingerprint.json`` and ``<results>/<fingerprint_id>/<run_id>.parquet``
(``<run_id>.shard<i>of<n>.parquet`` for a shard of a fleet run). One row is one measured value:
run and machine identity, the plan and one column per plan axis, then ``suite, case, metric, unit,
value, samples`` and ``status``/``error``. Anything that reads the store (the gate, the dashboard,
a notebook) calls ``load`` and gets one DataFrame for any mix of runs, shards and machines.

Files are written atomically (temp file in the same folder, fsync, rename), carry their schema version
in the parquet metadata and in a column, and a file of an unknown version is refused, not guessed at.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "skipped")
_META_VERSION = b"harness.schema_version"
_META_FINGERPRINT = b"harness.fingerprint"
_META_AXES = b"harness.axes"

# Columns before the per-axis columns, then the per-axis columns (one per plan axis, named as the axis),
# then the measurement columns.
ID_COLUMNS: dict[str, pa.DataType] = {
    "schema_version": pa.int32(),
    "run_id": pa.string(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "git_sha": pa.string(),
    "git_dirty": pa.bool_(),
    "fingerprint_id": pa.string(),
    "shard": pa.string(),
    "preset": pa.string(),
    "device": pa.string(),
    "dtype": pa.string(),
    "plan_id": pa.string(),
    "plan_short": pa.string(),
}
MEASUREMENT_COLUMNS: dict[str, pa.DataType] = {
    "suite": pa.string(),
    "case": pa.string(),
    "metric": pa.string(),
    "unit": pa.string(),
    "value": pa.float64(),
    "samples": pa.list_(pa.float64()),
    "status": pa.string(),
    "error": pa.string(),
    "bound": pa.float64(),  # the tolerance or budget the value was checked against (null when none)
    "better": pa.string(),  # "lower", "higher" or "" (informational): what the gate should call worse
    "params": pa.string(),  # JSON of the case's parameters (prompt shape, rounds, new tokens ...)
    "fallbacks": pa.string(),  # the model's recorded fallbacks, "axis: requested -> used (reason)"; "; "-joined
    "repro": pa.string(),  # one command line that re-runs this row's case
}
CORE_COLUMNS = (*ID_COLUMNS, *MEASUREMENT_COLUMNS)


class SchemaError(ValueError):
    """A results file this harness cannot read (unknown schema version, or not a harness file)."""


class ResultsWarning(UserWarning):
    """A results file was skipped while loading (it could not be read)."""


@dataclass
class Measurement:
    """One value a suite measured, before the run/plan identity is attached."""

    metric: str
    value: float | None
    unit: str = ""
    samples: Sequence[float] = ()
    status: str = "ok"
    error: str = ""
    bound: float | None = None
    better: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def failed(metric: str, error: str) -> Measurement:
    return Measurement(metric, None, status="failed", error=error)


def skipped(metric: str, reason: str) -> Measurement:
    return Measurement(metric, None, status="skipped", error=reason)


@dataclass
class RunInfo:
    """The identity every row of one run shares."""

    run_id: str
    fingerprint_id: str
    preset: str
    dtype: str
    git_sha: str = "unknown"
    git_dirty: bool = False
    shard: str = "1/1"
    timestamp: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id '{run_id}': use letters, digits, '.', '_' or '-' (at most 100)")
    return run_id


def make_row(
    run: RunInfo,
    device: str,
    suite: str,
    case: str,
    m: Measurement,
    plan=None,
    params: dict[str, Any] | None = None,
    fallbacks: Iterable[Any] = (),
    repro: str = "",
) -> dict[str, Any]:
    """A result row: ``plan`` is a ``qwen3_vl.optim.Plan`` or None for rows not about a plan (imports)."""
    value = None if m.value is None else float(m.value)
    if value is not None and not math.isfinite(value) and m.status == "ok":
        m = Measurement(m.metric, value, m.unit, m.samples, "failed", f"non-finite value {value}", m.bound, m.better)
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run.run_id,
        "timestamp": run.timestamp,
        "git_sha": run.git_sha,
        "git_dirty": run.git_dirty,
        "fingerprint_id": run.fingerprint_id,
        "shard": run.shard,
        "preset": run.preset,
        "device": device,
        "dtype": run.dtype,
        "plan_id": "" if plan is None else plan.id,
        "plan_short": "" if plan is None else plan.short_id,
    }
    if plan is not None:
        for axis, choice in plan.choices:
            if axis in CORE_COLUMNS:
                raise SchemaError(f"plan axis '{axis}' collides with a results column of the same name")
            row[axis] = str(choice)
    row.update(
        suite=suite,
        case=case,
        metric=m.metric,
        unit=m.unit,
        value=value,
        samples=[float(s) for s in m.samples],
        status=m.status,
        error=m.error,
        bound=None if m.bound is None else float(m.bound),
        better=m.better,
        params=json.dumps(params or {}, sort_keys=True, default=str),
        fallbacks="; ".join(str(f) for f in fallbacks),
        repro=repro,
    )
    return row


def to_frame(rows: Sequence[dict[str, Any]], axes: Sequence[str] = ()) -> pd.DataFrame:
    """Rows -> a DataFrame with every core column (and one column per axis) in schema order."""
    table = _to_table(rows, axes)
    return table.to_pandas()


def _schema(axes: Sequence[str]) -> pa.Schema:
    fields = [pa.field(n, t) for n, t in ID_COLUMNS.items()]
    fields += [pa.field(a, pa.string()) for a in axes]
    fields += [pa.field(n, t) for n, t in MEASUREMENT_COLUMNS.items()]
    return pa.schema(fields)


def _to_table(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> pa.Table:
    axes = list(dict.fromkeys(list(axes) + [k for r in rows for k in r if k not in CORE_COLUMNS]))
    schema = _schema(axes)
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_path(results_dir: str | Path, fingerprint_id: str, run_id: str, shard: str = "1/1") -> Path:
    index, count = shard.split("/")
    suffix = "" if count == "1" else f".shard{index}of{count}"
    return Path(results_dir) / fingerprint_id / f"{run_id}{suffix}.parquet"


def check_writable(results_dir: str | Path) -> Path:
    """Create ``results_dir`` if needed and prove a file can be written there (before any long work)."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OSError(f"results directory '{results_dir}' is not writable: {exc.strerror or exc}") from None
    return path


def write_run(
    rows: Sequence[dict[str, Any]],
    results_dir: str | Path,
    fingerprint: dict[str, Any],
    run_id: str,
    shard: str = "1/1",
    axes: Sequence[str] = (),
) -> Path:
    """Write one run's rows, and the machine's ``fingerprint.json`` if the folder has none yet (the stable
    tier is the same for every run of a fingerprint id; each run's full fingerprint, volatile readings
    included, is in its parquet file's metadata: ``read_fingerprint``). Returns the parquet path."""
    fingerprint_id = fingerprint["id"]
    path = run_path(results_dir, fingerprint_id, run_id, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _to_table(rows, axes)
    meta = {
        _META_VERSION: str(SCHEMA_VERSION).encode(),
        _META_FINGERPRINT: json.dumps(fingerprint, sort_keys=True, default=str).encode(),
        _META_AXES: json.dumps(list(axes)).encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    fp_path = path.parent / "fingerprint.json"
    if not fp_path.exists():
        text = json.dumps(fingerprint, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(fp_path, lambda tmp: Path(tmp).write_text(text))
    return path


def _read_one(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    raw = meta.get(_META_VERSION)
    if raw is None:
        raise SchemaError(f"{path} is not a harness results file (no schema version in its metadata)")
    try:
        version = int(raw)
    except ValueError:
        raise SchemaError(f"{path} has an unreadable schema version {raw!r}") from None
    if version != SCHEMA_VERSION:
        # Older versions get a migration here when the schema changes (as asv's `update` does).
        raise SchemaError(
            f"{path} was written with results schema version {version}; this harness reads version "
            f"{SCHEMA_VERSION} only (update the harness, or re-run to regenerate the file)"
        )
    frame = table.to_pandas()
    frame["source_file"] = str(path)
    return frame


def files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Every results parquet file under the given files/folders (temp files of unfinished writes excluded)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"no results file or folder at '{p}'")
    return found


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One DataFrame of every run under ``paths`` (files and/or folders, any mix of runs, shards, machines).

    An unreadable (corrupt, truncated) parquet file is skipped with a ``ResultsWarning`` naming it; a
    file of an unknown schema version raises ``SchemaError``. A ``source_file`` column says where each
    row came from.
    """
    frames = []
    for path in files(paths):
        try:
            frames.append(_read_one(path))
        except SchemaError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            warnings.warn(f"skipping unreadable results file {path}: {exc}", ResultsWarning, stacklevel=2)
    if not frames:
        return _to_table([], ()).to_pandas().assign(source_file=pd.Series(dtype="str"))
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True, sort=False)


def axis_columns(frame: pd.DataFrame) -> list[str]:
    """The per-axis columns of a loaded frame (every column that is not a core column)."""
    return [c for c in frame.columns if c not in CORE_COLUMNS and c != "source_file"]


def read_fingerprint(path: str | Path) -> dict[str, Any]:
    """The full fingerprint (stable and volatile parts) recorded inside one results file."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_FINGERPRINT)
    if raw is None:
        raise SchemaError(f"{path} carries no fingerprint")
    return json.loads(raw)
