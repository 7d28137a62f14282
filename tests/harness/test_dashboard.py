"""The dashboard: built from a store holding two fingerprints and several real runs, self-contained,
escaped, and loaded in a real headless browser (Debian's chromium) with no console errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import dashboard, fingerprint, results
from harness.__main__ import main as cli

REPO = Path(__file__).resolve().parents[2]
HOSTILE = "<img src=x onerror=alert(1)><script>alert('x')</script>"


def _real_runs(tmp: Path) -> list[Path]:
    """Real runs of this project: those committed under results/ (the A/A campaign's, the self-test's);
    when a checkout has none, one small real run of the tiny preset is made here."""
    found = [p for p in sorted((REPO / "results").glob("*/*.parquet"))]
    if len(found) >= 2:
        return found
    from harness import validate
    from harness.settings import Settings

    settings = Settings(budget_s=0.0, rounds=2, warmup=1, new_tokens=2, group_size=2, numerics_examples=2,
                        numerics_dtypes=("fp32",))
    store = tmp / "made"
    for run_id in ("made-1", "made-2"):
        opts = validate.Options(preset="tiny", device="cpu", suites=["latency", "memory", "numerics"],
                                results_dir=str(store), plans=["attention=sdpa", "kv_cache=static"], run_id=run_id,
                                settings=settings)
        assert validate.main(opts) in (0, 1)
    return sorted(store.glob("*/*.parquet"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Real runs copied as they are, plus the same runs as if made on a second machine (its fingerprint
    changed, so its id differs), one of them carrying hostile text in an error, a plan and a commit."""
    tmp = tmp_path_factory.mktemp("dashboard")
    out = tmp / "results"
    files = _real_runs(tmp)
    for path in files:
        dest = out / path.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)
        for extra in ("fingerprint.json", "noise.json"):
            if (path.parent / extra).exists():
                shutil.copy2(path.parent / extra, dest / extra)
    fp = results.read_fingerprint(files[0])
    other = {**fp, "stable": {**fp["stable"], "cpu": {**fp["stable"]["cpu"], "model": "Intel(R) Core(TM) i5-10210U"},
                              "gpus": [{"name": "NVIDIA GeForce MX250", "compute_capability": "6.1",
                                        "memory_mib": 2048}]}}
    other["id"] = fingerprint.fingerprint_id(other["stable"])
    assert other["id"] != fp["id"]
    frame = results.load(files[:6])
    axes = results.axis_columns(frame)
    for n, (run_id, rows) in enumerate(frame.groupby("run_id")):
        rows = rows.drop(columns=["source_file"]).assign(fingerprint_id=other["id"], run_id=f"{run_id}-laptop")
        if n == 0:
            rows = rows.copy()
            rows.iloc[0, rows.columns.get_loc("error")] = HOSTILE
            rows.iloc[0, rows.columns.get_loc("status")] = "failed"
            rows["git_sha"] = HOSTILE
            rows.loc[rows["plan_short"] != "reference", "plan_short"] = rows["plan_short"] + HOSTILE
        records = [{k: (None if isinstance(v, float) and v != v and k in axes else v) for k, v in r.items()}
                   for r in rows.to_dict("records")]  # a missing axis value reads back as NaN
        results.write_run(records, out, other, f"{run_id}-laptop", axes=axes)
    (out / "gate").mkdir()
    (out / "gate" / "last.json").write_text('{"exit_code": 1, "baseline": "' + HOSTILE.replace('"', "'") +
                                            '", "candidate": "c", "counts": {"regressed": 1}, "comparisons": [],'
                                            ' "attributions": ["all 2 combination(s) with kv_cache=x are 18% slower"]}')
    return out


def test_store_holds_two_fingerprints_and_several_runs(store):
    frame = results.load(store)
    assert frame["fingerprint_id"].nunique() >= 2
    assert frame["run_id"].nunique() >= 4


def test_page_is_self_contained_and_escaped(store, tmp_path):
    assert cli(["dashboard", "--results", str(store), "--out", str(tmp_path / "site")]) == 0
    page = (tmp_path / "site" / "index.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script>") == 1  # ours, inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched
    assert "<link" not in page and "@import" not in page
    for section in ("Gate: last report", "Each combination against the reference plan", "Trends over runs",
                    "Latency / memory / error", "Self-test", "i5-10210U", "MX250"):
        assert section in page, section


def test_pareto_front_keeps_only_undominated_points():
    flags = dashboard.pareto_front([(1, 1, 0), (0.5, 2, 0.1), (2, 2, 1), (0.5, 2, 0.1)])
    assert flags == [True, True, False, True]


def test_missing_results_folder_is_one_clear_error(tmp_path, capsys):
    assert cli(["dashboard", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "site")]) == 2
    assert "no results folder" in capsys.readouterr().err


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("NO HEADLESS BROWSER: the dashboard was not tested in a browser. Install Debian's chromium "
                "(apt-get install -y chromium; .ci/run does this) to run this test.")


def test_page_loads_in_headless_chromium_with_no_errors_and_plots_render(store, tmp_path):
    browser = _chromium()
    site = tmp_path / "site"
    dashboard.main(str(store), str(site))
    url = (site / "index.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-ready="yes"' in body and "data-errors" not in body, body
    plots = int(re.search(r'data-plots="(\d+)"', body).group(1))
    assert plots >= 3
    assert dom.stdout.count("<polyline") >= 2 and dom.stdout.count("<circle") >= 10
    shot = tmp_path / "dashboard.png"
    cap = subprocess.run([browser, *flags, "--window-size=1400,2600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert cap.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000, cap.stderr[-2000:]
    assert not [line for line in cap.stderr.splitlines() if ":CONSOLE" in line]
