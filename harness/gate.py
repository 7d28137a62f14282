"""``python -m harness gate``: did the candidate get slower, bigger or less accurate than the baseline?

Only like is compared with like: a candidate row meets a baseline row only when fingerprint id,
preset, device, dtype, plan id, suite, case and metric are all equal. Everything else is listed as
"not comparable" with the reason, never compared silently.

A metric regresses when its change is both larger than its threshold (``[tool.harness.gate]``:
latency +10%, peak memory +5% by default, per suite and per metric) and statistically significant:
a one-sided Mann-Whitney U test on the raw samples at ``p_value`` (asv's rule), or, for a value with
no samples, a change beyond the fingerprint's measured A/A noise floor (``python -m harness noise``).
Accuracy figures are held to their declared budgets: a check that passed in the baseline and fails
in the candidate is a regression, as is any case that newly crashes.

On a shared machine absolute times move by tens of percent between processes while the in-run
ratio to the reference plan moves by about 2%, so the ratios (``ratio_to_reference``) are gated by
default and absolute times only where the measured noise floor is below their threshold. A
threshold below the measured noise is refused (the metric is reported, not gated) with the smallest
threshold that would be honoured.

Exit codes: 0 no regression, 1 regression found, 2 the harness could not run (bad reference, bad
configuration, a bug), 3 nothing comparable (the message says how to record a baseline).
"""

from __future__ import annotations

import html
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from harness import noise as noise_mod
from harness import results
from harness.settings import PYPROJECT

EXIT_OK, EXIT_REGRESSION, EXIT_ERROR, EXIT_NOTHING_COMPARABLE = 0, 1, 2, 3

# plan_key: the plan id without the axes at their reference option, so that registering a new axis
# (every plan id gains "new_axis=reference") does not cut a machine's history in two.
IDENTITY = ("fingerprint_id", "preset", "device", "dtype", "plan_key")
KEY = (*IDENTITY, "suite", "case", "metric")
KINDS = ("ratio", "time", "memory", "accuracy", "info")
# What each verdict means for the exit code: only these fail the gate.
FAILING = frozenset({"regressed", "newly failing"})


class GateError(Exception):
    """The gate cannot run as asked (bad reference, bad configuration): one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Configuration: [tool.harness.gate]


@dataclass(frozen=True)
class GateConfig:
    latency: float = 0.10  # relative threshold for times and ratios
    memory: float = 0.05  # relative threshold for bytes
    p_value: float = 0.01  # one-sided Mann-Whitney U
    absolute: str = "auto"  # gate absolute times: "auto" (where the noise floor allows), "always", "never"
    confirm: bool = False  # re-measure suspect cases before failing
    # {suite: {"latency": x, "memory": y}}: per-suite thresholds
    suites: dict[str, dict[str, float]] = field(default_factory=dict)
    # {"metric" | "suite/metric" | "suite/case/metric": threshold}; the most specific wins
    metrics: dict[str, float] = field(default_factory=dict)

    def threshold(self, suite: str, case: str, metric: str, kind: str) -> float | None:
        for name in (f"{suite}/{case}/{metric}", f"{suite}/{metric}", metric):
            if name in self.metrics:
                return self.metrics[name]
        family = "latency" if kind in ("ratio", "time") else kind
        if family not in ("latency", "memory"):
            return None
        return self.suites.get(suite, {}).get(family, getattr(self, family))


def load_config(path: Path = PYPROJECT) -> GateConfig:
    """``GateConfig`` from ``[tool.harness.gate]``; unknown keys or bad values raise ``GateError``."""
    if not path.exists():
        return GateConfig()
    import tomllib

    try:
        table = tomllib.loads(path.read_text()).get("tool", {}).get("harness", {}).get("gate", {})
    except tomllib.TOMLDecodeError as exc:
        raise GateError(f"{path}: {exc}") from None
    where = f"[tool.harness.gate] of {path}"
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("latency", "memory", "p_value"):
            values[key] = _fraction(value, f"{where} {key}")
        elif key == "absolute":
            if value not in ("auto", "always", "never"):
                raise GateError(f"{where} absolute must be auto, always or never, got {value!r}")
            values[key] = value
        elif key == "confirm":
            if not isinstance(value, bool):
                raise GateError(f"{where} confirm must be true or false, got {value!r}")
            values[key] = value
        elif key == "suites":
            suites = {}
            for suite_name, sub in value.items():
                if not isinstance(sub, dict) or set(sub) - {"latency", "memory"}:
                    raise GateError(f"{where} suites.{suite_name} takes only latency and memory thresholds")
                suites[suite_name] = {k: _fraction(v, f"{where} suites.{suite_name}.{k}") for k, v in sub.items()}
            values[key] = suites
        elif key == "metrics":
            values[key] = {name: _fraction(v, f"{where} metrics.{name}") for name, v in value.items()}
        else:
            raise GateError(f"unknown key '{key}' in {where}; keys are: latency, memory, p_value, absolute, "
                            "confirm, suites, metrics")
    if "p_value" in values and not 0 < values["p_value"] < 0.5:
        raise GateError(f"{where} p_value must be between 0 and 0.5, got {values['p_value']}")
    return GateConfig(**values)


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 100:
        raise GateError(f"{what} must be a relative change such as 0.10 (10%), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# References: a run id, a results file, a folder, or a git ref whose committed results/ is used


@dataclass
class Source:
    ref: str
    label: str  # what the ref turned out to be
    frame: pd.DataFrame
    roots: list[Path]  # folders holding fingerprint folders (where noise.json files live)


def _git(args: Sequence[str], cwd: Path, binary: bool = False) -> Any:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60, check=False)
    if out.returncode:
        raise GateError(f"git {' '.join(args)}: {out.stderr.decode(errors='replace').strip()}")
    return out.stdout if binary else out.stdout.decode()


def git_commit(ref: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=cwd,
                             capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def extract_git_results(sha: str, cwd: Path, dest: Path, subdir: str = "results") -> Path:
    """Copy the ``results/`` committed at ``sha`` into ``dest``; returns the copied results folder."""
    top = Path(_git(["rev-parse", "--show-toplevel"], cwd).strip())
    names = [n for n in _git(["ls-tree", "-r", "-z", "--name-only", sha, "--", f"{subdir}/"], top).split("\0") if n]
    for name in names:
        if not name.endswith((".parquet", ".json")):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_git(["cat-file", "blob", f"{sha}:{name}"], top, binary=True))
    (dest / subdir).mkdir(parents=True, exist_ok=True)
    return dest / subdir


def run_files(results_root: Path, run_id: str) -> list[Path]:
    """The parquet files of one run (all of its shards) under a results folder."""
    if not results_root.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(run_id)}(\.shard\d+of\d+)?\.parquet$")
    return sorted(p for p in results_root.rglob("*.parquet") if pattern.match(p.name))


def _load(paths: Iterable[Path], what: str) -> pd.DataFrame:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", results.ResultsWarning)
        try:
            frame = results.load(list(paths))
        except (results.SchemaError, FileNotFoundError) as exc:
            raise GateError(f"{what}: {exc}") from None
    for w in caught:
        print(f"harness gate: warning: {w.message}", file=sys.stderr)
    return frame


def resolve(ref: str, results_root: Path, workdir: Path, cwd: Path | None = None) -> Source:
    """Turn REF into rows: an existing file or folder first, then a run id under ``results_root``,
    then a git ref (its committed ``results/`` is extracted into ``workdir``)."""
    cwd = cwd or Path.cwd()
    path = Path(ref)
    if path.is_file():
        return Source(ref, f"file {ref}", _load([path], ref), [path.parent.parent])
    if path.is_dir():
        return Source(ref, f"folder {ref}", _load([path], ref), [path, path.parent])
    found = run_files(results_root, ref)
    if found:
        return Source(ref, f"run {ref} ({len(found)} file(s) under {results_root})", _load(found, ref),
                      [results_root])
    sha = git_commit(ref, cwd)
    if sha is not None:
        dest = Path(tempfile.mkdtemp(prefix="git-", dir=workdir))
        root = extract_git_results(sha, cwd, dest)
        label = f"git {ref} ({sha[:10]}: results/ as committed)"
        return Source(ref, label, _load([root], ref), [root])
    raise GateError(f"'{ref}' is not a results file, a folder, a run id under '{results_root}', or a git ref")


def _split_plan(plan_id: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in plan_id:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def plan_key(plan_id: str, references: dict[str, str] | None = None) -> str:
    """The plan's non-reference choices, sorted: equal for ids that differ only by reference-valued axes."""
    if references is None:
        references = _references()
    kept = [p for p in _split_plan(plan_id or "") if references.get(p.split("=", 1)[0]) != p.split("=", 1)[-1]]
    return ",".join(sorted(kept))


def _references() -> dict[str, str]:
    try:
        from qwen3_vl.optim import AXES, reference_option
    except Exception:  # the registry does not import: compare raw ids (still like with like)
        return {}
    return {axis: reference_option(axis).name for axis in AXES}


def keyed(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its ``plan_key`` column."""
    if "plan_key" in frame.columns:
        return frame
    references = _references()
    keys = {pid: plan_key(pid, references) for pid in frame["plan_id"].unique()} if len(frame) else {}
    return frame.assign(plan_key=frame["plan_id"].map(keys) if len(frame) else pd.Series(dtype="str"))


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per key: the one from the most recent run holding it (a folder can hold many runs)."""
    frame = keyed(frame)
    if frame.empty:
        return frame
    ordered = frame.sort_values(["timestamp", "run_id"], kind="stable")
    return ordered.drop_duplicates(list(KEY), keep="last").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Statistics


def worse_by(baseline: float, candidate: float, better: str) -> float:
    """Relative change in the 'worse' direction (+0.10: 10% worse; -0.10: 10% better)."""
    if better == "higher":
        baseline, candidate = candidate, baseline
    if baseline == candidate:
        return 0.0
    if baseline <= 0:
        return math.inf if candidate > baseline else -math.inf
    return candidate / baseline - 1


def mann_whitney(baseline: Sequence[float], candidate: Sequence[float], better: str) -> tuple[float, float]:
    """(p that the candidate is worse, p that it is better): one-sided Mann-Whitney U tests."""
    from scipy.stats import mannwhitneyu

    worse = "less" if better == "higher" else "greater"
    improved = "greater" if better == "higher" else "less"
    p_worse = float(mannwhitneyu(candidate, baseline, alternative=worse).pvalue)
    p_better = float(mannwhitneyu(candidate, baseline, alternative=improved).pvalue)
    return p_worse, p_better


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided p-value the exact U test can give with n and m samples (no ties)."""
    return 1 / math.comb(n + m, n)


# ---------------------------------------------------------------------------------------------
# Comparison


def kind_of(row: pd.Series) -> str:
    if row["metric"] == "ratio_to_reference":
        return "ratio"
    if not pd.isna(row.get("bound")):
        return "accuracy"
    unit = row.get("unit") or ""
    if unit in ("s", "tokens/s"):
        return "time"
    if unit == "B":
        return "memory"
    return "info"


@dataclass
class Comparison:
    fingerprint_id: str
    preset: str
    device: str
    dtype: str
    plan_id: str
    plan_short: str
    suite: str
    case: str
    metric: str
    unit: str
    kind: str
    verdict: str  # regressed, improved, unchanged, noisy, ungated, newly failing, fixed, still failing
    baseline: float | None = None
    candidate: float | None = None
    change: float | None = None  # relative, positive = worse
    p_value: float | None = None  # for the direction of the change
    threshold: float | None = None
    noise: float | None = None
    note: str = ""
    axes: dict[str, str] = field(default_factory=dict)
    repro: str = ""
    confirmed: bool | None = None

    @property
    def name(self) -> str:
        return f"{self.suite}/{self.case}/{self.metric}"

    @property
    def where(self) -> str:
        return f"{self.plan_short or '-'} [{self.device or '-'}/{self.dtype}]"


@dataclass
class NotComparable:
    what: str  # the candidate group (fingerprint, preset, device, dtype, plan)
    reason: str
    rows: int = 0


@dataclass
class Attribution:
    axis: str
    option: str
    family: str  # suite/case/metric
    regressed: int
    total: int
    others_regressed: int
    others_total: int
    median_change: float

    def sentence(self) -> str:
        quantifier = "all" if self.regressed == self.total else f"{self.regressed} of {self.total}"
        direction = "slower" if self.family.split("/")[-1] in ("time", "ratio_to_reference", "time_p90") else "worse"
        if self.family.split("/")[-1].endswith("bytes") or "rss" in self.family or "cuda" in self.family:
            direction = "bigger"
        return (f"{quantifier} {self.total} combination(s) with {self.axis}={self.option} are "
                f"{abs(self.median_change):.0%} {direction} ({self.family}; other combinations: "
                f"{self.others_regressed} of {self.others_total} regressed)")


@dataclass
class GateResult:
    baseline: str
    candidate: str
    comparisons: list[Comparison]
    not_comparable: list[NotComparable]
    missing: list[str]  # baseline groups the candidate did not measure
    attributions: list[Attribution]
    notes: list[str]
    config: GateConfig

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.verdict in FAILING]

    @property
    def exit_code(self) -> int:
        if self.regressions:
            return EXIT_REGRESSION
        return EXIT_OK if self.comparisons else EXIT_NOTHING_COMPARABLE

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for c in self.comparisons:
            out[c.verdict] += 1
        return dict(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline, "candidate": self.candidate, "exit_code": self.exit_code,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "counts": self.counts(),
            "comparisons": [asdict(c) for c in self.comparisons if c.verdict not in ("unchanged",)],
            "unchanged": sum(c.verdict == "unchanged" for c in self.comparisons),
            "not_comparable": [asdict(n) for n in self.not_comparable],
            "missing": self.missing,
            "attributions": [a.sentence() for a in self.attributions],
            "notes": self.notes,
            "config": asdict(self.config),
        }


def _samples(value: Any) -> list[float]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [float(s) for s in value if s is not None and math.isfinite(float(s))]


def _judge(base: pd.Series, cand: pd.Series, kind: str, config: GateConfig, noise: float | None
           ) -> tuple[str, dict[str, Any]]:
    """The verdict for one comparable pair, and the figures behind it."""
    info: dict[str, Any] = {}
    b_status, c_status = base["status"], cand["status"]
    if b_status != "ok" or c_status != "ok":
        if b_status == "ok" and c_status == "failed":
            return "newly failing", {"note": str(cand["error"])}
        if b_status == "failed" and c_status == "ok":
            return "fixed", {"note": f"was: {base['error']}"}
        if b_status == c_status == "failed":
            return "still failing", {"note": str(cand["error"])}
        return "ungated", {"note": f"{b_status} in the baseline, {c_status} in the candidate: "
                                   f"{cand['error'] or base['error']}"}
    b, c = base["value"], cand["value"]
    if pd.isna(b) or pd.isna(c):
        return "ungated", {"note": "no value on one side"}
    better = cand["better"] or base["better"] or "lower"
    change = worse_by(float(b), float(c), better)
    info.update(baseline=float(b), candidate=float(c), change=change, noise=noise)
    threshold = config.threshold(cand["suite"], cand["case"], cand["metric"], kind)
    info["threshold"] = threshold
    if kind == "accuracy":
        return "unchanged", {**info, "note": "within its declared budget on both sides"}
    if threshold is None:
        return "ungated", {**info, "note": "informational (no threshold configured)"}
    if kind == "time" and config.absolute != "always":
        if config.absolute == "never":
            return "ungated", {**info, "note": "absolute time (absolute = \"never\")"}
        if noise is None:
            return "ungated", {**info, "note": "absolute time: no A/A noise floor measured on this machine "
                                               "(python -m harness noise); the in-run ratio is gated instead"}
        if noise >= threshold:
            return "ungated", {**info, "note": f"absolute time: A/A noise {_pct(noise)} >= threshold "
                                               f"{_pct(threshold)}; the in-run ratio is gated instead"}
    if noise is not None and math.isinf(noise):
        return "ungated", {**info, "note": "the A/A noise is unbounded on this machine (zero in one run, not in "
                                           "another): no threshold can gate it"}
    if noise is not None and threshold < noise:
        least = _pct(math.ceil(noise * 1000 - 1e-9) / 1000)
        return "ungated", {**info, "note": f"threshold refused: {_pct(threshold)} is below the measured A/A noise "
                                           f"floor {_pct(noise)} on this machine; set at least {least} in "
                                           "[tool.harness.gate] to gate it"}
    bs, cs = _samples(base["samples"]), _samples(cand["samples"])
    if len(bs) >= 2 and len(cs) >= 2:
        if smallest_p(len(bs), len(cs)) > config.p_value:
            return "ungated", {**info, "note": f"{len(bs)} vs {len(cs)} samples cannot reach p < {config.p_value:g} "
                                               f"(smallest possible {smallest_p(len(bs), len(cs)):.3g}): more rounds"}
        p_worse, p_better = mann_whitney(bs, cs, better)
        p = p_worse if change >= 0 else p_better
        significant = p < config.p_value
        info["p_value"] = p
        how = f"Mann-Whitney p = {p:.2g}"
    elif noise is not None:
        significant = abs(change) > noise
        how = f"beyond the A/A noise floor {_pct(noise)}" if significant else f"within the A/A noise {_pct(noise)}"
    else:
        return "ungated", {**info, "note": "a single value (no raw samples) and no A/A noise floor to judge it by "
                                           "(python -m harness noise)"}
    if abs(change) <= threshold:
        return "unchanged", info
    if not significant:
        return "noisy", {**info, "note": f"beyond the threshold but not significant ({how})"}
    return ("regressed" if change > 0 else "improved"), {**info, "note": how}


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:+.1%}" if x < 0 else f"{x:.1%}"


def _group_label(values: Sequence[str]) -> str:
    fp, preset, device, dtype = values[:4]
    label = f"fingerprint {fp}, preset {preset}, {device or 'no device'}/{dtype}"
    if len(values) > 4:
        label += f", plan {values[4] or '-'}"
    return label


RECORD_HINT = ("record a baseline on this machine: python -m harness validate --preset {preset} --device {device} "
               "--dtype {dtype} --suites latency,memory --results-dir results (on the baseline commit), "
               "then commit results/")


def _not_comparable(base: pd.DataFrame, cand: pd.DataFrame) -> tuple[list[NotComparable], set[tuple]]:
    """Candidate groups with no baseline counterpart (each with its reason), and the comparable groups."""
    out: list[NotComparable] = []
    machine = ["fingerprint_id", "preset", "device", "dtype"]
    base_groups = set(map(tuple, base[list(IDENTITY)].drop_duplicates().itertuples(index=False)))
    base_fps = sorted(set(base["fingerprint_id"]))
    comparable: set[tuple] = set()
    for group, rows in cand.groupby(machine, sort=True, dropna=False):
        fp, preset, device, dtype = group
        same_fp = base[base["fingerprint_id"] == fp]
        reason = ""
        if same_fp.empty:
            hint = RECORD_HINT.format(preset=preset, device=device or "cpu", dtype=dtype)
            held = ", ".join(base_fps) or "nothing"
            reason = f"no baseline results for fingerprint {fp} (the baseline holds {held}); {hint}"
        elif preset not in set(same_fp["preset"]):
            reason = f"the baseline has this fingerprint only for preset(s) {', '.join(sorted(set(same_fp['preset'])))}"
        elif device not in set(same_fp[same_fp["preset"] == preset]["device"]):
            have = sorted(set(same_fp[same_fp["preset"] == preset]["device"]))
            reason = f"the baseline has no device {device or '(none)'} here (has: {', '.join(have)})"
        elif dtype not in set(same_fp[(same_fp["preset"] == preset) & (same_fp["device"] == device)]["dtype"]):
            reason = f"the baseline has no dtype {dtype} here"
        if reason:
            out.append(NotComparable(_group_label(group), reason, len(rows)))
            continue
        missing_plans = []
        for key, plan_rows in rows.groupby("plan_key", sort=True):
            ident = (fp, preset, device, dtype, key)
            if ident in base_groups:
                comparable.add(ident)
            else:
                first = plan_rows.iloc[0]
                missing_plans.append((first["plan_id"], first["plan_short"], len(plan_rows)))
        for plan_id, short, n in missing_plans:
            out.append(NotComparable(_group_label((*group, short or plan_id)),
                                     "this plan was not measured in the baseline", n))
    return out, comparable


def compare(baseline: pd.DataFrame, candidate: pd.DataFrame, config: GateConfig,
            noise_floors: dict[tuple, float] | None = None, labels: tuple[str, str] = ("baseline", "candidate")
            ) -> GateResult:
    """Every comparable key of ``candidate`` judged against ``baseline`` (latest run per key on each side)."""
    noise_floors = noise_floors or {}
    base, cand = latest(baseline), latest(candidate)
    notes: list[str] = []
    if not base.empty and not cand.empty and set(base["run_id"]) == set(cand["run_id"]):
        notes.append("the baseline and the candidate are the same run(s)")
    not_comparable, groups = _not_comparable(base, cand)
    axes = [c for c in results.axis_columns(cand) if c in cand.columns]
    comparisons: list[Comparison] = []
    if groups:
        ident = list(IDENTITY)
        in_groups = lambda f: f[pd.MultiIndex.from_frame(f[ident]).isin(list(groups))]
        b, c = in_groups(base), in_groups(cand)
        merged = c.merge(b, on=list(KEY), how="left", suffixes=("", "_base"), indicator=True)
        absent = merged[merged["_merge"] == "left_only"]
        if len(absent):
            by_case = absent.groupby(["suite", "case"]).size()
            shown = ", ".join(f"{s}/{k}" for s, k in list(by_case.index)[:8])
            not_comparable.append(NotComparable(
                f"{len(absent)} row(s) of comparable plans", f"not in the baseline (cases: {shown}"
                f"{' ...' if len(by_case) > 8 else ''})", len(absent)))
        for _, row in merged[merged["_merge"] == "both"].iterrows():
            base_row = pd.Series({k[:-5]: row[k] for k in row.index if k.endswith("_base")} |
                                 {k: row[k] for k in KEY})
            if row["status"] == "skipped" and base_row["status"] == "skipped":
                continue
            kind = kind_of(row)
            floor = noise_mod.floor_for(noise_floors, row)
            verdict, info = _judge(base_row, row, kind, config, floor)
            comparisons.append(Comparison(
                fingerprint_id=row["fingerprint_id"], preset=row["preset"], device=row["device"],
                dtype=row["dtype"], plan_id=row["plan_id"], plan_short=row["plan_short"] or "",
                suite=row["suite"], case=row["case"], metric=row["metric"], unit=row["unit"] or "", kind=kind,
                verdict=verdict, axes={a: row[a] for a in axes if isinstance(row.get(a), str)},
                repro=row.get("repro") or "", **info))
    missing: list[str] = []
    if len(base) and len(cand):
        cand_ident = set(map(tuple, cand[list(IDENTITY)].drop_duplicates().itertuples(index=False)))
        cand_fps = set(cand["fingerprint_id"])
        for _, r in base.drop_duplicates(list(IDENTITY)).iterrows():
            if tuple(r[k] for k in IDENTITY) not in cand_ident and r["fingerprint_id"] in cand_fps:
                missing.append(_group_label([*(r[k] for k in IDENTITY[:4]), r["plan_short"] or r["plan_key"]]))
    result = GateResult(labels[0], labels[1], comparisons, not_comparable, missing, [], notes, config)
    result.attributions = attribute(comparisons)
    return result


def attribute(comparisons: Sequence[Comparison], min_share: float = 0.75, max_other: float = 0.25
              ) -> list[Attribution]:
    """Per metric family with regressions: the axis options whose combinations (nearly) all regressed
    while the other combinations (mostly) did not, so the culprit option is named, not just rows."""
    families: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        if c.kind in ("ratio", "time", "memory") and c.verdict in ("regressed", "unchanged", "improved", "noisy"):
            families[c.name].append(c)
    out: list[Attribution] = []
    for family, items in sorted(families.items()):
        if sum(c.verdict == "regressed" for c in items) < 2:
            continue
        options = {(a, o) for c in items for a, o in c.axes.items()}
        for axis, option in sorted(options):
            inside = [c for c in items if c.axes.get(axis) == option]
            outside = [c for c in items if c.axes.get(axis) != option]
            bad_in = [c for c in inside if c.verdict == "regressed"]
            bad_out = sum(c.verdict == "regressed" for c in outside)
            if len(bad_in) < 2 or len(bad_in) / len(inside) < min_share:
                continue
            if outside and bad_out / len(outside) > max_other:
                continue
            changes = [c.change for c in inside if c.change is not None and math.isfinite(c.change)]
            out.append(Attribution(axis, option, family, len(bad_in), len(inside), bad_out, len(outside),
                                   statistics.median(changes) if changes else math.nan))
    return out


# ---------------------------------------------------------------------------------------------
# Confirmation: re-measure the suspect cases on this checkout before failing


def _part(repro: str, suite: str) -> str:
    found = re.search(r"--suites (\S+)", repro or "")
    return found.group(1) if found else suite


def measure(groups: dict[tuple[str, str, str], dict[str, set[str]]], results_dir: Path, run_id: str,
            extra: Sequence[str] = ()) -> list[Path]:
    """Run ``python -m harness validate`` for {(preset, device, dtype): {part: {plan ids}}} on this
    checkout, storing into ``results_dir`` under ``run_id``; returns the written files."""
    for (preset, device, dtype), parts in sorted(groups.items()):
        plans = sorted(set().union(*parts.values()))
        cmd = [sys.executable, "-m", "harness", "validate", "--preset", preset, "--device", device or "cpu",
               "--dtype", dtype, "--suites", ",".join(sorted(parts)), "--results-dir", str(results_dir),
               "--run-id", run_id, "--budget-s", "0", *extra]
        for plan in plans:
            cmd += ["--plan", plan]
        print(f"harness gate: measuring: {shlex.join(cmd[1:])}", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode not in (0, 1):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise GateError(f"measuring failed (exit {proc.returncode}): {tail}")
    return run_files(results_dir, run_id)


def machine_id() -> str:
    """This machine's fingerprint id as a fresh ``python -m harness`` process sees it (the process that
    measures: torch's thread count, part of the fingerprint, can differ inside a test runner)."""
    proc = subprocess.run([sys.executable, "-m", "harness", "fingerprint", "--id-only"], capture_output=True,
                          text=True, check=False, timeout=300)
    if proc.returncode:
        raise GateError(f"cannot fingerprint this machine: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout.strip()


def confirm(result: GateResult, baseline: pd.DataFrame, config: GateConfig, noise_floors: dict,
            workdir: Path) -> None:
    """Re-measure every regressed latency/memory case on this checkout; a regression stands only when
    the fresh measurement regresses too (the cross-cutting lesson: confirm before alerting). One that
    cannot be re-measured here (another machine's result) stands, with a note saying so."""
    suspects = [c for c in result.regressions if c.kind in ("ratio", "time", "memory")]
    if not suspects:
        return
    here = machine_id()
    groups: dict[tuple[str, str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for c in suspects:
        if c.fingerprint_id == here:
            groups[(c.preset, c.device, c.dtype)][_part(c.repro, c.suite)].add(c.plan_id)
    fresh: dict[tuple, Comparison] = {}
    if groups:
        run_id = results.new_run_id() + "-confirm"
        files = measure(groups, workdir / "confirm", run_id)
        again = compare(baseline, _load(files, "confirmation run"), config, noise_floors)
        fresh = {(c.fingerprint_id, c.preset, c.device, c.dtype, plan_key(c.plan_id), c.suite, c.case, c.metric): c
                 for c in again.comparisons}
        result.notes.append(f"confirmation run {run_id} re-measured {len(suspects)} suspect case(s)")
    for c in suspects:
        twin = fresh.get((c.fingerprint_id, c.preset, c.device, c.dtype, plan_key(c.plan_id), c.suite, c.case,
                          c.metric))
        if twin is None:
            c.note += (f"; could not be confirmed here (this machine is {here}, the result is from "
                       f"{c.fingerprint_id})" if c.fingerprint_id != here else "; the confirmation run lacks it")
            continue
        c.confirmed = twin.verdict == "regressed"
        if c.confirmed:
            c.note += f"; confirmed by a fresh run ({_pct(twin.change)})"
        else:
            c.verdict = "noisy"
            c.note += f"; not confirmed by a fresh run ({twin.verdict}, {_pct(twin.change)})"
    result.attributions = attribute(result.comparisons)


# ---------------------------------------------------------------------------------------------
# Output


ORDER = ("regressed", "newly failing", "improved", "fixed", "noisy", "still failing", "ungated", "unchanged")


def _value(x: float | None, unit: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if unit == "s":
        return f"{x * 1e3:.3g} ms"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if abs(x) < 1024 or u == "GiB":
                return f"{x:.0f} {u}" if u == "B" else f"{x:.1f} {u}"
            x /= 1024
    return f"{x:.4g}{' ' + unit if unit and unit not in ('x', 'ratio') else ''}"


def _evidence(c: Comparison) -> str:
    if c.p_value is not None:
        return f"p={c.p_value:.2g}"
    if c.noise is not None:
        return f"noise {_pct(c.noise)}"
    return "-"


def _sorted(comparisons: Iterable[Comparison]) -> list[Comparison]:
    return sorted(comparisons, key=lambda c: (ORDER.index(c.verdict), -(c.change or 0) if c.change is not None
                                              and math.isfinite(c.change) else 0, c.name, c.plan_short))


def headline(result: GateResult) -> str:
    code = result.exit_code
    counts = result.counts()
    summary = ", ".join(f"{counts[v]} {v}" for v in ORDER if counts.get(v))
    if code == EXIT_REGRESSION:
        return f"FAIL: {len(result.regressions)} regression(s) ({summary})"
    if code == EXIT_NOTHING_COMPARABLE:
        return "NOTHING COMPARABLE: no candidate result has a baseline with the same fingerprint, preset, device, " \
               "dtype and plan"
    return f"PASS: no regression ({summary})"


def print_terminal(result: GateResult, limit: int = 40, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    console.print(f"gate: baseline {result.baseline}\n      candidate {result.candidate}", markup=False,
                  highlight=False)
    shown = [c for c in _sorted(result.comparisons) if c.verdict not in ("unchanged", "ungated")]
    if shown:
        table = Table(title="gate: changed cases")
        for col in ("verdict", "case", "plan", "baseline", "candidate", "change", "evidence", "threshold", "note"):
            table.add_column(col, overflow="fold")
        colour = {"regressed": "red", "newly failing": "red", "improved": "green", "fixed": "green"}
        for c in shown[:limit]:
            table.add_row(Text(c.verdict, colour.get(c.verdict, "yellow")), Text(c.name), Text(c.where),
                          _value(c.baseline, c.unit), _value(c.candidate, c.unit), _pct(c.change), _evidence(c),
                          _pct(c.threshold), Text(c.note[:200]))
        if len(shown) > limit:
            table.caption = f"{len(shown) - limit} more in the Markdown report (--report)"
        console.print(table)
    for a in result.attributions:
        console.print(Text(f"attribution: {a.sentence()}", "bold"))
    ungated = [c for c in result.comparisons if c.verdict == "ungated"]
    if ungated:
        reasons = defaultdict(int)
        for c in ungated:
            reasons[f"{c.suite}/{c.metric}: {c.note}"] += 1
        console.print(f"{len(ungated)} comparison(s) reported but not gated:")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:12]:
            console.print(Text(f"  {n} x {reason}"))
    for n in result.not_comparable:
        console.print(Text(f"not comparable: {n.what} ({n.rows} row(s)): {n.reason}", "yellow"))
    if result.missing:
        console.print(f"{len(result.missing)} baseline plan(s) not measured by the candidate "
                      f"(e.g. {result.missing[0]})", markup=False, highlight=False)
    for note in result.notes:
        console.print(Text(f"note: {note}"))
    style = {EXIT_OK: "green", EXIT_REGRESSION: "red", EXIT_NOTHING_COMPARABLE: "yellow"}[result.exit_code]
    console.print(Text(f"{headline(result)}  (exit {result.exit_code})", f"bold {style}"))


def _md(text: Any) -> str:
    """Table-cell text: HTML-escaped (a PR comment renders HTML) with pipes and newlines neutralised."""
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ").replace("`", "&#96;")


def markdown(result: GateResult, limit: int = 200) -> str:
    lines = [f"## Performance gate: {_md(headline(result))}", "",
             f"- baseline: {_md(result.baseline)}", f"- candidate: {_md(result.candidate)}",
             f"- exit code: {result.exit_code} (0 no regression, 1 regression, 2 harness error, 3 nothing comparable)",
             ""]
    if result.attributions:
        lines += ["### Attribution", ""] + [f"- {_md(a.sentence())}" for a in result.attributions] + [""]
    changed = [c for c in _sorted(result.comparisons) if c.verdict not in ("unchanged", "ungated")]
    if changed:
        lines += ["### Changed cases", "",
                  "| verdict | case | plan | device/dtype | baseline | candidate | change | p-value / noise | "
                  "threshold | axis values | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in changed[:limit]:
            axes = ", ".join(f"{a}={o}" for a, o in c.axes.items())
            lines.append("| " + " | ".join(_md(x) for x in (
                c.verdict, c.name, c.plan_short or "-", f"{c.device or '-'}/{c.dtype}", _value(c.baseline, c.unit),
                _value(c.candidate, c.unit), _pct(c.change), _evidence(c), _pct(c.threshold), axes, c.note)) + " |")
        if len(changed) > limit:
            lines.append(f"\n{len(changed) - limit} more changed case(s) not shown.")
        lines.append("")
    regressed = [c for c in changed if c.verdict in FAILING and c.repro]
    if regressed:
        lines += ["<details><summary>Reproduce</summary>", "", "```"]
        lines += sorted({c.repro.replace("```", "") for c in regressed})[:20]
        lines += ["```", "", "</details>", ""]
    ungated = [c for c in result.comparisons if c.verdict == "ungated"]
    if ungated:
        reasons: dict[str, int] = defaultdict(int)
        for c in ungated:
            reasons[f"{c.suite}/{c.metric}: {c.note}"] += 1
        lines += ["### Reported, not gated", ""]
        lines += [f"- {n} x {_md(r)}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:20]] + [""]
    if result.not_comparable:
        lines += ["### Not comparable", ""]
        lines += [f"- {_md(n.what)} ({n.rows} row(s)): {_md(n.reason)}" for n in result.not_comparable] + [""]
    if result.missing:
        lines += [f"{len(result.missing)} baseline plan(s) were not measured by the candidate.", ""]
    unchanged = sum(c.verdict == "unchanged" for c in result.comparisons)
    lines.append(f"{unchanged} comparison(s) unchanged within their thresholds.")
    for note in result.notes:
        lines.append(f"\nNote: {_md(note)}")
    return "\n".join(lines) + "\n"


def store(result: GateResult, folder: Path) -> Path:
    """The last report (JSON and Markdown) under ``folder``, for the dashboard."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = json.dumps(result.to_json(), indent=1, default=str, allow_nan=True)
    results.atomic_write(folder / "last.json", lambda tmp: Path(tmp).write_text(doc))
    text = markdown(result)
    results.atomic_write(folder / "last.md", lambda tmp: Path(tmp).write_text(text))
    return folder / "last.json"


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class Options:
    baseline: str
    candidate: str | None = None
    measure: bool = False  # measure the candidate now (this checkout, the baseline's plans for this machine)
    results_dir: str = "results"
    report: str | None = None
    confirm: bool | None = None
    store: bool = True
    config_path: Path = PYPROJECT


def _measure_candidate(baseline: pd.DataFrame, results_dir: Path) -> tuple[str, pd.DataFrame]:
    here = machine_id()
    mine = latest(baseline[baseline["fingerprint_id"] == here])
    mine = mine[(mine["plan_id"] != "") & mine["suite"].isin(["latency", "memory", "accuracy", "vision"])]
    if mine.empty:
        held = ", ".join(sorted(set(baseline["fingerprint_id"]))) or "nothing"
        raise _NothingToMeasure(f"the baseline has no latency/memory results for this machine's fingerprint {here} "
                                f"(it holds {held}); " + RECORD_HINT.format(preset="tiny", device="cpu", dtype="fp32"))
    groups: dict[tuple[str, str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for _, row in mine.iterrows():
        groups[(row["preset"], row["device"], row["dtype"])][_part(row["repro"], row["suite"])].add(row["plan_id"])
    run_id = results.new_run_id() + "-gate"
    files = measure(groups, results_dir, run_id)
    return f"run {run_id} (measured now on this checkout)", _load(files, run_id)


class _NothingToMeasure(Exception):
    pass


def main(opts: Options) -> int:
    config = load_config(opts.config_path)
    if opts.confirm is not None:
        config = GateConfig(**{**asdict(config), "confirm": opts.confirm})
    results_root = Path(opts.results_dir)
    with tempfile.TemporaryDirectory(prefix="harness-gate-") as tmp:
        workdir = Path(tmp)
        base = resolve(opts.baseline, results_root, workdir)
        if opts.measure:
            try:
                cand_label, cand_frame = _measure_candidate(base.frame, results_root)
            except _NothingToMeasure as exc:
                print(f"harness gate: nothing comparable: {exc}", file=sys.stderr)
                return EXIT_NOTHING_COMPARABLE
            cand_roots = [results_root]
        else:
            if not opts.candidate:
                raise GateError("give --candidate REF, or --measure to measure the candidate now")
            cand = resolve(opts.candidate, results_root, workdir)
            cand_label, cand_frame, cand_roots = cand.label, cand.frame, cand.roots
        floors = noise_mod.load_floors([*cand_roots, results_root, *base.roots])
        result = compare(base.frame, cand_frame, config, floors, (base.label, cand_label))
        if config.confirm and result.regressions:
            confirm(result, base.frame, config, floors, workdir)
    print_terminal(result)
    if opts.report:
        text = markdown(result)
        try:
            results.atomic_write(Path(opts.report), lambda t: Path(t).write_text(text))
        except OSError as exc:
            raise GateError(f"cannot write the report '{opts.report}': {exc}") from None
        print(f"report: {opts.report}", file=sys.stderr)
    if opts.store and results_root.is_dir():
        try:
            store(result, results_root / "gate")
        except OSError as exc:
            print(f"harness gate: warning: could not store the report under {results_root}/gate: {exc}",
                  file=sys.stderr)
    if result.exit_code == EXIT_NOTHING_COMPARABLE:
        for n in result.not_comparable[:3]:
            print(f"harness gate: nothing comparable: {n.what}: {n.reason}", file=sys.stderr)
    return result.exit_code
