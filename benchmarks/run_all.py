#!/usr/bin/env python3
"""Run every benchmark in benchmarks/ (bench_*.py), then summarise and plot the results.

    python benchmarks/run_all.py            # full runs (minutes; root for ipi/overhead)
    python benchmarks/run_all.py --smoke    # CI: each script's short smoke mode
    python benchmarks/run_all.py --only ipi,overhead
    python benchmarks/run_all.py --plot-only   # summarise and plot the result files there

Each script takes ``--smoke`` and writes ``benchmarks/results/<name>.json``
(``bench_<name>.py``), or ``$PKSTRACE_BENCH_RESULTS/<name>.json`` when that is
set (``--results-dir``; the tests use it so they never touch the committed
results). This runner records each script's exit status and wall time, checks
its result file was written by this run, collects every target the files
declare, and writes ``results/run_all.json`` plus a plotly page
``results/summary.html``. It exits non-zero when a script failed, not when a
target is missed: a missed target is a result, recorded with its margin.

A result file's targets are found under ``"targets"``: a list of objects with
``target`` (what), ``met`` (true/false/null) and, where numeric, ``value`` and
``limit`` (and ``better``: "lower" or "higher"), or a dict name -> such an object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from pkstrace.bench.common import (  # noqa: E402
    git_revision,
    host_facts,
    write_json_atomic,
    write_text_atomic,
)


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = set(only)
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise SystemExit(f"run_all: error: no benchmark named {sorted(unknown)} "
                             f"(have: {', '.join(s.stem.removeprefix('bench_') for s in scripts)})")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    return scripts


def run_script(script: Path, smoke: bool, timeout_s: float, results: Path) -> dict[str, Any]:
    name = script.stem.removeprefix("bench_")
    cmd = [sys.executable, str(script)] + (["--smoke"] if smoke else [])
    print(f"run_all: {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        # Output goes straight to the terminal: long runs show their progress.
        env = {**os.environ, "PKSTRACE_BENCH_RESULTS": str(results)}
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, check=False, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    wall = time.time() - t0
    result = results / f"{name}.json"
    fresh = result.exists() and result.stat().st_mtime >= t0 - 1
    return {"name": name, "script": str(script.relative_to(ROOT)), "command": cmd[1:],
            "exit_status": rc, "timed_out": rc == -1, "wall_s": round(wall, 2),
            "result_file": _shown(result) if result.exists() else None, "fresh": fresh}


def _shown(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(results.glob("*.json")):
        if p.name == "run_all.json":
            continue
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out[p.stem] = {"error": f"unreadable: {e}"}
    return out


def describe_files(results_dir: Path, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Which run each result file comes from: its date, smoke flag and git revision."""
    out = []
    for name, doc in results.items():
        path = results_dir / f"{name}.json"
        # The scripts grew their own spellings of the same two facts; read them all.
        machine = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
        created = (doc.get("created") or doc.get("date") or doc.get("time")
                   or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime)))
        git_rev = (doc.get("git_rev") or doc.get("git_revision") or doc.get("git")
                   or machine.get("git_revision") or "")
        out.append({"name": name, "file": _shown(path), "created": str(created),
                    "smoke": doc.get("smoke"), "git_rev": str(git_rev)})
    return out


def collect_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, doc in results.items():
        targets = doc.get("targets") if isinstance(doc, dict) else None
        if isinstance(targets, dict):
            targets = [{"target": k, **v} if isinstance(v, dict) else {"target": k, "met": v}
                       for k, v in targets.items()]
        for t in targets or []:
            if not isinstance(t, dict):
                continue
            row = {"benchmark": name, "target": str(t.get("target", t.get("name", "?"))),
                   "met": t.get("met")}
            for k in ("measure", "value", "limit", "unit", "margin_pct", "better"):
                if k in t:
                    row[k] = t[k]
            rows.append(row)
    return rows


def render_summary(results: dict[str, dict[str, Any]], targets: list[dict[str, Any]],
                   runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One plotly page: targets against limits, wall times, ipi and overhead figures."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    numeric = [t for t in targets if isinstance(t.get("value"), (int, float))
               and isinstance(t.get("limit"), (int, float)) and t["limit"]]
    ipi_doc = results.get("ipi", {})
    ov_doc = results.get("overhead", {})
    rows = 3 if runs else 2
    specs = [[{"colspan": 2}, None], [{}, {}]] + ([[{"colspan": 2}, None]] if runs else [])
    titles = ["targets: measured / limit, oriented so that below 1 = met (log scale)",
              "cross-CPU call: serial walk vs broadcast (ipi, p50)",
              "tracer cost per event (overhead, medians)"]
    if runs:
        titles.append("benchmark wall time (s)")
    fig = make_subplots(rows=rows, cols=2, specs=specs, vertical_spacing=0.12,
                        horizontal_spacing=0.1, subplot_titles=titles,
                        row_heights=[0.45, 0.35] + ([0.2] if runs else []))
    if numeric:
        labels = [_wrap(f"{t['benchmark']}: {t['target']}"
                        + (f" [{t['measure']}]" if t.get("measure") else ""), 70)
                  for t in numeric]
        fig.add_trace(go.Bar(
            y=labels, x=[_cost_ratio(t) for t in numeric], orientation="h",
            marker_color=["#2a9d8f" if t["met"] else "#e76f51" for t in numeric],
            text=[f"{t['value']:,} / {t['limit']:,} {t.get('unit', '')}" for t in numeric],
            textposition="auto", name="targets", showlegend=False), row=1, col=1)
        fig.add_vline(x=1.0, line_dash="dash", row=1, col=1)
        fig.update_xaxes(type="log", row=1, col=1)
    for label, key in (("serial, targets idle", "serial_idle"),
                       ("serial, targets busy", "serial"), ("broadcast", "broadcast")):
        ipi_rows = ipi_doc.get(key) or []
        if ipi_rows:
            fig.add_trace(go.Scatter(
                x=[r["cpus"] for r in ipi_rows],
                y=[float(np.median(r["stall_ns"])) / 1000 for r in ipi_rows],
                mode="lines+markers", name=f"ipi: {label}"), row=2, col=1)
    trs = [r for r in ov_doc.get("tracers", []) if r.get("available")
           and r.get("kind") != "untraced"]
    if trs:
        fig.add_trace(go.Bar(x=[r["name"] for r in trs],
                             y=[r.get("bpf_stats", {}).get("ns_per_event_p50") for r in trs],
                             name="overhead: BPF run time (bpf_stats)"), row=2, col=2)
        fig.add_trace(go.Bar(x=[r["name"] for r in trs],
                             y=[r.get("slowdown", {}).get("overhead_ns_per_event") for r in trs],
                             name="overhead: workload slowdown (median call)"), row=2, col=2)
    if runs:
        fig.add_trace(go.Bar(x=[r["name"] for r in runs], y=[r["wall_s"] for r in runs],
                             marker_color=["#2a9d8f" if r["exit_status"] == 0 else "#e76f51"
                                           for r in runs],
                             name="wall time", showlegend=False), row=3, col=1)
    fig.update_yaxes(title_text="stall, us", row=2, col=1)
    fig.update_xaxes(title_text="target CPUs", dtick=1, row=2, col=1)
    fig.update_yaxes(title_text="ns / event (median)", row=2, col=2)
    host = meta.get("host", {})
    fig.update_layout(
        title=f"pkstrace benchmarks: {host.get('hostname', '')} {host.get('kernel', '')} "
              f"{host.get('cpu_model', '')}, {len(host.get('online_cpus', []))} CPUs; "
              f"rev {meta.get('git_rev', '')}; {meta.get('created', '')}"
              f"{' (smoke)' if meta.get('smoke') else ''}",
        height=1100 if runs else 950, barmode="group",
        legend={"orientation": "h", "y": -0.08})
    table = "".join(
        f"<tr><td>{_esc(t['benchmark'])}</td><td>{_esc(t['target'])}</td>"
        f"<td>{_esc(str(t.get('measure', '')))}</td>"
        f"<td>{_esc(str(t.get('value', '')))}</td><td>{_esc(str(t.get('limit', '')))}</td>"
        f"<td>{_esc(str(t.get('unit', '')))}</td>"
        f"<td>{ {True: 'met', False: 'MISSED', None: 'unknown'}.get(t['met'], '?') }</td></tr>"
        for t in targets)
    page = fig.to_html(include_plotlyjs=True, full_html=True)
    extra = ("<h2>Targets</h2><table border=1 cellpadding=3><tr><th>benchmark</th>"
             "<th>target</th><th>measure</th><th>value</th><th>limit</th><th>unit</th>"
             f"<th>status</th></tr>{table}</table>")
    return page.replace("</body>", extra + "</body>", 1)


def _cost_ratio(t: dict[str, Any]) -> float:
    """value/limit oriented so that below 1 is always 'met'.

    A target says which way is better with ``better: "lower"|"higher"``; otherwise
    the direction follows from ``met`` (e.g. 4e6 events/s against a 1e7 floor,
    not met, is a higher-is-better target).
    """
    value, limit = float(t["value"]), float(t["limit"])
    better = t.get("better")
    if better is None and t.get("met") is not None:
        lower_ok = value <= limit
        better = "lower" if lower_ok == bool(t["met"]) else "higher"
    if better == "higher" and value:
        return limit / value
    return value / limit


def _wrap(text: str, width: int) -> str:
    """Break a long label into lines of at most ``width`` characters (plotly <br>)."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "<br>".join(_esc(x) for x in lines)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py and plot results.")
    p.add_argument("--smoke", action="store_true", help="each script's short smoke mode (CI)")
    p.add_argument("--only", metavar="NAMES", help="comma-separated benchmark names "
                   "(bench_NAME.py), e.g. ipi,overhead")
    p.add_argument("--plot-only", action="store_true",
                   help="run nothing; summarise and plot the existing result files")
    p.add_argument("--results-dir", type=Path, default=Path(
        os.environ.get("PKSTRACE_BENCH_RESULTS") or HERE / "results"), metavar="DIR",
        help="where result files go (default benchmarks/results; passed to the scripts "
        "as PKSTRACE_BENCH_RESULTS)")
    p.add_argument("--timeout", type=float, default=7200, metavar="SECONDS",
                   help="give up on one script after this long (default 7200)")
    a = p.parse_args(argv)
    results_dir = a.results_dir.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    if not a.plot_only:
        only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
        for script in discover(only):
            runs.append(run_script(script, a.smoke, a.timeout, results_dir))
    results = load_results(results_dir)
    targets = collect_targets(results)
    meta = {"kind": "pkstrace-bench-run-all", "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_rev": git_revision(),
            "host": host_facts(), "smoke": a.smoke,
            "command": ["python", "benchmarks/run_all.py", *(argv if argv is not None
                                                             else sys.argv[1:])]}
    summary = {**meta, "benchmarks": runs, "result_files": describe_files(results_dir, results),
               "targets": targets}
    write_json_atomic(results_dir / "run_all.json", summary)
    write_text_atomic(results_dir / "summary.html",
                      render_summary(results, targets, summary["benchmarks"], meta))
    if runs:
        print(f"{'benchmark':<12} {'exit':>4} {'wall s':>8} result", file=sys.stderr)
    for r in runs:
        state = "fresh" if r["fresh"] else "NOT WRITTEN by this run"
        print(f"{r['name']:<12} {r['exit_status']:>4} {r['wall_s']:>8.1f} "
              f"{r['result_file'] or '-'} ({state})", file=sys.stderr)
    print(f"{'result':<12} {'created':<26} {'smoke':<6} git", file=sys.stderr)
    for f in summary["result_files"]:
        print(f"{f['name']:<12} {f['created']:<26} {str(f['smoke']):<6} {f['git_rev']}",
              file=sys.stderr)
    for t in targets:
        status = {True: "met", False: "MISSED", None: "unknown"}.get(t["met"], "?")
        detail = (f": {t['value']} vs {t['limit']} {t.get('unit', '')}".rstrip()
                  if "value" in t and "limit" in t else "")
        measure = f" [{t['measure']}]" if t.get("measure") else ""
        print(f"target {status}: {t['benchmark']}: {t['target']}{measure}{detail}",
              file=sys.stderr)
    print(f"wrote {_shown(results_dir / 'run_all.json')} and "
          f"{_shown(results_dir / 'summary.html')}", file=sys.stderr)
    failed = [r["name"] for r in runs if r["exit_status"] != 0 or not r["fresh"]]
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
