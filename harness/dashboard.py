"""``python -m harness dashboard``: one static, self-contained HTML page built from every stored result.

It opens from disk (no server, nothing fetched: the CSS, the few lines of JS and every plot are
inline; plots are SVG drawn here). Per hardware fingerprint: the machine's details and A/A noise
floors; a heatmap of each combination's latency, memory and error against the reference plan; the
trend of each latency ratio over runs (commits) per combination; a latency / memory / error Pareto
view; then the self-test score and the gate's last report. Every piece of text that comes from the
results (plan ids, error messages, machine names) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from harness import results

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
LATENCY_CASES = ("vision_encode", "prefill", "decode_per_token", "generate")
MEMORY_METRICS = (("memory", "decode", "kv_cache_bytes"), ("memory", "placement", "memory.device_weight_bytes"),
                  ("memory", "load", "rss_increase"), ("memory", "decode", "cuda_allocated_peak"))
MAX_ROWS = 200  # heatmap rows per fingerprint
MAX_LINES = 16  # trend lines per chart (the combinations that moved most)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt(x: Any, unit: str = "") -> str:
    x = _num(x)
    if x is None:
        return "-"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if abs(x) < 1024 or u == "GiB":
                return f"{x:.0f} {u}" if u == "B" else f"{x:.1f} {u}"
            x /= 1024
    if unit == "s":
        return f"{x * 1e3:.3g} ms"
    return f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# Colours


def ratio_colour(r: float | None) -> str:
    """Green below 1 (faster/smaller), red above, white at 1; log scale saturating at 4x."""
    if r is None or r <= 0:
        return "#eeeeee"
    t = max(-1.0, min(1.0, math.log(r, 4)))
    if t < 0:
        g = int(255 + t * (255 - 170))
        return f"rgb({int(255 + t * 200)},{g},{int(255 + t * 200)})"
    return f"rgb(255,{int(255 - t * 200)},{int(255 - t * 200)})"


def error_colour(value: float | None, bound: float | None) -> str:
    if value is None:
        return "#eeeeee"
    if bound:
        share = value / bound
        if share > 1:
            return "rgb(230,80,80)"
        return f"rgb({int(255 - share * 30)},{int(255 - share * 60)},{int(255 - share * 160)})"
    return "#ffffff"


def viridis(t: float) -> str:
    """A small viridis-like ramp for 0..1."""
    stops = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
    t = max(0.0, min(1.0, t)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    return "rgb({},{},{})".format(*(int(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1], strict=True)))


# ---------------------------------------------------------------------------------------------
# SVG plots


@dataclass
class Axis:
    lo: float
    hi: float
    log: bool = False

    def scale(self, v: float, a: float, b: float) -> float:
        lo, hi, v = (math.log10(self.lo), math.log10(self.hi), math.log10(v)) if self.log else (self.lo, self.hi, v)
        return a + (v - lo) / ((hi - lo) or 1.0) * (b - a)

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            lo, hi = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            out = [10.0**e for e in range(lo, hi + 1) if self.lo <= 10.0**e <= self.hi]
            return out or [self.lo, self.hi]
        span = (self.hi - self.lo) or 1.0
        step = 10 ** math.floor(math.log10(span / n))
        step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(int((self.hi - first) / step) + 1)]


def _axis(values: Iterable[float], log: bool = False, pad: float = 0.05, include: Sequence[float] = ()) -> Axis:
    vals = [v for v in (*values, *include) if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return Axis(0.1, 1.0, log) if log else Axis(0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        if lo == hi:
            lo, hi = lo / 2, hi * 2
        return Axis(lo / (1 + pad * 4), hi * (1 + pad * 4), True)
    if lo == hi:
        lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
    span = hi - lo
    return Axis(lo - span * pad, hi + span * pad)


def line_chart(title: str, x_labels: Sequence[str], series: dict[str, list[tuple[int, float, str]]],
               y_label: str, reference_line: float | None = None, width: int = 620, height: int = 300) -> str:
    """One polyline per series over the run positions ``x_labels``; each point ``(x, y, tooltip)``."""
    left, right, top, bottom = 56, 12, 28, 44
    ys = [p[1] for pts in series.values() for p in pts]
    ya = _axis(ys, include=[reference_line] if reference_line is not None else ())
    n = max(1, len(x_labels) - 1)
    px = lambda i: left + (i / n if len(x_labels) > 1 else 0.5) * (width - left - right)
    py = lambda v: ya.scale(v, height - bottom, top)
    out = [f'<svg class="plot" data-kind="trend" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{esc(title)}">', f'<text x="{left}" y="16" class="title">{esc(title)}</text>']
    for t in ya.ticks():
        y = py(t)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">{t:.3g}</text>')
    if reference_line is not None:
        y = py(reference_line)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="refline"/>')
    step = max(1, len(x_labels) // 8)
    for i, label in enumerate(x_labels):
        if i % step == 0 or i == len(x_labels) - 1:
            out.append(f'<text x="{px(i):.1f}" y="{height - bottom + 14}" class="tick" text-anchor="middle">'
                       f'{esc(label)}</text>')
    out.append(f'<text x="12" y="{top + (height - top - bottom) / 2:.0f}" class="tick" '
               f'transform="rotate(-90 12 {top + (height - top - bottom) / 2:.0f})" text-anchor="middle">'
               f'{esc(y_label)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = sorted(pts)
        path = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v, _ in pts)
        out.append(f'<g class="series" data-series="{esc(name)}">')
        if len(pts) > 1:
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        for i, v, tip in pts:
            out.append(f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"><title>{esc(name)}: '
                       f'{esc(tip)}</title></circle>')
        out.append("</g>")
    out.append("</svg>")
    legend = "".join(f'<span class="key" data-series="{esc(name)}"><i style="background:{PALETTE[k % len(PALETTE)]}">'
                     f'</i>{esc(name)}</span>' for k, name in enumerate(series))
    return f'<figure>{"".join(out)}<figcaption class="legend">{legend}</figcaption></figure>'


def pareto_front(points: Sequence[tuple[float, float, float]]) -> list[bool]:
    """True for each point no other point beats or equals on all three (lower is better) and beats on one."""
    flags = []
    for i, p in enumerate(points):
        dominated = any(all(q[k] <= p[k] for k in range(3)) and any(q[k] < p[k] for k in range(3))
                        for j, q in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def scatter(title: str, points: Sequence[dict[str, Any]], x_label: str, y_label: str, width: int = 620,
            height: int = 340) -> str:
    """Points {x, y, error, label, pareto}: colour = log10 of the error, ringed when on the Pareto front."""
    left, right, top, bottom = 64, 120, 28, 44
    xa = _axis([p["x"] for p in points], log=True, include=[1.0])
    ya = _axis([p["y"] for p in points], log=True, include=[1.0])
    errs = [math.log10(max(p["error"], 1e-12)) for p in points if p["error"] is not None]
    elo, ehi = (min(errs), max(errs)) if errs else (0.0, 1.0)
    out = [f'<svg class="plot" data-kind="pareto" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{esc(title)}">', f'<text x="{left}" y="16" class="title">{esc(title)}</text>']
    for t in xa.ticks():
        x = xa.scale(t, left, width - right)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{height - bottom + 14}" class="tick" text-anchor="middle">{t:.3g}</text>')
    for t in ya.ticks():
        y = ya.scale(t, height - bottom, top)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">{t:.3g}</text>')
    x1, y1 = xa.scale(1.0, left, width - right), ya.scale(1.0, height - bottom, top)
    out.append(f'<line x1="{x1:.1f}" x2="{x1:.1f}" y1="{top}" y2="{height - bottom}" class="refline"/>'
               f'<line x1="{left}" x2="{width - right}" y1="{y1:.1f}" y2="{y1:.1f}" class="refline"/>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" class="tick" text-anchor="middle">'
               f'{esc(x_label)}</text><text x="14" y="{(top + height - bottom) / 2:.0f}" class="tick" '
               f'text-anchor="middle" transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">'
               f"{esc(y_label)}</text>")
    for p in sorted(points, key=lambda p: p["pareto"]):
        colour = "#999999" if p["error"] is None else viridis(
            (math.log10(max(p["error"], 1e-12)) - elo) / ((ehi - elo) or 1.0))
        ring = ' stroke="#000" stroke-width="2"' if p["pareto"] else ' stroke="#fff" stroke-width="0.5"'
        tip = (f'{p["label"]}: latency x{p["x"]:.3g}, memory x{p["y"]:.3g}, error '
               f'{"-" if p["error"] is None else format(p["error"], ".2g")}{" (Pareto front)" if p["pareto"] else ""}')
        out.append(f'<circle cx="{xa.scale(p["x"], left, width - right):.1f}" '
                   f'cy="{ya.scale(p["y"], height - bottom, top):.1f}" r="6" fill="{colour}"{ring}>'
                   f'<title>{esc(tip)}</title></circle>')
    for k in range(6):  # the error colour key
        t = k / 5
        out.append(f'<rect x="{width - right + 20}" y="{top + 20 + k * 18}" width="14" height="14" '
                   f'fill="{viridis(t)}"/><text x="{width - right + 40}" y="{top + 31 + k * 18}" class="tick">'
                   f'{10 ** (elo + t * (ehi - elo)):.1g}</text>')
    out.append(f'<text x="{width - right + 20}" y="{top + 12}" class="tick">logits_rel</text></svg>')
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Data


def load_store(results_dir: Path) -> tuple[pd.DataFrame, dict[str, dict], dict[str, dict], list[str]]:
    """(every row, {fingerprint id: fingerprint.json}, {fingerprint id: noise.json}, load warnings)."""
    from harness import noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", results.ResultsWarning)
        frame = results.load(results_dir)
    fingerprints, floors = {}, {}
    for path in sorted(Path(results_dir).glob("*/fingerprint.json")):
        try:
            fingerprints[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    for path in sorted(Path(results_dir).glob(f"*/{noise.NOISE_FILE}")):
        try:
            floors[path.parent.name] = noise.read(path)
        except (OSError, ValueError, KeyError):
            continue
    return frame, fingerprints, floors, [str(w.message) for w in caught]


def _runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: id, time, git sha (ordered by time)."""
    runs = frame.groupby("run_id").agg(timestamp=("timestamp", "min"), git_sha=("git_sha", "first"),
                                      dirty=("git_dirty", "max")).reset_index()
    return runs.sort_values(["timestamp", "run_id"]).reset_index(drop=True)


def _latest(frame: pd.DataFrame) -> pd.DataFrame:
    keys = ["preset", "device", "dtype", "plan_id", "suite", "case", "metric"]
    return frame.sort_values(["timestamp", "run_id"]).drop_duplicates(keys, keep="last")


def _label(plan_short: str) -> str:
    return plan_short or "reference"


# ---------------------------------------------------------------------------------------------
# Sections


def fingerprint_section(fp: dict | None, floors: dict | None) -> str:
    if not fp:
        return "<p>No fingerprint.json stored for this fingerprint.</p>"
    stable = fp.get("stable", {})
    cpu = stable.get("cpu", {})
    soft = stable.get("software", {})
    gpus = stable.get("gpus") or stable.get("torch_gpus") or []
    git = fp.get("git") or {}
    rows = [("CPU", f'{cpu.get("model", "?")} ({cpu.get("physical_cores", "?")} cores, {cpu.get("threads", "?")} '
                    f'threads, {cpu.get("usable_cpus", "?")} usable)'),
            ("ISA", ", ".join(cpu.get("isa_flags", [])[:12])), ("RAM", f'{stable.get("memory_gib", "?")} GiB'),
            ("GPUs", "; ".join(f'{g.get("name")} (cc {g.get("compute_capability")}, {g.get("memory_mib")} MiB)'
                               for g in gpus) or "none"),
            ("GPU driver", json.dumps(stable.get("gpu_system") or {})),
            ("Software", f'{soft.get("os", "")} {soft.get("distro", "")}, Python {soft.get("python", "")}, torch '
                         f'{soft.get("torch", "")}, CUDA {soft.get("torch_cuda")}, cuDNN {soft.get("cudnn")}, '
                         f'{soft.get("torch_threads", "?")} torch threads'),
            ("Notes", "; ".join(f"{k}: {v}" for k, v in (fp.get("notes") or {}).items()) or "-"),
            ("Last git", f'{git.get("sha", "?")[:12]}{" (dirty)" if git.get("dirty") else ""} at '
                         f'{fp.get("collected_at", "?")}')]
    out = ['<table class="kv">'] + [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows] + ["</table>"]
    out.append("<details><summary>Full fingerprint (stable tier is hashed into the id; volatile is not)</summary>"
               f"<pre>{esc(json.dumps(fp, indent=1, sort_keys=True, default=str))}</pre></details>")
    if floors:
        out.append(f'<h4>A/A noise floor (measured {esc(floors.get("measured_at"))} over '
                   f'{len(floors.get("runs", []))} runs)</h4><table class="data"><tr><th>suite/case/metric</th>'
                   "<th>device/dtype</th><th>noise</th><th>plans</th></tr>")
        for f in floors.get("floors", []):
            noise = f["noise"]
            out.append(f'<tr><td>{esc(f["suite"])}/{esc(f["case"])}/{esc(f["metric"])}</td><td>{esc(f["device"])}/'
                       f'{esc(f["dtype"])}</td><td>{"inf" if math.isinf(noise) else f"{noise:.1%}"}</td>'
                       f'<td>{f["plans"]}</td></tr>')
        out.append("</table>")
    return "".join(out)


def heatmap_section(latest: pd.DataFrame) -> str:
    """Per combination: latency ratios, memory relative to the reference, worst accuracy figure."""
    plans = latest[latest["plan_id"] != ""]
    if plans.empty:
        return "<p>No per-combination results.</p>"
    cols: list[tuple[str, str, str, str]] = []  # (header, suite, case, metric)
    for case in LATENCY_CASES:
        if ((plans["suite"] == "latency") & (plans["case"] == case) & (plans["metric"] == "ratio_to_reference")).any():
            cols.append((f"{case} ×ref", "latency", case, "ratio_to_reference"))
    other = plans[(plans["metric"] == "ratio_to_reference") & (plans["suite"] != "latency")]
    for suite_name, case in sorted(set(zip(other["suite"], other["case"], strict=True))):
        cols.append((f"{suite_name}:{case} ×ref", suite_name, case, "ratio_to_reference"))
    mem_cols = [m for m in MEMORY_METRICS if ((plans["suite"] == m[0]) & (plans["case"] == m[1]) &
                                              (plans["metric"] == m[2])).any()]
    out = ['<div class="scroll"><table class="heat"><tr><th>preset, device/dtype</th><th>combination</th>']
    out += [f"<th>{esc(h)}</th>" for h, *_ in cols]
    out += [f"<th>{esc(m[1])} {esc(m[2])} ×ref</th>" for m in mem_cols]
    out += ["<th>worst error (accuracy)</th><th>checks</th></tr>"]
    shown = 0
    for (preset, device, dtype), g in plans.groupby(["preset", "device", "dtype"], sort=True):
        reference = g[g["plan_short"] == "reference"]
        ref_mem = {m: reference[(reference["case"] == m[1]) & (reference["metric"] == m[2])]["value"] for m in mem_cols}
        for _, p in g.groupby("plan_id", sort=False):
            if shown >= MAX_ROWS:
                break
            shown += 1
            cells = [f"<td>{esc(preset)}, {esc(device)}/{esc(dtype)}</td>"
                     f"<td class='plan'>{esc(_label(p['plan_short'].iloc[0]))}</td>"]
            for _, suite_name, case, metric in cols:
                v = p[(p["suite"] == suite_name) & (p["case"] == case) & (p["metric"] == metric)]["value"]
                r = _num(v.iloc[0]) if len(v) else None
                if p["plan_short"].iloc[0] == "reference":
                    r = 1.0
                cells.append(f'<td style="background:{ratio_colour(r)}">{fmt(r)}</td>')
            for m in mem_cols:
                v = p[(p["suite"] == m[0]) & (p["case"] == m[1]) & (p["metric"] == m[2])]["value"]
                base = ref_mem[m]
                r = None
                if len(v) and len(base) and _num(base.iloc[0]):
                    r = _num(v.iloc[0]) / float(base.iloc[0]) if _num(v.iloc[0]) is not None else None
                title = fmt(v.iloc[0], "B") if len(v) else "-"
                cells.append(f'<td style="background:{ratio_colour(r)}" title="{esc(title)}">{fmt(r)}</td>')
            acc = p[(p["suite"] == "accuracy") & (p["metric"] == "logits_rel") & p["value"].notna()]
            if len(acc):
                worst = acc.loc[acc["value"].idxmax()]
                cells.append(f'<td style="background:{error_colour(_num(worst["value"]), _num(worst["bound"]))}" '
                             f'title="{esc(worst["case"])} bound {esc(fmt(worst["bound"]))}">'
                             f'{fmt(worst["value"])}</td>')
            else:
                cells.append("<td>-</td>")
            failed = int((p["status"] == "failed").sum())
            ok = int((p["status"] == "ok").sum())
            cells.append(f'<td class="{"bad" if failed else "good"}">{failed} failed / {ok} ok</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    if len(plans["plan_id"].unique()) > shown:
        out.append(f"<p>{len(plans['plan_id'].unique()) - shown} more combination(s) not shown.</p>")
    out.append('<p class="hint">Green: faster or smaller than the reference plan, red: slower or larger (×ref, '
               "latest run per combination; latency ratios are measured interleaved in one process). Accuracy: the "
               "worst logits_rel against the reference, red when beyond its declared budget.</p>")
    return "".join(out)


def trends_section(frame: pd.DataFrame) -> str:
    runs = _runs(frame)
    if len(runs) < 1:
        return ""
    position = {r: i for i, r in enumerate(runs["run_id"])}
    labels = [f"{(s or '?')[:7]}{'*' if d else ''}" for s, d in zip(runs["git_sha"], runs["dirty"], strict=True)]
    charts = []
    lat = frame[(frame["suite"] == "latency") & (frame["status"] == "ok")]
    for (preset, device, dtype), g in lat.groupby(["preset", "device", "dtype"], sort=True):
        for case in LATENCY_CASES:
            rows = g[(g["case"] == case) & (g["metric"] == "ratio_to_reference")]
            if rows.empty:
                continue
            series: dict[str, list[tuple[int, float, str]]] = {}
            for _, r in rows.iterrows():
                when = pd.Timestamp(r["timestamp"]).strftime("%Y-%m-%d %H:%M")
                series.setdefault(_label(r["plan_short"]), []).append(
                    (position[r["run_id"]], float(r["value"]), f'x{r["value"]:.3f} in run {r["run_id"]} ({when}, '
                                                              f'{(r["git_sha"] or "?")[:10]})'))
            moved = sorted(series, key=lambda k: -(max(v for _, v, _ in series[k]) - min(v for _, v, _ in series[k])))
            series = {k: series[k] for k in sorted(moved[:MAX_LINES])}
            where = f"{preset}, {device}/{dtype}"
            charts.append(line_chart(f"{case}: ratio to the reference plan ({where})", labels, series,
                                     "× reference (lower is faster)", reference_line=1.0))
            ref = g[(g["case"] == case) & (g["metric"] == "time") & (g["plan_short"] == "reference")]
            if len(ref):
                pts = [(position[r["run_id"]], float(r["value"]) * 1e3, f'{r["value"] * 1e3:.3g} ms in {r["run_id"]}')
                       for _, r in ref.iterrows()]
                charts.append(line_chart(f"{case}: reference plan, absolute median ({where})", labels,
                                         {"reference": pts}, "ms (moves between processes)"))
    if not charts:
        return "<p>No latency ratios stored yet.</p>"
    return ('<p class="hint">x: runs in time order, labelled by commit (* = uncommitted changes). Hover a point for '
            'its run; click a legend entry to highlight its line.</p><div class="charts">' + "".join(charts) + "</div>")


def pareto_section(latest: pd.DataFrame) -> str:
    plans = latest[(latest["plan_id"] != "")]
    out = []
    for (preset, device, dtype), g in plans.groupby(["preset", "device", "dtype"], sort=True):
        reference = g[g["plan_short"] == "reference"]
        mem_metric = next((m for m in MEMORY_METRICS if ((g["case"] == m[1]) & (g["metric"] == m[2])).any()), None)
        points = []
        for _, p in g.groupby("plan_id"):
            lat = p[(p["suite"] == "latency") & (p["metric"] == "ratio_to_reference")
                    & p["case"].isin(["decode_per_token", "generate"])].sort_values("case")
            x = 1.0 if p["plan_short"].iloc[0] == "reference" else (_num(lat["value"].iloc[0]) if len(lat) else None)
            y = None
            if mem_metric is not None:
                mine = p[(p["case"] == mem_metric[1]) & (p["metric"] == mem_metric[2])]["value"]
                base = reference[(reference["case"] == mem_metric[1]) & (reference["metric"] == mem_metric[2])]["value"]
                if len(mine) and len(base) and _num(base.iloc[0]):
                    y = _num(float(mine.iloc[0]) / float(base.iloc[0]))
            acc = p[(p["suite"] == "accuracy") & (p["metric"] == "logits_rel")]["value"].dropna()
            error = 0.0 if p["plan_short"].iloc[0] == "reference" else (float(acc.max()) if len(acc) else None)
            if x is not None and y is not None and x > 0 and y > 0:
                points.append({"x": x, "y": y, "error": error, "label": _label(p["plan_short"].iloc[0])})
        if len(points) < 2:
            continue
        flags = pareto_front([(p["x"], p["y"], p["error"] if p["error"] is not None else math.inf) for p in points])
        for p, f in zip(points, flags, strict=True):
            p["pareto"] = f
        mem_name = f"{mem_metric[1]} {mem_metric[2]}" if mem_metric else "memory"
        out.append(scatter(f"Latency / memory / error ({preset}, {device}/{dtype})", points,
                           "decode time × reference (log)", f"{mem_name} × reference (log)"))
        front = sorted((p for p in points if p["pareto"]), key=lambda p: p["x"])
        out.append('<table class="data"><tr><th>on the Pareto front</th><th>latency ×ref</th><th>memory ×ref</th>'
                   "<th>logits_rel</th></tr>" + "".join(
                       f'<tr><td class="plan">{esc(p["label"])}</td><td>{fmt(p["x"])}</td><td>{fmt(p["y"])}</td>'
                       f'<td>{fmt(p["error"])}</td></tr>' for p in front) + "</table>")
    if not out:
        return "<p>Needs latency and memory results of two combinations or more.</p>"
    return ('<p class="hint">Each point is a combination (latest run). Ringed points are on the Pareto front: no other '
            "combination is at least as fast, as small and as accurate. Colour: worst logits_rel against the "
            "reference (grey: not measured).</p>" + "".join(out))


def selftest_section(frame: pd.DataFrame) -> str:
    rows = frame[frame["suite"] == "selftest"]
    if rows.empty:
        return "<p>No self-test stored yet (<code>python -m harness selftest</code>).</p>"
    scores = rows[(rows["case"] == "score") & (rows["metric"] == "caught_share")].sort_values("timestamp")
    out = []
    if len(scores):
        last = scores.iloc[-1]
        params = json.loads(last["params"] or "{}")
        out.append(f'<p class="score {"good" if last["value"] == 1 else "bad"}">Self-test: {params.get("caught", "?")} '
                   f'of {params.get("faults", "?")} planted faults caught ({last["value"]:.0%}), run '
                   f'{esc(last["run_id"])}</p>')
        if len(scores) > 1:
            pts = [(i, float(v) * 100, f"{v:.0%} in {r}") for i, (v, r) in enumerate(zip(scores["value"],
                                                                                        scores["run_id"], strict=True))]
            out.append(line_chart("Self-test score over runs", [str(r)[:15] for r in scores["run_id"]],
                                  {"caught %": pts}, "% caught"))
        latest_run = last["run_id"]
        faults = rows[(rows["run_id"] == latest_run) & (rows["case"] != "score")]
        out.append('<table class="data"><tr><th>fault</th><th>caught</th><th>file</th><th>how</th><th>s</th></tr>')
        for _, r in faults.sort_values(["value", "case"]).iterrows():
            p = json.loads(r["params"] or "{}")
            out.append(f'<tr><td title="{esc(p.get("why"))}">{esc(r["case"])}</td><td class="'
                       f'{"good" if r["value"] == 1 else "bad"}">{"yes" if r["value"] == 1 else "SLIPPED"}</td>'
                       f'<td>{esc(p.get("path"))}</td><td>{esc(p.get("how"))}</td><td>{esc(p.get("seconds"))}</td>'
                       "</tr>")
        out.append("</table>")
    return "".join(out)


def gate_section(report: dict | None) -> str:
    if not report:
        return "<p>No gate report stored yet (<code>python -m harness gate</code> keeps its last one).</p>"
    code = report.get("exit_code")
    cls = {0: "good", 1: "bad"}.get(code, "warn")
    counts = ", ".join(f"{n} {esc(k)}" for k, n in (report.get("counts") or {}).items())
    out = [f'<p class="score {cls}">Exit {esc(code)} ({counts}) at {esc(report.get("created_at"))}</p>',
           f'<p>baseline: {esc(report.get("baseline"))}<br>candidate: {esc(report.get("candidate"))}</p>']
    for sentence in report.get("attributions", []):
        out.append(f'<p class="attr">{esc(sentence)}</p>')
    comps = [c for c in report.get("comparisons", []) if c.get("verdict") not in ("ungated",)]
    if comps:
        out.append('<div class="scroll"><table class="data"><tr><th>verdict</th><th>case</th><th>plan</th>'
                   "<th>baseline</th><th>candidate</th><th>change</th><th>p</th><th>note</th></tr>")
        for c in comps[:200]:
            change = _num(c.get("change"))
            out.append(f'<tr><td class="{"bad" if c["verdict"] in ("regressed", "newly failing") else ""}">'
                       f'{esc(c["verdict"])}</td><td>{esc(c["suite"])}/{esc(c["case"])}/{esc(c["metric"])}</td>'
                       f'<td class="plan">{esc(c.get("plan_short"))}</td><td>{fmt(c.get("baseline"), c.get("unit"))}'
                       f'</td><td>{fmt(c.get("candidate"), c.get("unit"))}</td><td>'
                       f'{"-" if change is None else f"{change:+.1%}"}</td><td>{fmt(c.get("p_value"))}</td>'
                       f'<td>{esc(c.get("note"))}</td></tr>')
        out.append("</table></div>")
    for n in report.get("not_comparable", []):
        out.append(f'<p class="hint">not comparable: {esc(n.get("what"))}: {esc(n.get("reason"))}</p>')
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# The page


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:12px 20px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cfd8dc}main{padding:12px 20px}
nav button{margin:0 6px 6px 0;padding:6px 10px;border:1px solid #90a4ae;background:#fff;border-radius:4px;
cursor:pointer}
nav button.active{background:#37474f;color:#fff}
section.fp{display:none}section.fp.active{display:block}
h2{border-bottom:2px solid #cfd8dc;padding-bottom:4px}h3{margin-top:24px}
table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 6px;font-size:12px;vertical-align:top}
th{background:#eceff1;text-align:left}table.heat td{text-align:right;font-variant-numeric:tabular-nums}
td.plan{text-align:left;font-family:ui-monospace,monospace;font-size:11px;max-width:420px;word-break:break-all}
table.kv th{width:120px}.scroll{overflow-x:auto;max-width:100%}
.good{color:#1b5e20}.bad{color:#b71c1c;font-weight:bold}.warn{color:#e65100}
.score{font-size:16px;font-weight:bold}.hint{color:#607d8b;font-size:12px}.attr{font-weight:bold;color:#b71c1c}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;background:#fff;border:1px solid #e0e0e0;padding:4px}
svg.plot text{font-size:10px;fill:#333}svg.plot text.title{font-size:12px;font-weight:bold}
svg.plot .grid{stroke:#eee}svg.plot .refline{stroke:#888;stroke-dasharray:4 3}
svg.plot circle:hover{r:5}.legend{font-size:11px;max-width:620px}
.key{display:inline-block;margin-right:8px;cursor:pointer}
.key i{display:inline-block;width:10px;height:10px;margin-right:3px;vertical-align:middle}
.dim{opacity:.12}pre{max-height:300px;overflow:auto;background:#fff;border:1px solid #ddd;padding:6px;font-size:11px}
"""

JS = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message));
    document.body.dataset.errors = errors.join(' | ');
  });
  function show(id) {
    document.querySelectorAll('section.fp').forEach(function (s) { s.classList.toggle('active', s.id === id); });
    document.querySelectorAll('nav button').forEach(function (b) {
      b.classList.toggle('active', b.dataset.target === id);
    });
  }
  document.querySelectorAll('nav button').forEach(function (b) {
    b.addEventListener('click', function () { show(b.dataset.target); });
  });
  document.querySelectorAll('.key').forEach(function (k) {
    k.addEventListener('click', function () {
      var fig = k.closest('figure'), name = k.dataset.series, on = !k.classList.contains('picked');
      fig.querySelectorAll('.key').forEach(function (o) { o.classList.remove('picked'); });
      fig.querySelectorAll('g.series').forEach(function (g) {
        g.classList.toggle('dim', on && g.dataset.series !== name);
      });
      if (on) { k.classList.add('picked'); }
    });
  });
  var first = document.querySelector('nav button');
  if (first) { show(first.dataset.target); }
  document.body.dataset.plots = String(document.querySelectorAll('svg.plot').length);
  document.body.dataset.ready = 'yes';
})();
"""


def build(results_dir: str | Path, gate_report: str | Path | None = None) -> str:
    """The whole page as one HTML string."""
    results_dir = Path(results_dir)
    frame, fingerprints, floors, load_warnings = load_store(results_dir)
    report = None
    gate_path = Path(gate_report) if gate_report else results_dir / "gate" / "last.json"
    if gate_path.exists():
        try:
            report = json.loads(gate_path.read_text())
        except (OSError, ValueError):
            load_warnings.append(f"unreadable gate report {gate_path}")
    # The machine with the most runs first (the one the page opens on).
    fps = list(frame.groupby("fingerprint_id")["run_id"].nunique().sort_values(ascending=False, kind="stable").index) \
        if len(frame) else []
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs = frame["run_id"].nunique() if len(frame) else 0
    combos = frame.loc[frame["plan_id"] != "", "plan_id"].nunique() if len(frame) else 0
    nav, sections = [], []
    for i, fp in enumerate(fps):
        mine = frame[frame["fingerprint_id"] == fp]
        info = fingerprints.get(fp) or {}
        cpu = info.get("stable", {}).get("cpu", {}).get("model", "")
        gpus = info.get("stable", {}).get("gpus") or []
        name = f"{fp[:8]} {cpu}{' + ' + gpus[0].get('name', '') if gpus else ''}"
        nav.append(f'<button data-target="fp{i}">{esc(name)}</button>')
        latest = _latest(mine[mine["status"] != "skipped"])
        sections.append(
            f'<section class="fp" id="fp{i}"><h2>Fingerprint {esc(fp)}</h2>'
            f'<p>{mine["run_id"].nunique()} run(s), {mine.loc[mine["plan_id"] != "", "plan_id"].nunique()} '
            f"combination(s), {len(mine)} row(s).</p>"
            f"<h3>Machine</h3>{fingerprint_section(info, floors.get(fp))}"
            f"<h3>Each combination against the reference plan (latest run)</h3>{heatmap_section(latest)}"
            f"<h3>Trends over runs</h3>{trends_section(mine)}"
            f"<h3>Latency / memory / error</h3>{pareto_section(latest)}"
            f"<h3>Self-test</h3>{selftest_section(mine)}</section>")
    warn = "".join(f'<p class="warn">{esc(w)}</p>' for w in load_warnings)
    body = (f"<header><h1>qwen3-vl-lite harness dashboard</h1><p>{runs} run(s), {len(fps)} fingerprint(s), "
            f"{combos} combination(s); built {esc(now)} from {esc(results_dir)}</p></header><main>{warn}"
            f"<h2>Gate: last report</h2>{gate_section(report)}"
            f"<h2>Results per machine</h2><nav>{''.join(nav) or '<p>No results stored yet.</p>'}</nav>"
            f"{''.join(sections)}</main>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>harness dashboard</title>'
            f"<style>{CSS}</style></head><body>{body}<script>{JS}</script></body></html>\n")


def main(results_dir: str, out: str, gate_report: str | None = None) -> Path:
    if not Path(results_dir).is_dir():
        raise FileNotFoundError(f"no results folder at '{results_dir}'")
    page = build(results_dir, gate_report)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "index.html"
    results.atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    path.chmod(0o644)  # a page to share, not a private temp file
    return path
