"""Report size and time: `pkstrace report` (HTML) on 1 M / 10 M event traces.

The traces are bench_analysis.py's: a block bootstrap of the REAL capture
tests/fixtures/ftrace_cpuid_2cpu.txt over a 64-CPU host (CPUs 62-63 isolated),
so the report shows real cross-CPU call latencies, MSR writes and IPIs at scale.

Measured, per size:
- end to end: wall time and peak RSS of
  ``pkstrace report FILE --isolated 62-63 -o OUT.html --force`` in a child process;
- the split: read + analyse vs render (HTML) vs write, in a separate child;
- the HTML file's size, and how much of it is plotly.js (embedded once) vs data;
- for sizes up to 1 M: the Perfetto export's wall time and size (a timeline JSON
  grows with the events; it is not aggregated);
- how fast the page opens: in Debian's headless Chromium (the browser the tests
  use), a fresh page per run, the time from navigation to the load event and to
  every figure drawn by plotly (the tests' own "drawn" condition), with the
  1-minute load average around the runs.

    .venv/bin/python benchmarks/bench_report.py            # 1 M and 10 M, 3 runs each
    .venv/bin/python benchmarks/bench_report.py --smoke    # 200 k events, 1 run
    .venv/bin/python benchmarks/bench_report.py --sizes 1e6 --runs 5

Writes benchmarks/results/report.json (or $PKSTRACE_BENCH_RESULTS/report.json)
with the target (report under 10 MB for 10 M events) and its margin.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from pkstrace import schema  # noqa: E402

ISOLATED = "62-63"
TARGET_BYTES = 10_000_000  # the issue: under 10 MB for a 10 M-event trace
TARGET_EVENTS = 10_000_000
EXE = ROOT / ".venv/bin/pkstrace"


def _run_child(cmd: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(cmd, stdout=devnull, stderr=subprocess.PIPE)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"bench_report: {' '.join(cmd[:3])} failed ({rc}): {err.strip()}")
    return {"wall_s": round(wall, 3), "peak_rss_bytes": ru.ru_maxrss * 1024}


def _split_child(path: str, out: str) -> None:
    """Time the stages of one report in this process (printed as JSON)."""
    from pkstrace.analysis import analyse
    from pkstrace.importers import open_trace
    from pkstrace.reports import html

    t0 = time.perf_counter()
    trace = open_trace(path)
    t1 = time.perf_counter()
    findings = analyse(trace, isolated=schema.parse_cpulist(ISOLATED))
    t2 = time.perf_counter()
    page = html.render([(Path(path).name, findings)])
    t3 = time.perf_counter()
    Path(out).write_text(page, encoding="utf-8")
    t4 = time.perf_counter()
    plotly_bytes = len(html.plotly_js().encode())
    print(json.dumps({"read_s": t1 - t0, "analyse_s": t2 - t1, "render_s": t3 - t2,
                      "write_s": t4 - t3, "html_bytes": len(page.encode()),
                      "plotly_js_bytes": plotly_bytes, "calls": len(findings.calls),
                      "episodes": len(findings.episodes),
                      "violations": len(findings.violations)}))


CHROMIUM = "/usr/bin/chromium"
# The tests' condition for "every figure drawn" (tests/test_report_browser.py).
ALL_DRAWN = ("document.querySelectorAll('div.plot').length === "
             "document.querySelectorAll('div.plot.js-plotly-plot').length")


def _browser_cpu_s() -> float:
    """CPU seconds used so far by this process's Chromium descendants (browser, GPU,
    renderer...): on a shared machine a steadier figure than wall time."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name():
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def browser_open_times(page_path: Path, runs: int) -> dict[str, Any]:
    """Open the report in headless Chromium `runs` times (a fresh context each time, so
    nothing is cached): seconds to the load event and to every figure drawn, and the
    CPU seconds Chromium's processes spent until then."""
    if not os.path.exists(CHROMIUM):
        return {"skipped": f"{CHROMIUM} not installed (Debian's chromium package)"}
    from playwright.sync_api import sync_playwright

    samples = []
    load = [round(os.getloadavg()[0], 2)]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            for _ in range(runs):
                ctx = browser.new_context(viewport={"width": 1400, "height": 900})
                page = ctx.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                cpu0 = _browser_cpu_s()
                t0 = time.perf_counter()
                page.goto(page_path.as_uri(), wait_until="load", timeout=300_000)
                t_load = time.perf_counter() - t0
                page.wait_for_function(ALL_DRAWN, timeout=300_000, polling=50)
                t_drawn = time.perf_counter() - t0
                cpu = _browser_cpu_s() - cpu0
                figures = page.evaluate("document.querySelectorAll('div.plot').length")
                ctx.close()
                if errors:
                    raise SystemExit(f"bench_report: the page raised: {errors[0]}")
                samples.append({"load_event_s": round(t_load, 3),
                                "all_figures_drawn_s": round(t_drawn, 3),
                                "chromium_cpu_s": round(cpu, 3), "figures": figures})
        finally:
            browser.close()
    load.append(round(os.getloadavg()[0], 2))
    return {"browser": CHROMIUM, "runs": samples, "load_avg_1m": load,
            "load_event_s_median": round(_median([r["load_event_s"] for r in samples]), 3),
            "all_figures_drawn_s_median":
                round(_median([r["all_figures_drawn_s"] for r in samples]), 3),
            "chromium_cpu_s_median": round(_median([r["chromium_cpu_s"] for r in samples]), 3)}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one small run (200 k events)")
    ap.add_argument("--sizes", help="comma-separated event counts (default 1e6,1e7)")
    ap.add_argument("--runs", type=int, default=3, help="runs per size (default 3)")
    ap.add_argument("--workdir", default="/var/tmp/pkstrace-bench-report")
    ap.add_argument("--_split", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._split:
        _split_child(*args._split)
        return 0
    from bench_analysis import bootstrap_trace

    from pkstrace.bench.common import git_revision, host_facts, write_json_atomic

    if args.smoke:
        sizes, runs = [200_000], 1
    elif args.sizes:
        sizes, runs = [int(float(s)) for s in args.sizes.split(",")], args.runs
    else:
        sizes, runs = [1_000_000, 10_000_000], args.runs
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sizes:
        path, built = bootstrap_trace(work, n)
        out = work / f"report-{n}.html"
        load_before = round(os.getloadavg()[0], 2)
        e2e = [_run_child([str(EXE), "report", str(path), "--isolated", ISOLATED,
                           "-o", str(out), "--force"]) for _ in range(runs)]
        load_after = round(os.getloadavg()[0], 2)
        size = out.stat().st_size
        splits = []
        for _ in range(runs):
            r = subprocess.run([sys.executable, __file__, "--_split", str(path),
                                str(work / f"split-{n}.html")],
                               capture_output=True, text=True, check=True)
            splits.append(json.loads(r.stdout))
        split_med = {k: round(_median([s[k] for s in splits]), 4)
                     for k in ("read_s", "analyse_s", "render_s", "write_s")}
        res: dict[str, Any] = {
            "events": n, "trace_file_bytes": path.stat().st_size, "runs": runs,
            "build_s": round(built, 2) if built is not None else None,
            "report_wall_s_median": round(_median([r["wall_s"] for r in e2e]), 3),
            "report_load_avg_1m": [load_before, load_after],
            "report_peak_rss_bytes": max(r["peak_rss_bytes"] for r in e2e),
            "html_bytes": size,
            "plotly_js_bytes": splits[0]["plotly_js_bytes"],
            "data_bytes": size - splits[0]["plotly_js_bytes"],
            "stages_s_median": split_med,
            "findings_rows": {k: splits[0][k] for k in ("calls", "episodes", "violations")},
            "report_runs": e2e, "split_runs": splits,
        }
        if n <= 1_000_000:
            pj = work / f"perfetto-{n}.json"
            pr = [_run_child([str(EXE), "export", str(path), "--isolated", ISOLATED,
                              "--format", "perfetto", "-o", str(pj), "--force"])
                  for _ in range(runs)]
            res["perfetto_wall_s_median"] = round(_median([r["wall_s"] for r in pr]), 3)
            res["perfetto_bytes"] = pj.stat().st_size
            pj.unlink()
        res["browser_open"] = browser_open_times(out, runs)
        results.append(res)
        print(f"bench_report: {n:>11,} events: report {res['report_wall_s_median']:.2f}s "
              f"(render {split_med['render_s']:.2f}s), {size / 1e6:.2f} MB "
              f"({res['data_bytes'] / 1e6:.2f} MB data), peak RSS "
              f"{res['report_peak_rss_bytes'] / (1 << 30):.2f} GiB; opens in Chromium: "
              f"{res['browser_open'].get('all_figures_drawn_s_median', '-')} s to all "
              f"figures drawn ({res['browser_open'].get('chromium_cpu_s_median', '-')} "
              "CPU-s)", file=sys.stderr, flush=True)
    # The same page with no data (a report of empty findings): what opening costs
    # whatever the trace's size (plotly.js itself, the page's script), to read the
    # figures above against.
    from pkstrace.analysis.findings import Findings
    from pkstrace.reports import html

    empty = work / "report-empty.html"
    empty.write_text(html.render([("empty", Findings())]), encoding="utf-8")
    baseline = {"html_bytes": empty.stat().st_size,
                "browser_open": browser_open_times(empty, runs)}
    print(f"bench_report: empty report ({baseline['html_bytes'] / 1e6:.2f} MB) opens in "
          f"{baseline['browser_open'].get('all_figures_drawn_s_median', '-')} s "
          f"({baseline['browser_open'].get('chromium_cpu_s_median', '-')} CPU-s)",
          file=sys.stderr, flush=True)
    at_target = [r for r in results if r["events"] >= TARGET_EVENTS]
    if at_target:
        r = at_target[0]
        targets = [{"target": f"HTML report under 10 MB for {r['events']:,} events",
                    "value": r["html_bytes"], "limit": TARGET_BYTES, "better": "lower",
                    "met": r["html_bytes"] < TARGET_BYTES,
                    "margin": f"{r['html_bytes'] / TARGET_BYTES:.2f}x the limit"}]
    else:
        r = max(results, key=lambda x: x["events"])
        targets = [{"target": "HTML report under 10 MB for 10 M events", "met": None,
                    "margin": f"not run at 10 M (largest: {r['events']:,} events, "
                              f"{r['html_bytes'] / 1e6:.2f} MB)"}]
    doc = {
        "benchmark": "report",
        "command": [sys.executable, *sys.argv],
        "git_revision": git_revision(),
        "host": host_facts(),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "trace": "bench_analysis.build_trace: block bootstrap of "
                 "tests/fixtures/ftrace_cpuid_2cpu.txt over 64 CPUs, isolated " + ISOLATED,
        "smoke": bool(args.smoke),
        "results": results,
        "empty_report_baseline": baseline,
        "targets": targets,
        "note": "wall clock on a shared 2-core machine: medians of the runs; "
                "load_avg_1m pairs are the 1-minute load average before and after",
    }
    out_dir = Path(os.environ.get("PKSTRACE_BENCH_RESULTS", ROOT / "benchmarks/results"))
    write_json_atomic(out_dir / "report.json", doc)
    print(f"bench_report: wrote {out_dir / 'report.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
