"""The results store: runs, shards and machines load as one frame; writes are atomic; unknown schema
versions are refused; a corrupt file is skipped with a warning naming it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import results
from harness.results import Measurement, RunInfo
from qwen3_vl.optim import AXES, Plan


def fingerprint(fid: str) -> dict:
    return {"id": fid, "stable": {"cpu": {"model": "test"}}, "volatile": {"cpu_mhz": 1}, "git": {}}


def some_rows(run_id: str, fid: str = "f" * 16, shard: str = "1/1") -> list[dict]:
    info = RunInfo(run_id=run_id, fingerprint_id=fid, preset="tiny", dtype="fp32", git_sha="abc", shard=shard)
    plan = Plan.parse("reference")
    return [
        results.make_row(info, "cpu", "latency", "prefill", Measurement("time", 0.01, "s", [0.011, 0.01, 0.009]),
                         plan, {"rounds": 3}),
        results.make_row(info, "cpu", "latency", "prefill", Measurement("ratio_to_reference", 1.0, "x")),
        results.make_row(info, "", "imports", "qwen3_vl", results.failed("import_seconds", "SyntaxError at x.py:3")),
    ]


def write(tmp_path: Path, run_id: str, fid: str = "f" * 16, shard: str = "1/1") -> Path:
    return results.write_run(some_rows(run_id, fid, shard), tmp_path, fingerprint(fid), run_id, shard, AXES)


def test_round_trip_with_every_column(tmp_path):
    path = write(tmp_path, "run1")
    assert path == tmp_path / ("f" * 16) / "run1.parquet"
    assert (path.parent / "fingerprint.json").exists()
    frame = results.load(path)
    assert list(frame.columns[: len(results.ID_COLUMNS)]) == list(results.ID_COLUMNS)
    assert set(AXES) <= set(frame.columns) and results.axis_columns(frame) == list(AXES)
    row = frame.iloc[0]
    assert row["attention"] == "eager" and row["plan_short"] == "reference"
    assert list(row["samples"]) == [0.011, 0.01, 0.009]
    assert row["schema_version"] == results.SCHEMA_VERSION
    assert frame.iloc[2]["status"] == "failed" and "x.py:3" in frame.iloc[2]["error"]
    assert results.read_fingerprint(path)["volatile"] == {"cpu_mhz": 1}


def test_runs_shards_and_machines_concatenate(tmp_path):
    write(tmp_path, "run1")
    write(tmp_path, "run2")
    write(tmp_path, "fleet", shard="1/2")
    write(tmp_path, "fleet", shard="2/2")
    write(tmp_path, "run3", fid="e" * 16)
    frame = results.load(tmp_path)
    assert len(frame) == 5 * 3
    assert set(frame["run_id"]) == {"run1", "run2", "fleet", "run3"}
    assert set(frame["shard"]) == {"1/1", "1/2", "2/2"}
    assert frame["fingerprint_id"].nunique() == 2
    assert len(results.load([tmp_path / ("f" * 16) / "run1.parquet", tmp_path / ("e" * 16)])) == 6


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(table, where, **kw):
        Path(where).write_bytes(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, "run1")
    assert list(tmp_path.rglob("*")) == [tmp_path / ("f" * 16)]


def test_unknown_schema_version_is_refused(tmp_path):
    path = write(tmp_path, "run1")
    table = pq.read_table(path)
    future = table.replace_schema_metadata({**table.schema.metadata, b"harness.schema_version": b"99"})
    pq.write_table(future, path)
    with pytest.raises(results.SchemaError, match=r"schema version 99.*reads version 1"):
        results.load(tmp_path)


def test_a_parquet_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), path)
    with pytest.raises(results.SchemaError, match="not a harness results file"):
        results.load(path)


def test_corrupt_file_is_skipped_with_a_warning_naming_it(tmp_path):
    write(tmp_path, "good")
    bad = tmp_path / ("f" * 16) / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = results.load(tmp_path)
    assert len(frame) == 3
    assert any(str(bad) in str(w.message) for w in caught)


def test_missing_path_and_empty_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results"):
        results.load(tmp_path / "nope")
    empty = results.load(tmp_path)
    assert len(empty) == 0 and "metric" in empty.columns


def test_unwritable_directory_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        results.check_writable(blocker / "results")


@pytest.mark.parametrize("run_id", ["../escape", "a b", ""])
def test_bad_run_ids(run_id):
    with pytest.raises(ValueError, match="invalid run id"):
        results.check_run_id(run_id)


def test_files_are_readable_by_others_and_fingerprint_json_is_written_once(tmp_path):
    path = write(tmp_path, "run1")
    assert path.stat().st_mode & 0o044 == 0o044 & ~results._UMASK
    fp_file = path.parent / "fingerprint.json"
    first = fp_file.read_text()
    results.write_run(some_rows("run2"), tmp_path, {**fingerprint("f" * 16), "volatile": {"cpu_mhz": 2}}, "run2",
                      axes=AXES)
    assert fp_file.read_text() == first  # committed results stay clean; each run keeps its own copy inside
    assert results.read_fingerprint(path.parent / "run2.parquet")["volatile"] == {"cpu_mhz": 2}
