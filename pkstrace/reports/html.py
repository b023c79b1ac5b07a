"""The HTML dashboard: Findings -> one self-contained interactive page.

Reports never re-analyse events: every number and figure below comes from a
:class:`~pkstrace.analysis.findings.Findings` object (tables are only
aggregated further, e.g. per-call latencies into histogram bins, so that a
10 M-event trace still gives a small page).

Safety: every string that came from a trace (task names, symbols, host names)
is either HTML-escaped into the page, or put into the figures' JSON, which sits
in a ``<script type="application/json">`` element with every ``<`` written as
``\\u003c`` and is read back with ``textContent``; strings inside that JSON that
plotly shows (axis categories, hover text, legend names) are HTML-escaped too,
because plotly renders a subset of HTML in them.

The page's template, CSS and JavaScript live in ``dashboards/``; plotly.js is
embedded once, from the plotly Python package's bundled ``plotly.min.js``.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import Findings, jsonable
from pkstrace.errors import PkstraceError

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
TEMPLATE = "report.html"

# Size limits: what keeps a 10 M-event report small and quick to open.
MAX_TABLE_ROWS = 300  # rows written per HTML table (the export has them all)
MAX_POINTS = 4000  # points per scatter figure (episodes, violations)
MAX_HEATMAP_CELLS = 120_000  # cpus x time bins per heatmap
MAX_GROUPS = 12  # lines per latency figure (the busiest groups; the rest pooled)
HIST_BINS = 60  # log-spaced latency histogram bins
CDF_POINTS = 120  # quantiles drawn per CDF line

# A fixed, colour-blind-safe palette (Okabe-Ito), so that A and B keep colours.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9",
           "#F0E442", "#000000", "#999999", "#882255", "#44AA99", "#117733"]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]

SERIES_TITLES = {
    "msr_write": "MSR writes",
    "csd_in": "cross-CPU calls arriving",
    "csd_out": "cross-CPU calls sent",
    "csd_queue_in": "cross-CPU calls arriving",
    "csd_queue_out": "cross-CPU calls sent",
    "csd_entry": "cross-CPU call handlers run",
    "ipi_in": "IPIs arriving",
    "ipi_out": "IPIs sent",
    "write_pkrs": "write_pkrs() calls",
    "pkrs_write": "PKRS (0x6e1) MSR writes",
}
# Heatmaps drawn first when present (the issue asks for these two), then the rest.
SERIES_ORDER = ["msr_write", "pkrs_write", "csd_in", "csd_queue_in", "csd_entry", "ipi_in",
                "write_pkrs", "csd_out", "csd_queue_out", "ipi_out"]


class ReportError(PkstraceError):
    """The report cannot be produced (message is one line)."""


# ---------------------------------------------------------------------------
# Small formatting helpers
# ---------------------------------------------------------------------------

def esc(value: Any) -> str:
    """Escape for HTML text and attribute values (and for plotly's pseudo-HTML)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_ns(ns: Any) -> str:
    """A duration for people: 850 ns, 52.1 us, 3.10 ms, 2.00 s."""
    v = _num(ns)
    if v is None:
        return "–"
    a = abs(v)
    if a < 1e3:
        return f"{v:.0f} ns"
    if a < 1e6:
        return f"{v / 1e3:.3g} µs"
    if a < 1e9:
        return f"{v / 1e6:.3g} ms"
    return f"{v / 1e9:.3g} s"


def fmt_int(n: Any) -> str:
    v = _num(n)
    return "–" if v is None else f"{int(round(v)):,}"


def _num(v: Any) -> float | None:
    if v is None or v is pd.NA or isinstance(v, (str, bytes)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def _display(v: Any) -> str:
    """A table cell's text."""
    if v is None or v is pd.NA:
        return ""
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = list(v)
        if vals and all(isinstance(x, (int, np.integer)) for x in vals):
            return schema.format_cpulist([int(x) for x in vals]) if len(vals) > 8 else \
                ",".join(str(int(x)) for x in vals)
        return ",".join(str(x) for x in vals)
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return ""
        return f"{int(f):,}" if f.is_integer() and abs(f) < 1e15 else f"{f:.4g}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v)


def script_json(obj: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no '<' at all."""
    text = json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    if name in df.columns:
        return df[name]
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _numeric(s: pd.Series) -> np.ndarray:
    return pd.Series(pd.to_numeric(s, errors="coerce")).to_numpy(dtype=float, na_value=np.nan)


def _flags(s: pd.Series) -> np.ndarray:
    """A yes/no column as 1.0 / 0.0 / NaN (unknown: None, NA, -1, text)."""
    v = _numeric(s)
    return np.where((v == 0) | (v == 1), v, np.nan)


def _msr_label(msr: Any) -> str:
    v = _num(msr)
    if v is None or v < 0:
        return ""
    return f"{schema.msr_name(int(v))} ({int(v):#x})"


def _hex_value(v: Any) -> str:
    n = _num(v)
    if n is None or n < 0:
        return "" if n is None else str(v)
    try:
        return f"{int(v):#x}"
    except (TypeError, ValueError):
        return str(v)


# ---------------------------------------------------------------------------
# Page building blocks
# ---------------------------------------------------------------------------

@dataclass
class Page:
    """Collects figures (as plotly JSON specs) while sections write their HTML."""

    figures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def figure(self, data: list[dict[str, Any]], layout: dict[str, Any], height: int = 360,
               label: str = "") -> str:
        fig_id = f"fig-{len(self.figures)}"
        layout = {"height": height, **layout}
        self.figures[fig_id] = {"data": data, "layout": layout}
        aria = f' aria-label="{esc(label)}"' if label else ""
        return f'<div class="plot" id="{fig_id}" data-fig="{fig_id}" role="img"{aria}></div>'


@dataclass
class Column:
    """A table column: header, how to get the cell's text, and its sort value."""

    title: str
    key: str
    fmt: Callable[[Any], str] = _display
    numeric: bool = False
    help: str = ""


def table(df: pd.DataFrame, columns: list[Column], caption: str = "",
          sort_by: str | list[str] | None = None, ascending: bool = False,
          max_rows: int = MAX_TABLE_ROWS, table_id: str = "") -> str:
    """A sortable, keyboard-usable table; trace strings escaped; long tables capped."""
    total = len(df)
    if total == 0:
        return f'<p class="empty">{esc(caption) + ": " if caption else ""}none.</p>'
    keys = [sort_by] if isinstance(sort_by, str) else list(sort_by or [])
    keys = [k for k in keys if k in df.columns]
    if keys:
        # Stable sorts from the last key to the first: ties keep the next key's order.
        order = np.arange(total)
        for k in reversed(keys):
            v = _numeric(df[k].iloc[order])
            v = np.where(np.isfinite(v), v, -np.inf if not ascending else np.inf)
            step = np.argsort(v if ascending else -v, kind="stable")
            order = order[step]
        df = df.iloc[order]
        sort_by = keys[0]
    shown = df.iloc[:max_rows]
    head = []
    for c in columns:
        title = f' title="{esc(c.help)}"' if c.help else ""
        cls = ' class="num"' if c.numeric else ""
        head.append(f'<th scope="col" tabindex="0" aria-sort="none"{cls}{title}>'
                    f'{esc(c.title)}</th>')
    rows = []
    cols_data = []
    for c in columns:
        vals = shown[c.key].tolist() if c.key in shown.columns else [None] * len(shown)
        cols_data.append(vals)
    for i in range(len(shown)):
        cells = []
        for c, vals in zip(columns, cols_data, strict=True):
            v = vals[i]
            text = esc(c.fmt(v))
            if c.numeric:
                n = _num(v)
                sv = "" if n is None else repr(n)
                cells.append(f'<td class="num" data-v="{sv}">{text}</td>')
            else:
                cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ""
    if total > len(shown):
        order_text = ""
        if sort_by:
            title = next((c.title for c in columns if c.key == sort_by), sort_by)
            words = ("earliest", "latest") if title in ("time", "start") else \
                ("smallest", "largest")
            order_text = f" ({words[0] if ascending else words[1]} {esc(title)} first)"
        note = (f'<p class="note">Showing {len(shown):,} of {total:,} rows{order_text}; '
                "all rows: <code>pkstrace export TRACE --format csv -o DIR</code>.</p>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<div class="table-wrap"><table class="sortable"{tid}>{cap}<thead><tr>'
            + "".join(head) + "</tr></thead><tbody>" + "".join(rows)
            + f"</tbody></table></div>{note}")


def section(sec_id: str, title: str, question: str, body: str) -> str:
    return (f'<section id="{sec_id}" aria-labelledby="{sec_id}-h">'
            f'<h2 id="{sec_id}-h">{esc(title)}</h2>'
            f'<p class="question">{esc(question)}</p>{body}</section>')


def _runs_grid(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return '<div class="runs">' + "".join(f'<div class="run">{p}</div>' for p in parts) + "</div>"


def _run_heading(label: str, n_runs: int) -> str:
    return f'<h3 class="run-label">{esc(label)}</h3>' if n_runs > 1 else ""


# ---------------------------------------------------------------------------
# Numbers read from Findings (the same ones the summary, diff and views show)
# ---------------------------------------------------------------------------

def _window_ns(f: Findings) -> tuple[int | None, int | None]:
    """The recording window; else the first and last event (analysis' trace summary)."""
    w = f.trace.get("window") or {}
    start, end = _int_or_none(w.get("start_ns")), _int_or_none(w.get("end_ns"))
    if start is None or end is None:
        start, end = _int_or_none(f.trace.get("first_ns")), _int_or_none(f.trace.get("last_ns"))
    return start, end


def _int_or_none(v: Any) -> int | None:
    n = _num(v)
    return None if n is None else int(n)


def _origin_ns(f: Findings) -> int:
    """Time zero of the figures: the window start, else the earliest time in the tables."""
    start, _ = _window_ns(f)
    if start is not None:
        return start
    candidates = []
    for df, col in ((f.activity, "bin_start_ns"), (f.calls, "queue_ns"),
                    (f.episodes, "start_ns"), (f.violations, "time_ns")):
        if len(df) and col in df.columns:
            v = _numeric(df[col])
            v = v[np.isfinite(v) & (v >= 0)]
            if len(v):
                candidates.append(v.min())
    return int(min(candidates)) if candidates else 0


# The call columns the report draws (copying only these keeps 10 M-event reports quick).
CALL_VIEW_COLUMNS = ("latency_ns", "target_cpu", "func", "target_idle")


def _remote_calls(f: Findings) -> pd.DataFrame:
    """Remote calls (not run on the caller's CPU), with the columns the views use."""
    calls = f.calls
    cols = [c for c in CALL_VIEW_COLUMNS if c in calls.columns]
    if len(calls) == 0:
        return calls[cols]
    return calls[cols][~(_flags(_col(calls, "local")) == 1)]


def _remote_count(f: Findings) -> int:
    if len(f.calls) == 0:
        return 0
    return int((~(_flags(_col(f.calls, "local")) == 1)).sum())


def _msr_writes(f: Findings, msr: int | None = None) -> int | None:
    c = f.counts
    if len(c) == 0:
        return 0
    mask = (c["kind"].astype(str) == schema.Kind.MSR_WRITE.value).to_numpy().copy()
    if msr is not None:
        mask &= (_numeric(c["msr"]) == msr)
    return int(np.nansum(_numeric(c["count"])[mask]))


def _events_total(f: Findings) -> int | None:
    for key in ("events", "n_events", "event_count"):
        if key in f.trace and _num(f.trace[key]) is not None:
            return int(f.trace[key])
    if len(f.counts):
        return int(np.nansum(_numeric(f.counts["count"])))
    return None


def _stall_quantile(f: Findings, q: float) -> float | None:
    if len(f.episodes) == 0:
        return 0.0  # no global update, so nobody stalled (what "3.1 ms -> 0" compares)
    v = _numeric(f.episodes["stall_ns"])
    v = v[np.isfinite(v)]
    return float(np.quantile(v, q)) if len(v) else None


def _tracer_mask(df: pd.DataFrame) -> np.ndarray:
    if len(df) == 0:
        return np.zeros(0, dtype=bool)
    return _flags(_col(df, "tracer_induced")) == 1


def _wp_totals(f: Findings) -> tuple[int, int, int]:
    wp = f.write_pkrs
    if len(wp) == 0:
        return 0, 0, 0
    return (int(np.nansum(_numeric(wp["calls"]))), int(np.nansum(_numeric(wp["cache_hits"]))),
            int(np.nansum(_numeric(wp["msr_writes"]))))


@dataclass
class Metric:
    name: str
    value: Callable[[Findings], float | None]
    kind: str = "count"  # "count" or "ns"
    better: str = "lower"  # which direction is an improvement


METRICS: list[Metric] = [
    Metric("events", _events_total, better="none"),
    Metric("remote cross-CPU calls",
           lambda f: _num(f.cross_cpu_summary.get("remote", _remote_count(f)))),
    Metric("local cross-CPU calls (run on the caller)",
           lambda f: _num(f.cross_cpu_summary.get("local")), better="none"),
    Metric("call latency p50", lambda f: _num(f.cross_cpu_summary.get("p50_ns")), "ns"),
    Metric("call latency p99", lambda f: _num(f.cross_cpu_summary.get("p99_ns")), "ns"),
    Metric("MSR writes", lambda f: _msr_writes(f)),
    Metric("PKRS (0x6e1) MSR writes", lambda f: _msr_writes(f, schema.MSR_PKRS)),
    Metric("redundant MSR writes", lambda f: f.redundant_total),
    Metric("write_pkrs() calls", lambda f: _wp_totals(f)[0], better="none"),
    Metric("write_pkrs() cache hits", lambda f: _wp_totals(f)[1], better="higher"),
    Metric("global-update episodes", lambda f: len(f.episodes), better="none"),
    Metric("global-update stall p50", lambda f: _stall_quantile(f, 0.5), "ns"),
    Metric("global-update stall p99", lambda f: _stall_quantile(f, 0.99), "ns"),
    Metric("global-update stall max", lambda f: _stall_quantile(f, 1.0), "ns"),
    Metric("isolation violations (workload)",
           lambda f: int((~_tracer_mask(f.violations)).sum())),
    Metric("isolation violations (tracer-induced)",
           lambda f: int(_tracer_mask(f.violations).sum()), better="none"),
    Metric("preempt-count drift episodes", lambda f: len(f.drift)),
    Metric("lost updates", lambda f: len(f.lost_updates)),
]


def _fmt_metric(v: float | None, kind: str) -> str:
    if v is None:
        return "–"
    return fmt_ns(v) if kind == "ns" else fmt_int(v)


def difference(a: float | None, b: float | None, kind: str) -> str:
    """'2,800 → 0 (−2,800, −100%)': the change from A to B stated in numbers."""
    if a is None and b is None:
        return "not measured in either"
    text = f"{_fmt_metric(a, kind)} → {_fmt_metric(b, kind)}"
    if a is None or b is None:
        return text
    d = b - a
    if d == 0:
        return text + " (same)"
    sign = "+" if d > 0 else "−"
    delta = fmt_ns(abs(d)) if kind == "ns" else fmt_int(abs(d))
    rel = f", {sign}{abs(d) / abs(a) * 100:.0f}%" if a else ""
    return f"{text} ({sign}{delta}{rel})"


# ---------------------------------------------------------------------------
# Summary and severity
# ---------------------------------------------------------------------------

@dataclass
class FindingRow:
    name: str
    severity: str  # "high", "medium", "info", "ok"
    count: int
    detail: str
    anchor: str


def finding_rows(f: Findings) -> list[FindingRow]:
    """Each finding with a severity: what a reviewer should look at first."""
    rows = []
    lost = len(f.lost_updates)
    rows.append(FindingRow("lost PKRS updates", "high" if lost else "ok", lost,
                           "a CPU's cached PKRS disagrees with its MSR after an update",
                           "lost"))
    drift = len(f.drift)
    rows.append(FindingRow("preempt-count drift", "high" if drift else "ok", drift,
                           "preempt depth falls call after call in one walk "
                           "(per_cpu_ptr() paired with put_cpu_ptr())", "drift"))
    tracer = _tracer_mask(f.violations)
    work = int((~tracer).sum())
    rows.append(FindingRow("isolation violations", "high" if work else "ok", work,
                           "cross-CPU calls that reached an isolated CPU "
                           f"(isolated: {schema.format_cpulist(f.isolated_cpus) or 'none'})",
                           "isolation"))
    rows.append(FindingRow("tracer-induced isolation violations",
                           "info" if tracer.sum() else "ok", int(tracer.sum()),
                           "caused by attaching the tracer (text patching), not by the workload",
                           "isolation"))
    red = int(f.redundant_total or 0)
    rows.append(FindingRow("redundant MSR writes", "medium" if red else "ok", red,
                           "writes of the value the MSR already held", "redundant"))
    n_ep = len(f.episodes)
    p99 = _stall_quantile(f, 0.99)
    rows.append(FindingRow("global-update stalls", "medium" if n_ep else "ok", n_ep,
                           f"episodes; p99 stall {fmt_ns(p99)}" if n_ep else
                           "no global-update episodes", "episodes"))
    remote = _num(f.cross_cpu_summary.get("remote"))
    if remote is None:
        remote = _remote_count(f)
    p99c = _num(f.cross_cpu_summary.get("p99_ns"))
    rows.append(FindingRow("remote cross-CPU calls", "info" if remote else "ok", int(remote),
                           f"p99 latency {fmt_ns(p99c)}" if remote else "none", "latency"))
    return rows


def _host_facts(f: Findings) -> list[tuple[str, str]]:
    t = f.trace
    host = t.get("host") or {}
    start, end = _window_ns(f)
    facts = [
        ("host", host.get("hostname", "")),
        ("kernel", host.get("kernel", "")),
        ("CPU", host.get("cpu_model", "")),
        ("online CPUs", schema.format_cpulist(host.get("online_cpus") or [])),
        ("isolated CPUs", schema.format_cpulist(f.isolated_cpus) or "none"),
        ("PKS", {True: "yes", False: "no"}.get(host.get("pks"), "unknown")),
        ("emulated", "yes (QEMU)" if host.get("emulated") else "no"),
        ("backend", t.get("backend", "")),
        ("clock", t.get("clock", "")),
        ("window", f"{fmt_ns(end - start)} ({start} → {end} ns)"
         if start is not None and end is not None else "unknown"),
        ("events", fmt_int(_events_total(f))),
        ("source", t.get("source", "")),
    ]
    lost = {k: int(v) for k, v in (t.get("lost_events") or {}).items() if _num(v)}
    if lost:
        total = sum(lost.values())
        facts.append(("lost events", f"{total:,} (by CPU: "
                      + ", ".join(f"{schema.lost_cpu_label(k)}: {v:,}"
                                  for k, v in lost.items()) + ")"))
    if t.get("partial"):
        facts.append(("partial", "yes: the recording ended early"))
    scen = t.get("scenario") or {}
    if scen:
        # Short facts only (name, design, cpus...); command lines and paths are in the
        # JSON report, not worth a screen here.
        short = [f"{k}={v}" for k, v in scen.items()
                 if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 80]
        facts.append(("scenario", ", ".join(short)))
    return [(k, str(v)) for k, v in facts if v not in ("", None)]


def summary_section(runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    for label, f in runs:
        facts = "".join(f"<tr><th scope=row>{esc(k)}</th><td>{esc(v)}</td></tr>"
                        for k, v in _host_facts(f))
        frows = finding_rows(f)
        fr = "".join(
            f'<tr class="sev-{r.severity}"><td><a href="#{r.anchor}">{esc(r.name)}</a></td>'
            f'<td><span class="sev sev-{r.severity}">{esc(r.severity)}</span></td>'
            f'<td class="num" data-v="{r.count}">{r.count:,}</td><td>{esc(r.detail)}</td></tr>'
            for r in frows)
        probes = f.trace.get("probes") or []
        probe_html = ""
        if probes:
            items = "".join(
                f'<li class="{"ok" if p.get("attached") else "missing"}">'
                f'{esc(p.get("name"))}: {"attached" if p.get("attached") else "not attached"}'
                f'{" (" + esc(p.get("reason")) + ")" if p.get("reason") else ""}</li>'
                for p in probes)
            probe_html = f"<details><summary>probes ({len(probes)})</summary><ul>{items}</ul>" \
                         "</details>"
        notes = list(f.notes) + [str(n) for n in (f.trace.get("notes") or [])]
        notes_html = ("<ul class=notes>" + "".join(f"<li>{esc(n)}</li>" for n in notes)
                      + "</ul>") if notes else ""
        gt = f.ground_truth
        gt_html = ""
        if gt:
            gt_html = ("<details><summary>ground truth of the emulated host</summary><pre>"
                       + esc(json.dumps(jsonable(gt), indent=1, default=str)[:20000])
                       + "</pre></details>")
        parts.append(
            _run_heading(label, len(runs))
            + f'<table class="facts">{facts}</table>'
            + '<table class="sortable findings"><caption>findings</caption><thead><tr>'
            '<th scope="col" tabindex="0" aria-sort="none">finding</th>'
            '<th scope="col" tabindex="0" aria-sort="none">severity</th>'
            '<th scope="col" tabindex="0" aria-sort="none" class="num">count</th>'
            '<th scope="col" tabindex="0" aria-sort="none">what it means</th>'
            f"</tr></thead><tbody>{fr}</tbody></table>{probe_html}{gt_html}{notes_html}")
    return section("summary", "Summary", "What was traced, where, and what was found?",
                   _runs_grid(parts))


def comparison_section(runs: Sequence[tuple[str, Findings]]) -> str:
    (la, a), (lb, b) = runs[0], runs[1]
    rows = []
    for m in METRICS:
        va, vb = m.value(a), m.value(b)
        va = None if va is None else float(va)
        vb = None if vb is None else float(vb)
        change = ""
        if va is not None and vb is not None and va != vb and m.better != "none":
            improved = (vb < va) if m.better == "lower" else (vb > va)
            change = "better" if improved else "worse"
        rows.append({"metric": m.name, "a": va, "b": vb, "kind": m.kind,
                     "diff": difference(va, vb, m.kind), "change": change,
                     "delta": None if va is None or vb is None else vb - va})
    body = []
    for r in rows:
        cls = f' class="{r["change"]}"' if r["change"] else ""
        body.append(
            f"<tr{cls}><td>{esc(r['metric'])}</td>"
            f'<td class="num" data-v="{"" if r["a"] is None else r["a"]}">'
            f"{esc(_fmt_metric(r['a'], r['kind']))}</td>"
            f'<td class="num" data-v="{"" if r["b"] is None else r["b"]}">'
            f"{esc(_fmt_metric(r['b'], r['kind']))}</td>"
            f"<td>{esc(r['diff'])}</td><td>{esc(r['change'])}</td></tr>")
    headline = [r["metric"] + ": " + r["diff"] for r in rows
                if r["change"] and r["a"] != r["b"]]
    head = ("<ul class=headline>" + "".join(f"<li>{esc(h)}</li>" for h in headline)
            + "</ul>") if headline else "<p>No differences in the headline figures.</p>"
    tbl = ('<div class="table-wrap"><table class="sortable" id="diff-table">'
           "<caption>A → B, every figure</caption><thead><tr>"
           '<th scope="col" tabindex="0" aria-sort="none">figure</th>'
           f'<th scope="col" tabindex="0" aria-sort="none" class="num">A: {esc(la)}</th>'
           f'<th scope="col" tabindex="0" aria-sort="none" class="num">B: {esc(lb)}</th>'
           '<th scope="col" tabindex="0" aria-sort="none">difference</th>'
           '<th scope="col" tabindex="0" aria-sort="none">change</th>'
           "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")
    return section("compare", f"Comparison: {la} → {lb}",
                   "What changed between the two traces, in numbers?", head + tbl)


# ---------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------

def _cpu_axis_shapes(isolated: list[int]) -> list[dict[str, Any]]:
    return [{"type": "rect", "xref": "paper", "yref": "y", "x0": 0, "x1": 1,
             "y0": c - 0.5, "y1": c + 0.5, "line": {"color": "#D55E00", "width": 2},
             "fillcolor": "rgba(0,0,0,0)"} for c in isolated]


@dataclass
class _Activity:
    """One run's per-CPU activity, ready to bin: times relative to the run's start."""

    t: np.ndarray
    cpu_row: np.ndarray
    count: np.ndarray
    series: np.ndarray
    cpus: np.ndarray
    t_min: float
    t_end: float
    bin_ns: float


def _activity_points(f: Findings) -> _Activity | None:
    act = f.activity
    if len(act) == 0:
        return None
    t = _numeric(act["bin_start_ns"]) - _origin_ns(f)
    cpu = _numeric(act["cpu"])
    count = _numeric(act["count"])
    series = act["series"].astype(str).to_numpy()
    ok = np.isfinite(t) & np.isfinite(cpu) & np.isfinite(count)
    t, cpu, count, series = t[ok], cpu[ok].astype(int), count[ok], series[ok]
    if len(t) == 0:
        return None
    bin_ns = float(f.activity_bin_ns or 0)
    online = [int(c) for c in (f.trace.get("host") or {}).get("online_cpus") or []]
    if len(online) > 4096:  # a row per CPU: keep the heatmap to the CPUs seen
        online = []
    cpus = np.unique(np.concatenate([cpu, np.asarray(f.isolated_cpus, dtype=int),
                                     np.asarray(online, dtype=int)]))
    cpu_row = np.searchsorted(cpus, cpu)
    return _Activity(t=t, cpu_row=cpu_row, count=count, series=series, cpus=cpus,
                     t_min=min(0.0, float(t.min())), t_end=float(t.max()) + (bin_ns or 1.0),
                     bin_ns=bin_ns)


def _activity_width(a: _Activity) -> float:
    """Heatmap bin width: the analysis' bin, coarser where it would make too many cells."""
    n_src = int(np.ceil((a.t_end - a.t_min) / a.bin_ns)) if a.bin_ns > 0 else 400
    n_bins = max(1, min(n_src, 600, MAX_HEATMAP_CELLS // max(1, len(a.cpus))))
    return (a.t_end - a.t_min) / n_bins


def _cpu_ticks(cpus: list[int], isolated: list[int]) -> tuple[list[float], list[str]]:
    """Heatmap rows' labels. Up to 32 CPUs: each, isolated ones said so. More: a row is
    too thin for a label each, so about 8-16 evenly spaced CPUs, and one label per run
    of isolated CPUs ("CPU 62-63 (isolated)", up to 8 runs) with the labels that would
    overlap it left out."""
    if len(cpus) <= 32:
        return ([float(c) for c in cpus],
                [f"CPU {c} (isolated)" if c in isolated else f"CPU {c}" for c in cpus])
    iso = sorted(set(isolated) & set(cpus))
    runs_: list[list[int]] = []
    for c in iso:
        if runs_ and c == runs_[-1][-1] + 1:
            runs_[-1].append(c)
        else:
            runs_.append([c])
    if len(runs_) > 8:  # scattered isolated CPUs: the outlines and the note say which
        runs_ = []
    # Keep a label at least ~4 rows away from another (the heatmap is at most 700 px).
    gap = max(2, len(cpus) // 16)
    step = 8 * -(-len(cpus) // 128)
    marks = [((r[0] + r[-1]) / 2, f"CPU {schema.format_cpulist(r)} (isolated)") for r in runs_]
    for c in cpus:
        if c % step == 0 and all(abs(c - m) >= gap for m, _ in marks):
            marks.append((float(c), f"CPU {c}"))
    marks.sort()
    return [m for m, _ in marks], [t for _, t in marks]


def activity_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    points = [_activity_points(f) for _, f in runs]
    have = [a for a in points if a is not None]
    # Side by side, A and B share the bin width, the time axis and each colour scale:
    # otherwise a colour (events per bin) means different rates on the two sides.
    width = max((_activity_width(a) for a in have), default=1.0)
    x_range = [min((a.t_min for a in have), default=0.0) / 1e6,
               max((a.t_end for a in have), default=1.0) / 1e6]
    grids: list[dict[str, np.ndarray]] = []
    for a in points:
        g: dict[str, np.ndarray] = {}
        if a is not None:
            n_bins = max(1, int(np.ceil((a.t_end - a.t_min) / width - 1e-9)))
            col_of = np.clip(((a.t - a.t_min) / width).astype(int), 0, n_bins - 1)
            present = list(dict.fromkeys(a.series.tolist()))
            for s in [s for s in SERIES_ORDER if s in present] + \
                     [s for s in present if s not in SERIES_ORDER]:
                m = a.series == s
                z = np.zeros((len(a.cpus), n_bins))
                np.add.at(z, (a.cpu_row[m], col_of[m]), a.count[m])
                g[s] = z
        grids.append(g)
    zmax: dict[str, float] = {}
    for g in grids:
        for s, z in g.items():
            zmax[s] = max(zmax.get(s, 0.0), float(z.max()))
    parts = []
    for (label, f), a, g in zip(runs, points, grids, strict=True):
        out = [_run_heading(label, len(runs))]
        if a is None:
            out.append('<p class="empty">No per-CPU activity in the findings.</p>')
            parts.append("".join(out))
            continue
        cpus = a.cpus
        tickvals, ticktext = _cpu_ticks(cpus.tolist(), f.isolated_cpus)
        for s, z in g.items():
            n_bins = z.shape[1]
            x_ms = ((a.t_min + (np.arange(n_bins) + 0.5) * width) / 1e6).round(4)
            zs = np.where(z > 0, z, np.nan)
            trace: dict[str, Any] = {
                "type": "heatmap", "x": x_ms, "y": cpus, "z": zs,
                "colorscale": "Viridis", "reversescale": False, "hoverongaps": False,
                "colorbar": {"title": {"text": "events/bin"}},
                "hovertemplate": "CPU %{y}<br>t=%{x:.3f} ms<br>%{z} events<extra></extra>"}
            layout: dict[str, Any] = {
                "title": {"text": f"{esc(SERIES_TITLES.get(s, s))} per CPU over time "
                                  f"({int(z.sum()):,} in all; bin {fmt_ns(width)})"},
                "xaxis": {"title": {"text": "time since start (ms)"}},
                "yaxis": {"title": {"text": "CPU"}, "tickmode": "array",
                          "tickvals": tickvals, "ticktext": ticktext,
                          "autorange": "reversed"},
                "shapes": _cpu_axis_shapes(f.isolated_cpus)}
            if len(runs) > 1:
                trace.update(zmin=0, zmax=zmax[s] or 1)
                layout["xaxis"]["range"] = x_range
            out.append(page.figure(
                [trace], layout, height=max(260, min(700, 120 + 22 * len(cpus))),
                label=f"heatmap of {SERIES_TITLES.get(s, s)} per CPU over time"))
        if f.isolated_cpus:
            out.append(f'<p class="note">Isolated CPUs '
                       f'{esc(schema.format_cpulist(f.isolated_cpus))} are outlined in '
                       "orange.</p>")
        if len(runs) > 1:
            out.append('<p class="note">Both sides share the bin width, time axis and '
                       "colour scale of each heatmap.</p>")
        parts.append("".join(out))
    return section("activity", "Per-CPU activity over time",
                   "Which CPUs write MSRs and receive cross-CPU calls, and when? "
                   "Do isolated CPUs stay quiet?", _runs_grid(parts))


def redundant_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        by_task = f.redundant_by_task
        out.append(f"<p><strong>{int(f.redundant_total or 0):,}</strong> redundant MSR writes "
                   "(the MSR already held the value written).</p>")
        if len(by_task):
            df = by_task.copy()
            df["_red"] = _numeric(df["redundant"])
            df["_w"] = _numeric(df["writes"])
            top = df.sort_values(["_red", "_w"], ascending=False).head(20).iloc[::-1]
            names = [f"{esc(c) or '(no task)'} · {esc(cs) or '(no callsite)'} · {esc(m)}"
                     for c, cs, m in
                     zip(_col(top, "comm").astype(str), _col(top, "callsite").astype(str),
                         _col(top, "msr_name").astype(str), strict=True)]
            out.append(page.figure(
                [{"type": "bar", "orientation": "h", "y": names, "x": top["_red"].to_numpy(),
                  "name": "redundant", "marker": {"color": "#D55E00"},
                  "hovertemplate": "%{y}<br>%{x} redundant<extra></extra>"},
                 {"type": "bar", "orientation": "h", "y": names,
                  "x": (top["_w"] - top["_red"]).clip(lower=0).to_numpy(),
                  "name": "needed", "marker": {"color": "#0072B2"},
                  "hovertemplate": "%{y}<br>%{x} needed<extra></extra>"}],
                {"barmode": "stack", "title": {"text": "MSR writes by task · callsite · MSR "
                                                       "(top 20 by redundant)"},
                 "xaxis": {"title": {"text": "writes"}}, "yaxis": {"automargin": True},
                 "margin": {"l": 10}},
                height=max(260, 90 + 24 * len(top)), label="redundant MSR writes by task"))
        out.append(table(by_task, [
            Column("task", "comm"), Column("callsite", "callsite"),
            Column("MSR", "msr_name"), Column("writes", "writes", numeric=True),
            Column("redundant", "redundant", numeric=True)],
            caption="redundant writes by task and callsite", sort_by=["redundant", "writes"]))
        out.append(table(f.redundant_by_cpu_msr, [
            Column("CPU", "cpu", numeric=True), Column("MSR", "msr_name"),
            Column("writes", "writes", numeric=True),
            Column("redundant", "redundant", numeric=True)],
            caption="redundant writes by CPU and MSR", sort_by=["redundant", "writes"]))
        parts.append("".join(out))
    return section("redundant", "Redundant MSR writes",
                   "Which tasks and callsites write an MSR with the value it already holds?",
                   _runs_grid(parts))


def write_pkrs_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        wp = f.write_pkrs
        calls, hits, writes = _wp_totals(f)
        if len(wp) == 0:
            out.append('<p class="empty">No write_pkrs() calls traced (the kernel has no '
                       "write_pkrs, or it was not probed).</p>")
            parts.append("".join(out))
            continue
        rate = f"{hits / calls * 100:.1f}%" if calls else "–"
        out.append(f"<p><strong>{calls:,}</strong> write_pkrs() calls: "
                   f"<strong>{hits:,}</strong> cache hits ({rate}) and "
                   f"<strong>{writes:,}</strong> PKRS MSR writes.</p>")
        cpus = [f"CPU {int(c)}" for c in _numeric(wp["cpu"])]
        data = []
        for key, name, colour in (("calls", "write_pkrs() calls", "#0072B2"),
                                  ("cache_hits", "cache hits (no MSR write)", "#009E73"),
                                  ("msr_writes", "write_pkrs() MSR writes", "#D55E00"),
                                  ("pkrs_msr_writes", "all PKRS (0x6e1) MSR writes",
                                   "#999999")):
            if key not in wp.columns:
                continue
            data.append({"type": "bar", "x": cpus, "y": _numeric(wp[key]), "name": name,
                         "marker": {"color": colour}})
        out.append(page.figure(data, {"barmode": "group",
                                      "title": {"text": "write_pkrs() calls vs cache hits vs "
                                                        "MSR writes, per CPU"},
                                      "yaxis": {"title": {"text": "count"}}},
                               label="write_pkrs calls, cache hits and MSR writes per CPU"))
        out.append(table(wp, [Column("CPU", "cpu", numeric=True),
                              Column("calls", "calls", numeric=True),
                              Column("cache hits", "cache_hits", numeric=True),
                              Column("MSR writes", "msr_writes", numeric=True),
                              Column("all PKRS writes", "pkrs_msr_writes", numeric=True,
                                     help="every MSR 0x6e1 write on the CPU, any caller")],
                         caption="write_pkrs per CPU", sort_by="calls"))
        parts.append("".join(out))
    return section("write-pkrs", "write_pkrs(): calls, cache hits, MSR writes",
                   "How often does the per-CPU PKRS cache save an MSR write?", _runs_grid(parts))


def _log_bins(lat: np.ndarray) -> np.ndarray:
    lo = max(1.0, float(lat.min()))
    hi = max(lo * 1.0001, float(lat.max()))
    return np.logspace(math.log10(lo), math.log10(hi) + 1e-9, HIST_BINS + 1)


def _group_lines(lat_us: np.ndarray, keys: Any, name_of: Callable[[Any], str],
                 edges: np.ndarray, kind: str) -> list[dict[str, Any]]:
    """One histogram or CDF line per group (busiest MAX_GROUPS; the rest pooled).
    Groups by hashing (pd.factorize), not sorting: millions of calls stay quick."""
    codes, uniq = pd.factorize(keys if isinstance(keys, pd.Series) else np.asarray(keys),
                               sort=False)
    counts = np.bincount(codes[codes >= 0], minlength=len(uniq))
    order = np.argsort(-counts, kind="stable")
    keep = order[:MAX_GROUPS]
    groups: list[tuple[str, np.ndarray]] = [(name_of(uniq[c]), lat_us[codes == c])
                                            for c in keep]
    if len(uniq) > MAX_GROUPS:
        rest = ~np.isin(codes, keep)
        groups.append((f"other ({len(uniq) - MAX_GROUPS} more)", lat_us[rest]))
    lines = []
    for i, (name, v) in enumerate(groups):
        colour = PALETTE[i % len(PALETTE)]
        if kind == "hist":
            h, _ = np.histogram(v, bins=edges)
            centres = np.sqrt(edges[:-1] * edges[1:])
            lines.append({"type": "scatter", "mode": "lines", "fill": "tozeroy",
                          "opacity": 0.6, "line": {"shape": "hvh", "color": colour},
                          "x": centres.round(3), "y": h, "name": f"{name} (n={len(v):,})",
                          "hovertemplate": "%{x:.3g} µs: %{y} calls<extra>" + name
                          + "</extra>"})
        else:
            qs = np.linspace(0, 1, CDF_POINTS)
            x = np.quantile(v, qs)
            lines.append({"type": "scatter", "mode": "lines", "line": {"color": colour},
                          "x": x.round(3), "y": (qs * 100).round(2),
                          "name": f"{name} (n={len(v):,})",
                          "hovertemplate": "%{y:.1f}% ≤ %{x:.3g} µs<extra>" + name
                          + "</extra>"})
    return lines


def log_ticks_us(lo_us: float, hi_us: float) -> dict[str, Any]:
    """Tick values 1-2-5 per decade (1 per decade past 6 decades), labelled with units,
    for a log axis in microseconds: '50 µs', '1 ms' read better than plotly's '5', '2'."""
    lo = max(float(lo_us), 1e-3)
    hi = max(float(hi_us), lo * 1.01)
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    vals: list[float] = []
    # A narrow range (1.1-3.5 ms) leaves one 1-2-5 tick inside the plotted range: an
    # axis with one label cannot be read, so denser steps until there are three.
    for mults in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)):
        if len(mults) == 1 and e1 - e0 <= 6:
            continue
        vals = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults]
        vals = [v for v in vals if lo / 1.05 <= v <= hi * 1.05]
        if len(vals) >= 3:
            break
    if len(vals) < 2:
        vals = [lo, hi]
    return {"tickvals": [round(v, 6) for v in vals], "ticktext": [fmt_ns(v * 1e3) for v in vals]}


def _latency_range(runs: Sequence[tuple[str, Findings]]) -> tuple[float, float] | None:
    """One latency range (µs) for every run, so that A and B share their axes."""
    lo, hi = math.inf, -math.inf
    for _, f in runs:
        lat = _numeric(_col(_remote_calls(f), "latency_ns"))
        lat = lat[np.isfinite(lat) & (lat > 0)]
        if len(lat):
            lo, hi = min(lo, float(lat.min()) / 1e3), max(hi, float(lat.max()) / 1e3)
    return (lo, hi) if lo <= hi else None


def _idle_state(calls: pd.DataFrame) -> np.ndarray:
    """Per call: 0 target idle, 1 target busy, 2 unknown (integer codes, not strings:
    grouping millions of strings is slow)."""
    flag = _flags(_col(calls, "target_idle"))
    return np.where(flag == 1, 0, np.where(flag == 0, 1, 2))


def _idle_busy_text(calls: pd.DataFrame) -> str:
    """Idle vs busy in numbers (percentiles as the analysis takes them), and how it is known."""
    lat = _numeric(_col(calls, "latency_ns"))
    state = _idle_state(calls)
    parts = []
    for code, name in ((0, "idle"), (1, "busy"), (2, "state unknown")):
        v = lat[(state == code) & np.isfinite(lat)]
        if len(v):
            p50, p99 = (int(round(x)) for x in np.percentile(v, [50, 99]))
            parts.append(f"target {name}: <strong>{len(v):,}</strong> calls, p50 "
                         f"{esc(fmt_ns(p50))}, p99 {esc(fmt_ns(p99))}")
    return ('<p class="note">' + "; ".join(parts) + ". A target is idle when it ran the "
            "idle task (pid 0) when the call was queued: by its last sched_switch, or "
            "where the trace has none for that CPU before the call, by the task the "
            "handler interrupted.</p>")


def latency_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    rng = _latency_range(runs)
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        calls = _remote_calls(f)
        s = f.cross_cpu_summary
        out.append(
            f"<p><strong>{fmt_int(s.get('remote', len(calls)))}</strong> remote calls, "
            f"{fmt_int(s.get('local'))} local; latency p50 {fmt_ns(s.get('p50_ns'))}, "
            f"p90 {fmt_ns(s.get('p90_ns'))}, p99 {fmt_ns(s.get('p99_ns'))}, "
            f"max {fmt_ns(s.get('max_ns'))}; unmatched queue/entry: "
            f"{fmt_int(s.get('unmatched_queue'))}/{fmt_int(s.get('unmatched_entry'))}.</p>")
        lat = _numeric(_col(calls, "latency_ns"))
        ok = np.isfinite(lat) & (lat > 0)
        if ok.sum() == 0 or rng is None:
            out.append('<p class="empty">No remote cross-CPU calls with a latency.</p>')
        else:
            lat_us = lat[ok] / 1e3
            edges = _log_bins(np.array(rng))
            xaxis = {"type": "log", "title": {"text": "queue → handler entry (log)"},
                     "range": [math.log10(rng[0]) - 0.05, math.log10(rng[1]) + 0.05],
                     **log_ticks_us(*rng)}
            idle = _idle_state(calls)[ok]
            inames = ("target idle", "target busy", "target state unknown").__getitem__
            out.append(_idle_busy_text(calls))
            out.append(page.figure(
                _group_lines(lat_us, idle, inames, edges, "hist"),
                {"xaxis": xaxis, "title": {"text": "latency histogram: target CPU idle vs busy"},
                 "yaxis": {"title": {"text": "calls per bin"}},
                 # Also with one group: the legend says which state the calls were in.
                 "showlegend": True},
                label="latency histogram, target idle versus busy"))
            target = _numeric(_col(calls, "target_cpu"))[ok]
            iso = set(f.isolated_cpus)

            def tnames(c: float, iso: set[int] = iso) -> str:
                if not np.isfinite(c):
                    return "CPU unknown"
                return f"CPU {int(c)}" + (" (isolated)" if int(c) in iso else "")
            out.append(page.figure(
                _group_lines(lat_us, target, tnames, edges, "cdf"),
                {"xaxis": xaxis, "title": {"text": "latency CDF by target CPU"},
                 "yaxis": {"title": {"text": "% of calls"}, "range": [0, 100]}},
                label="latency CDF by target CPU"))
            funcs = _col(calls, "func")[ok]
            fnames = esc
            out.append(page.figure(
                _group_lines(lat_us, funcs, fnames, edges, "cdf"),
                {"xaxis": xaxis, "title": {"text": "latency CDF by function run on the target"},
                 "yaxis": {"title": {"text": "% of calls"}, "range": [0, 100]}},
                label="latency CDF by function"))
        lat_cols = [Column("calls", "count", numeric=True),
                    Column("p50", "p50_ns", fmt_ns, True), Column("p90", "p90_ns", fmt_ns, True),
                    Column("p99", "p99_ns", fmt_ns, True), Column("max", "max_ns", fmt_ns, True),
                    Column("mean", "mean_ns", fmt_ns, True)]
        out.append(table(f.latency_per_target_cpu,
                         [Column("target CPU", "target_cpu", numeric=True), *lat_cols],
                         caption="latency by target CPU", sort_by="p99_ns"))
        out.append(table(f.latency_per_func, [Column("function", "func"), *lat_cols],
                         caption="latency by function", sort_by="p99_ns"))
        out.append(table(f.latency_per_callsite, [Column("callsite", "callsite"), *lat_cols],
                         caption="latency by callsite", sort_by="p99_ns"))
        out.append(table(f.latency_per_source_target,
                         [Column("source CPU", "source_cpu", numeric=True),
                          Column("target CPU", "target_cpu", numeric=True), *lat_cols],
                         caption="latency by source → target", sort_by="p99_ns"))
        parts.append("".join(out))
    return section("latency", "Cross-CPU call latency",
                   "How long does a cross-CPU call wait before its handler runs, per target "
                   "CPU and per function, and does an idle target make it slower?",
                   _runs_grid(parts))


def _cap_points(df: pd.DataFrame, weight: str, what: str) -> tuple[pd.DataFrame, str]:
    """At most MAX_POINTS rows: the largest half by `weight` (called `what` on the page)
    plus an even sample of the rest."""
    if len(df) <= MAX_POINTS:
        return df, ""
    w = _numeric(df[weight])
    order = np.argsort(-np.nan_to_num(w, nan=-np.inf), kind="stable")
    half = MAX_POINTS // 2
    top = order[:half]
    rest = np.sort(order[half:])
    keep = np.sort(np.concatenate([top, rest[_even_sample(len(rest), MAX_POINTS - half)]]))
    note = (f"Showing {len(keep):,} of {len(df):,} points: the {half:,} with the largest "
            f"{what} and an even sample of the rest.")
    return df.iloc[keep], note


def _even_sample(n: int, k: int) -> np.ndarray:
    """Positions of at most k of n rows, evenly spread (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _stall_axis(runs: Sequence[tuple[str, Findings]]) -> dict[str, Any]:
    """Log stall axis (µs) over every run's episodes: side by side, A and B share it."""
    vals = [_numeric(f.episodes["stall_ns"]) / 1e3 for _, f in runs if len(f.episodes)]
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v):
        return {}
    lo, hi = float(v.min()), float(v.max())
    axis: dict[str, Any] = dict(log_ticks_us(lo, hi))
    if len(runs) > 1:
        axis["range"] = [math.log10(lo) - 0.08, math.log10(hi) + 0.08]
    return axis


def episodes_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    proj_data = []
    proj_tables: list[str] = []
    dash_of: dict[tuple[str, str], str] = {}
    stall_axis = _stall_axis(runs)
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        ep = f.episodes
        if len(ep) == 0:
            out.append('<p class="empty">No global-update episodes (no call walks that push '
                       "a value to several CPUs).</p>")
        else:
            origin = _origin_ns(f)
            shown, note = _cap_points(ep, "stall_ns", "stall")
            modes = _col(shown, "mode").astype(str).to_numpy()
            data = []
            for i, mode in enumerate(dict.fromkeys(modes.tolist())):
                m = modes == mode
                sub = shown[m]
                x = ((_numeric(sub["start_ns"]) - origin) / 1e6).round(4)
                y = (_numeric(sub["stall_ns"]) / 1e3).round(3)
                targets = _numeric(_col(sub, "targets"))
                custom = np.stack([
                    np.array([esc(v) for v in _col(sub, "comm").tolist()], dtype=object),
                    np.array([esc(v) for v in _col(sub, "func").tolist()], dtype=object),
                    np.array([esc(v) for v in _col(sub, "callsite").tolist()], dtype=object),
                    np.array([_display(v) for v in _col(sub, "targets").tolist()],
                             dtype=object),
                    np.array([esc(_display(v)) for v in _col(sub, "target_cpus").tolist()],
                             dtype=object),
                ], axis=1).tolist()
                size = np.clip(4 + 2 * np.sqrt(np.nan_to_num(targets, nan=1)), 5, 22)
                data.append({"type": "scatter", "mode": "markers", "x": x, "y": y,
                             "name": esc(mode), "customdata": custom,
                             "marker": {"color": PALETTE[i % len(PALETTE)], "size": size,
                                        "opacity": 0.8},
                             "hovertemplate": "t=%{x:.3f} ms<br>stall %{y:.3g} µs<br>"
                                              "%{customdata[0]}: %{customdata[1]}<br>"
                                              "from %{customdata[2]}<br>%{customdata[3]} "
                                              "targets: CPUs %{customdata[4]}<extra>"
                                              "%{fullData.name}</extra>"})
            out.append(page.figure(
                data, {"title": {"text": f"global-update episodes: stall over time "
                                         f"({len(ep):,} episodes; marker size = targets)"},
                       "xaxis": {"title": {"text": "time since start (ms)"}},
                       "yaxis": {"type": "log", "title": {"text": "caller stall (log)"},
                                 **stall_axis}},
                label="global update episodes timeline"))
            if note:
                out.append(f'<p class="note">{esc(note)}</p>')
            out.append(table(ep, [
                Column("#", "episode", numeric=True),
                Column("start", "start_ns", numeric=True,
                       fmt=lambda v, o=origin: fmt_ns(_num(v) - o if _num(v) is not None
                                                      else None)),
                Column("stall", "stall_ns", fmt_ns, True),
                Column("sum of call latencies", "latency_sum_ns", fmt_ns, True),
                Column("mode", "mode"), Column("targets", "targets", numeric=True),
                Column("target CPUs", "target_cpus"),
                Column("CPU", "source_cpu", numeric=True), Column("task", "comm"),
                Column("function", "func"), Column("callsite", "callsite")],
                caption="episodes (longest stall first)", sort_by="stall_ns"))
        pr = f.projection
        if len(pr):
            designs = _col(pr, "design").astype(str).to_numpy()
            sources = _col(pr, "source").astype(str).to_numpy()
            design_order = list(dict.fromkeys(designs.tolist()))
            # One line per (design, source): a trace-derived and a calibration-derived
            # projection of the same design are different claims, never joined.
            for design, source in dict.fromkeys(zip(designs.tolist(), sources.tolist(),
                                                    strict=True)):
                m = (designs == design) & (sources == source)
                sub = pr[m].iloc[np.argsort(_numeric(pr[m]["cpus"]))]
                style = dash_of.setdefault((label, source), DASHES[len(dash_of) % len(DASHES)])
                name = f"{esc(design)} ({esc(source)})" + \
                    (f" · {esc(label)}" if len(runs) > 1 else "")
                colour = PALETTE[design_order.index(design) % len(PALETTE)]
                p50 = [fmt_ns(v) for v in _numeric(sub["p50_stall_ns"])]
                proj_data.append({
                    "type": "scatter", "mode": "lines+markers", "x": _numeric(sub["cpus"]),
                    "y": (_numeric(sub["p99_stall_ns"]) / 1e3).round(3),
                    "name": name, "customdata": p50,
                    "line": {"color": colour, "dash": style},
                    "hovertemplate": "%{x} CPUs: p99 %{y:.3g} µs, p50 %{customdata}<extra>"
                                     + name + "</extra>"})
            proj_tables.append(
                _run_heading(label, len(runs))
                + table(pr, [Column("CPUs", "cpus", numeric=True), Column("design", "design"),
                             Column("p50 stall", "p50_stall_ns", fmt_ns, True),
                             Column("p99 stall", "p99_stall_ns", fmt_ns, True),
                             Column("from", "source")],
                        caption="projected stall of one global update", sort_by="cpus",
                        ascending=True))
        parts.append("".join(out))
    proj = ""
    if proj_data:
        ys = np.concatenate([np.asarray(d["y"], dtype=float) for d in proj_data])
        ys = ys[np.isfinite(ys) & (ys > 0)]
        yaxis: dict[str, Any] = {"type": "log", "title": {"text": "stall (log)"}}
        if len(ys):
            yaxis.update(log_ticks_us(float(ys.min()), float(ys.max())))
        proj = page.figure(
            proj_data, {"title": {"text": "projected p99 stall of one global update: serial "
                                          "vs broadcast vs lazy"},
                        "xaxis": {"type": "log", "title": {"text": "CPUs (log)"},
                                  "tickvals": [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]},
                        "yaxis": yaxis},
            height=440, label="projection of stall to 64, 256 and 1024 CPUs")
        zero = sorted({d["name"] for d in proj_data
                       if not (np.asarray(d["y"], dtype=float) > 0).any()})
        if zero:
            proj += (f'<p class="note">Stall 0 (nothing to wait for, so not drawn on the log '
                     f'axis): {", ".join(zero)}.</p>')
        proj = ("<h3>Projection to larger machines</h3>" + proj
                + _runs_grid(proj_tables if len(proj_tables) == len(runs)
                             else ["".join(proj_tables)]))
    return section("episodes", "Global-update episodes and projected stalls",
                   "How long does the caller stall while a new PKRS value is pushed to every "
                   "CPU, and how would serial, broadcast and lazy designs scale to 64, 256 and "
                   "1024 CPUs?", _runs_grid(parts) + proj)


def isolation_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        v = f.violations
        iso = schema.format_cpulist(f.isolated_cpus) or "none"
        if not f.isolated_cpus:
            out.append('<p class="empty">No isolated CPUs on this host (nothing to violate; '
                       "pass --isolated to analyse as if some were).</p>")
        tracer = _tracer_mask(v)
        out.append(f"<p>Isolated CPUs: <strong>{esc(iso)}</strong>. "
                   f"<strong>{int((~tracer).sum()):,}</strong> violations by the workload, "
                   f"{int(tracer.sum()):,} induced by the tracer itself.</p>")
        if len(v):
            origin = _origin_ns(f)
            data = []
            notes = []
            rows_of = {False: "", True: " · tracer"}
            for flag, name, colour, symbol in ((False, "workload", "#D55E00", "circle"),
                                               (True, "tracer-induced", "#999999", "x")):
                sub = v[tracer == flag]
                if len(sub) == 0:
                    continue
                # An even sample in time order: density over time stays true.
                sub = sub.iloc[np.argsort(_numeric(sub["time_ns"]), kind="stable")]
                keep = _even_sample(len(sub), MAX_POINTS // 2)
                if len(keep) < len(sub):
                    notes.append(f"{len(keep):,} of {len(sub):,} {name} violations, evenly "
                                 "sampled in time")
                    sub = sub.iloc[keep]
                custom = np.stack([
                    np.array([esc(x) for x in _col(sub, "func").tolist()], dtype=object),
                    np.array([esc(x) for x in _col(sub, "callsite").tolist()], dtype=object),
                    np.array([esc(x) for x in _col(sub, "comm").tolist()], dtype=object),
                    np.array([_display(x) for x in _col(sub, "source_cpu").tolist()],
                             dtype=object)], axis=1).tolist()
                data.append({"type": "scatter", "mode": "markers", "name": name,
                             "x": ((_numeric(sub["time_ns"]) - origin) / 1e6).round(4),
                             # Tracer-induced ones on a row of their own under their CPU.
                             "y": [f"CPU {int(c)}{rows_of[flag]}"
                                   for c in _numeric(sub["target_cpu"])],
                             "customdata": custom,
                             "marker": {"color": colour, "symbol": symbol, "size": 9},
                             "hovertemplate": "t=%{x:.3f} ms on %{y}<br>%{customdata[0]} from "
                                              "%{customdata[1]}<br>sent by %{customdata[2]} "
                                              "on CPU %{customdata[3]}<extra>"
                                              + name + "</extra>"})
            has = {flag: bool((tracer == flag).any()) for flag in (False, True)}
            seen = {int(c) for c in _numeric(v["target_cpu"]) if np.isfinite(c)}
            cats = [f"CPU {c}{rows_of[flag]}" for c in sorted(set(f.isolated_cpus) | seen)
                    for flag in (False, True) if has[flag]]
            out.append(page.figure(
                data, {"title": {"text": "isolation violations per isolated CPU over time"},
                       "xaxis": {"title": {"text": "time since start (ms)"}},
                       "yaxis": {"type": "category", "categoryorder": "array",
                                 "categoryarray": cats[::-1], "range": [-0.5, len(cats) - 0.5]}},
                height=max(240, 140 + 36 * len(cats)),
                label="isolation violations timeline"))
            if notes:
                out.append(f'<p class="note">Showing {esc("; ".join(notes))}.</p>')
            cols = [Column("time", "time_ns", numeric=True,
                           fmt=lambda x, o=origin: fmt_ns(_num(x) - o if _num(x) is not None
                                                          else None)),
                    Column("target CPU", "target_cpu", numeric=True),
                    Column("source CPU", "source_cpu", numeric=True),
                    Column("function", "func"), Column("callsite", "callsite"),
                    Column("task", "comm"), Column("pid", "pid", numeric=True),
                    Column("via", "via")]
            out.append(table(v[~tracer], cols, caption="violations by the workload",
                             sort_by="time_ns", ascending=True))
            out.append(table(v[tracer], cols, caption="violations induced by the tracer "
                             "(attaching probes patches kernel text: do_sync_core IPIs)",
                             sort_by="time_ns", ascending=True))
        parts.append("".join(out))
    return section("isolation", "Isolation violations",
                   "Do cross-CPU calls reach isolated (isolcpus / nohz_full) CPUs, and which "
                   "ones are the tracer's own doing?", _runs_grid(parts))


def drift_section(page: Page, runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        d = f.drift
        if len(d) == 0:
            out.append('<p class="empty">No preempt-count drift: preempt depth never fell '
                       "call after call within one walk.</p>")
            parts.append("".join(out))
            continue
        cpus = _numeric(d["cpu"])
        seqs = [_depth_list(x) for x in _col(d, "depths").tolist()]
        # How far the preempt depth fell within each walk: last depth seen minus first.
        fall = np.array([q[-1] - q[0] if len(q) >= 2 else np.nan for q in seqs])
        uniq = np.unique(cpus[np.isfinite(cpus)])
        worst, n_eps = [], []
        for c in uniq:
            m = cpus == c
            fc = fall[m]
            worst.append(float(np.nanmin(fc)) if np.isfinite(fc).any() else 0.0)
            n_eps.append(int(m.sum()))
        labels = [f"CPU {int(c)} ({n} walk{'s' if n != 1 else ''})"
                  for c, n in zip(uniq, n_eps, strict=True)]
        out.append(page.figure(
            [{"type": "bar", "x": labels, "y": worst, "marker": {"color": "#CC79A7"},
              "name": "deepest fall",
              "hovertemplate": "%{x}: preempt depth fell by %{y} in one walk"
                               "<extra></extra>"}],
            {"title": {"text": "preempt-count drift per CPU: deepest fall within one walk"},
             "yaxis": {"title": {"text": "depth change (last − first)"}, "zeroline": True,
                       "rangemode": "tozero"},
             "showlegend": False},
            height=320, label="preempt count drift per CPU"))
        # Walks with the same depth sequence from the same place draw one line, with a count.
        shapes: dict[tuple[str, tuple[float, ...]], int] = {}
        for k in np.argsort(-_numeric(_col(d, "calls")), kind="stable"):
            if not seqs[k]:
                continue
            row = d.iloc[k]
            name = f"CPU {_display(row.get('cpu'))} · {esc(row.get('comm'))} · " \
                   f"{esc(row.get('callsite'))}"
            key = (name, tuple(seqs[k]))
            shapes[key] = shapes.get(key, 0) + 1
        lines = []
        for i, ((name, q), n) in enumerate(list(shapes.items())[:10]):
            label = f"{name} ({n} walk{'s' if n != 1 else ''})"
            lines.append({"type": "scatter", "mode": "lines+markers",
                          "x": list(range(1, len(q) + 1)), "y": list(q), "name": label,
                          "line": {"color": PALETTE[i % len(PALETTE)]},
                          "hovertemplate": "call %{x}: depth %{y}<extra>" + label
                                           + "</extra>"})
        if lines:
            out.append(page.figure(
                lines, {"title": {"text": "preempt depth at each queued call of a walk "
                                          "(longest walks)"},
                        "xaxis": {"title": {"text": "call in the walk"}, "dtick": 1},
                        "yaxis": {"title": {"text": "preempt depth"}, "dtick": 1},
                        "legend": {"orientation": "h", "y": -0.25}, "showlegend": True},
                height=380, label="preempt depth along each drifting walk"))
        d = d.assign(_dur=_numeric(d["end_ns"]) - _numeric(d["start_ns"]))
        out.append(table(d, [Column("CPU", "cpu", numeric=True), Column("task", "comm"),
                             Column("pid", "pid", numeric=True), Column("callsite", "callsite"),
                             Column("calls", "calls", numeric=True),
                             Column("depths seen", "depths"),
                             Column("step", "step", numeric=True),
                             Column("duration", "_dur", fmt_ns, True)],
                         caption="drift episodes", sort_by="calls"))
        parts.append("".join(out))
    return section("drift", "Preempt-count drift",
                   "Does a walk over CPUs leave the preempt count lower than it found it "
                   "(per_cpu_ptr() paired with put_cpu_ptr())?", _runs_grid(parts))


def _depth_list(v: Any) -> list[float]:
    if isinstance(v, (list, tuple, np.ndarray)):
        return [float(x) for x in v]
    if isinstance(v, str):
        return [float(x) for x in re.findall(r"-?\d+", v)]
    return []


def lost_section(runs: Sequence[tuple[str, Findings]]) -> str:
    parts = []
    for label, f in runs:
        out = [_run_heading(label, len(runs))]
        lu = f.lost_updates
        if len(lu) == 0:
            out.append('<p class="empty">No lost updates: every CPU\'s cached PKRS matched '
                       "its MSR.</p>")
        else:
            origin = _origin_ns(f)
            out.append(table(lu, [
                Column("time", "time_ns", numeric=True,
                       fmt=lambda x, o=origin: fmt_ns(_num(x) - o
                                                      if _num(x) is not None else None)),
                Column("CPU", "cpu", numeric=True), Column("type", "type"),
                Column("cached", "cached_value", _hex_value), Column("MSR", "msr_value",
                                                                     _hex_value),
                Column("expected", "expected_value", _hex_value),
                Column("episode", "episode", numeric=True), Column("detail", "detail")],
                caption="lost updates", sort_by="time_ns", ascending=True))
        parts.append("".join(out))
    return section("lost", "Lost updates",
                   "Did a racy remote cache update leave a CPU with a PKRS value other than "
                   "the one pushed?", _runs_grid(parts))


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

NAV = [("summary", "Summary"), ("compare", "Comparison"), ("activity", "Activity"),
       ("redundant", "Redundant writes"), ("write-pkrs", "write_pkrs"),
       ("latency", "Latency"), ("episodes", "Global updates"), ("isolation", "Isolation"),
       ("drift", "Preempt drift"), ("lost", "Lost updates")]


def _asset(name: str) -> str:
    p = DASHBOARDS / name
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"dashboard asset {p} is missing ({e.strerror or e})") from None


def plotly_js() -> str:
    """The plotly.js bundled with the plotly Python package (no network at any time)."""
    try:
        import plotly
    except ImportError:
        raise ReportError("the plotly package is not installed (pip install plotly)") from None
    p = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    try:
        js = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"plotly.min.js not found at {p} ({e.strerror or e})") from None
    # Inline <script>: a literal '</script' would end it early.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def render(runs: Sequence[tuple[str, Findings]], title: str | None = None) -> str:
    """The whole page for one run, or two runs compared (A, B)."""
    if not 1 <= len(runs) <= 2:
        raise ReportError(f"a report shows one trace or compares two, not {len(runs)}")
    page = Page()
    body = [summary_section(runs)]
    nav = NAV if len(runs) == 2 else [n for n in NAV if n[0] != "compare"]
    if len(runs) == 2:
        body.append(comparison_section(runs))
    body += [activity_section(page, runs), redundant_section(page, runs),
             write_pkrs_section(page, runs), latency_section(page, runs),
             episodes_section(page, runs), isolation_section(page, runs),
             drift_section(page, runs), lost_section(runs)]
    if title is None:
        title = "pkstrace report: " + " vs ".join(label for label, _ in runs)
    nav_html = "".join(f'<li><a href="#{k}">{esc(v)}</a></li>' for k, v in nav)
    subs = {
        "TITLE": esc(title),
        "CSS": _asset("report.css"),
        "NAV": nav_html,
        "BODY": "\n".join(body),
        "FIGURES_JSON": script_json(page.figures),
        "PLOTLY_JS": plotly_js(),
        "APP_JS": _asset("report.js"),
        "MODE": "comparison" if len(runs) == 2 else "single",
    }
    template = _asset(TEMPLATE)
    # One pass over the template: substituted text is never scanned again, so a task
    # named "{{PLOTLY_JS}}" stays a task name.
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: subs.get(m.group(1), m.group(0)), template)
