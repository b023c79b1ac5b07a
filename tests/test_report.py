"""`pkstrace report`: the page's content, its safety, comparison numbers, size, CLI errors.

The browser tests (test_report_browser.py) render the same pages in Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_report_synth import HOSTILE_COMM, HOSTILE_HOST, HOSTILE_SYMBOL, synth_findings

from pkstrace import cli
from pkstrace.analysis.findings import Findings
from pkstrace.reports import html


def _figures(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="pkstrace-figures">(.*?)</script>',
                  page, re.S)
    assert m, "figure JSON missing"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def v3_page() -> str:
    return html.render([("v3.pkstrace", synth_findings("v3"))])


@pytest.fixture(scope="module")
def compare_page() -> str:
    return html.render([("v3", synth_findings("v3")), ("lazy", synth_findings("lazy", seed=2))])


def test_plotly_embedded_once_and_nothing_fetched(v3_page: str) -> None:
    assert v3_page.count("plotly.js v") == 1  # the bundle's banner
    # Exactly three script elements: the figure JSON, plotly.js, the page's own JS.
    assert len(re.findall(r"<script\b", v3_page, re.I)) == 3
    assert not re.search(r"<script[^>]+src=", v3_page, re.I)
    assert not re.search(r"<link\b", v3_page, re.I)
    assert not re.search(r"<img\b", v3_page, re.I)


def test_trace_strings_are_escaped(v3_page: str) -> None:
    # The hostile strings never appear raw; their escaped forms do.
    assert HOSTILE_COMM not in v3_page
    assert HOSTILE_SYMBOL not in v3_page
    assert "<b>host</b>" not in v3_page
    assert "&lt;img src=x onerror=alert(1)&gt;" in v3_page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in v3_page
    assert html.esc(HOSTILE_HOST) in v3_page
    # Inside the figure JSON there is no '<' at all, so nothing can close the script.
    m = re.search(r'id="pkstrace-figures">(.*?)</script>', v3_page, re.S)
    assert m and "<" not in m.group(1)
    # ...and what plotly will show is the HTML-escaped text (plotly decodes entities).
    fig_text = json.dumps(_figures(v3_page))
    assert "&lt;img src=x onerror=alert(1)&gt;" in fig_text


def test_template_placeholders_in_trace_strings_stay_text() -> None:
    f = synth_findings("v3")
    f.redundant_by_task.loc[0, "comm"] = "{{PLOTLY_JS}}"
    page = html.render([("x", f)])
    assert page.count("plotly.js v") == 1
    assert "{{PLOTLY_JS}}" in page


def test_every_view_is_present(v3_page: str) -> None:
    for sec in ("summary", "activity", "redundant", "write-pkrs", "latency", "episodes",
                "isolation", "drift", "lost"):
        assert f'<section id="{sec}"' in v3_page
    figs = _figures(v3_page)
    titles = " | ".join(str(f["layout"].get("title", {}).get("text")) for f in figs.values())
    for want in ("MSR writes per CPU over time", "cross-CPU calls arriving per CPU",
                 "latency histogram", "latency CDF by target CPU", "latency CDF by function",
                 "global-update episodes", "projected p99 stall", "isolation violations",
                 "preempt-count drift", "write_pkrs() calls vs cache hits"):
        assert want in titles, want
    # Isolated CPUs are marked on the heatmaps.
    heat = next(f for f in figs.values() if f["data"][0]["type"] == "heatmap")
    assert len(heat["layout"]["shapes"]) == 2
    assert "CPU 6 (isolated)" in heat["layout"]["yaxis"]["ticktext"]


def test_summary_counts_come_from_findings(v3_page: str) -> None:
    f = synth_findings("v3")
    rows = {r.name: r for r in html.finding_rows(f)}
    assert rows["isolation violations"].count == 300
    assert rows["isolation violations"].severity == "high"
    assert rows["tracer-induced isolation violations"].count == 2
    assert rows["preempt-count drift"].count == 3
    assert rows["remote cross-CPU calls"].count == 2800
    assert rows["redundant MSR writes"].count == 1450
    assert 'data-v="300">300</td>' in v3_page


def test_projection_covers_64_256_1024(v3_page: str) -> None:
    proj = next(f for f in _figures(v3_page).values()
                if "projected p99 stall" in f["layout"]["title"]["text"])
    xs = {x for d in proj["data"] for x in d["x"]}
    assert {64, 256, 1024} <= xs
    names = " ".join(d["name"] for d in proj["data"])
    for design in ("serial", "broadcast", "lazy"):
        assert design in names


def test_comparison_states_differences_in_numbers(compare_page: str) -> None:
    assert '<section id="compare"' in compare_page
    assert "remote cross-CPU calls: 2,800 → 0 (−2,800, −100%)" in compare_page
    a = synth_findings("v3")
    p99 = html.fmt_ns(float(np.quantile(a.episodes["stall_ns"], 0.99)))
    assert f"global-update stall p99: {p99} → 0 ns" in compare_page
    assert "isolation violations (workload): 300 → 0 (−300, −100%)" in compare_page


@pytest.mark.parametrize("a,b,kind,want", [
    (2800, 0, "count", "2,800 → 0 (−2,800, −100%)"),
    (0, 5, "count", "0 → 5 (+5)"),
    (3_100_000, 0, "ns", "3.1 ms → 0 ns (−3.1 ms, −100%)"),
    (10, 10, "count", "10 → 10 (same)"),
    (None, 4, "count", "– → 4"),
])
def test_difference_text(a: float | None, b: float | None, kind: str, want: str) -> None:
    assert html.difference(a, b, kind) == want


def test_empty_findings_render() -> None:
    page = html.render([("empty", Findings())])
    assert "No per-CPU activity" in page
    assert "No remote cross-CPU calls" in page
    assert _figures(page) == {}


def test_large_findings_stay_small() -> None:
    """The size of a report is bounded by aggregation, not by the number of calls."""
    big = synth_findings("v3", n_calls=400_000, n_episodes=20_000, n_cpus=64,
                         isolated=(60, 61, 62, 63), duration_ns=5_000_000_000)
    small = synth_findings("v3", n_calls=4_000, n_episodes=200, n_cpus=64,
                           isolated=(60, 61, 62, 63), duration_ns=5_000_000_000)
    big_page, small_page = html.render([("big", big)]), html.render([("small", small)])
    plotly_bytes = len(html.plotly_js().encode())
    data_big = len(big_page.encode()) - plotly_bytes
    data_small = len(small_page.encode()) - plotly_bytes
    assert data_big < 3_000_000, data_big
    assert data_big < 3 * data_small  # 100x the calls, not 100x the bytes
    figs = _figures(big_page)
    for fig in figs.values():
        for tr in fig["data"]:
            if tr.get("mode") == "markers":
                assert len(tr["x"]) <= html.MAX_POINTS


def test_tables_are_capped_and_keyboard_sortable() -> None:
    f = synth_findings("v3", n_episodes=1000)
    page = html.render([("x", f)])
    assert "Showing 300 of 1,000 rows" in page
    assert '<th scope="col" tabindex="0" aria-sort="none"' in page


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_refuses_three_traces(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "report", "a", "b", "c", "-o", str(tmp_path / "x.html"))
    assert rc == 2
    assert err.strip().count("\n") == 0
    assert err.startswith("pkstrace report: error: give one trace, or two to compare")


def test_cli_refuses_to_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "x.html"
    out.write_text("keep me")
    rc, _, err = _run(capsys, "report", "a.pkstrace", "-o", str(out))
    assert rc == 2 and "exists (use --force" in err and err.strip().count("\n") == 0
    assert out.read_text() == "keep me"


def test_cli_missing_output_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "report", "a.pkstrace", "-o", str(tmp_path / "no" / "x.html"))
    assert rc == 2 and "does not exist" in err and err.strip().count("\n") == 0


def test_cli_bad_isolated(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "report", "a.pkstrace", "--isolated", "7-3",
                      "-o", str(tmp_path / "x.html"))
    assert rc == 2 and "--isolated" in err and err.strip().count("\n") == 0


def test_cli_calibration_adds_projection_lines(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    """--calibration goes to analyse(): its projection rows are drawn as their own lines."""
    src = Path(__file__).parent / "fixtures" / "emulated_v3_8cpu.pkstrace"
    out = tmp_path / "calib.html"
    rc, _, err = _run(capsys, "report", str(src), "--calibration", "review", "-o", str(out))
    assert rc == 0, err
    proj = next(f for f in _figures(out.read_text()).values()
                if "projected" in f["layout"]["title"]["text"])
    names = {d["name"] for d in proj["data"]}
    assert {"serial (trace)", "serial (review)", "broadcast (review)"} <= names
    for d in proj["data"]:  # one line per (design, source): CPU counts never repeat
        assert len(d["x"]) == len(set(d["x"]))


def test_cli_bad_calibration(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    src = Path(__file__).parent / "fixtures" / "emulated_v3_8cpu.pkstrace"
    rc, _, err = _run(capsys, "report", str(src), "--calibration", str(bad),
                      "-o", str(tmp_path / "x.html"))
    assert rc == 2 and "calibration" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "x.html").exists()


def test_cli_calibration_from_bench_ipi(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    """A calibration measured here by `pkstrace bench ipi` (real cpuid cross-CPU calls)
    projects the emulated v3 trace's stall: its serial and broadcast lines are drawn
    beside the trace's own, with the figures the analysis computed from that file."""
    import os
    import subprocess
    import sys

    from pkstrace.analysis import analyse
    from pkstrace.analysis.projection import load_calibration
    from pkstrace.importers import open_trace

    if os.geteuid() != 0:
        pytest.skip("bench ipi needs root to open /dev/cpu/N/cpuid")
    if not os.path.exists("/dev/cpu/1/cpuid"):
        pytest.skip("bench ipi needs /dev/cpu/1/cpuid (CONFIG_X86_CPUID, a second CPU)")
    calib = tmp_path / "calib.json"
    res = subprocess.run([sys.executable, "-m", "pkstrace", "bench", "ipi", "--cpus", "0-1",
                          "-n", "40", "--warmup", "5", "-o", str(calib), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    src = Path(__file__).parent / "fixtures" / "emulated_v3_8cpu.pkstrace"
    out = tmp_path / "calib.html"
    rc, _, err = _run(capsys, "report", str(src), "--calibration", str(calib), "-o", str(out))
    assert rc == 0, err
    page = out.read_text()
    proj = next(f for f in _figures(page).values()
                if "projected" in f["layout"]["title"]["text"])
    lines = {d["name"]: d for d in proj["data"]}
    assert {"serial (trace)", "serial (calibration)", "broadcast (calibration)"} <= set(lines)
    f = analyse(open_trace(src), calibration=load_calibration(str(calib)))
    pr = f.projection[f.projection["source"] == "calibration"]
    for design in ("serial", "broadcast"):
        rows = pr[pr["design"] == design].sort_values("cpus")
        assert {64, 256, 1024} <= set(rows["cpus"])
        line = lines[f"{design} (calibration)"]
        assert line["x"] == rows["cpus"].tolist()
        assert line["y"] == pytest.approx((rows["p99_stall_ns"] / 1e3).round(3).tolist())
    # The table beside the figure says where each row comes from.
    assert page.count("<td>calibration</td>") == len(pr)


def test_isolation_timeline_samples_evenly_and_keeps_tracer_apart() -> None:
    """10,000 workload violations spread over 500 ms and 3,000 tracer-induced ones while
    probes attach (first 50 ms): the figure keeps at most MAX_POINTS/2 of each, spread
    like the data (not the first ones in time), tracer-induced on rows of their own."""
    import pandas as pd

    from pkstrace.analysis import findings as fd

    f = synth_findings("v3")
    start = f.trace["window"]["start_ns"]
    rng = np.random.default_rng(5)
    n_work, n_tracer = 10_000, 3_000
    t = np.concatenate([np.sort(rng.integers(start, start + 500_000_000, n_work)),
                        np.sort(rng.integers(start, start + 50_000_000, n_tracer))])
    tracer = np.r_[np.zeros(n_work, bool), np.ones(n_tracer, bool)]
    f.violations = pd.DataFrame({
        "time_ns": t, "source_cpu": 0, "target_cpu": rng.choice([6, 7], len(t)),
        "func": np.where(tracer, "do_sync_core", "__wrmsr_on_cpu"),
        "callsite": "generic_exec_single+0x33", "comm": "pks_updater", "pid": 194,
        "tracer_induced": tracer, "via": "csd"})[fd.VIOLATION_COLUMNS]
    page = html.render([("many", f)])
    fig = next(v for v in _figures(page).values()
               if v["layout"]["title"]["text"].startswith("isolation violations"))
    by_name = {d["name"]: d for d in fig["data"]}
    work, trc = by_name["workload"], by_name["tracer-induced"]
    assert len(work["x"]) <= html.MAX_POINTS // 2 and len(trc["x"]) <= html.MAX_POINTS // 2
    # Spread like the data: the workload's median time stays near 250 ms.
    assert abs(float(np.median(work["x"])) - 250) < 25, np.median(work["x"])
    assert max(work["x"]) > 490
    assert set(work["y"]) == {"CPU 6", "CPU 7"}
    assert set(trc["y"]) == {"CPU 6 · tracer", "CPU 7 · tracer"}
    assert set(fig["layout"]["yaxis"]["categoryarray"]) == \
        {"CPU 6", "CPU 7", "CPU 6 · tracer", "CPU 7 · tracer"}
    assert "Showing 2,000 of 10,000 workload violations, evenly sampled in time; " \
           "2,000 of 3,000 tracer-induced violations, evenly sampled in time." in page
    assert "largest by _w" not in page
    assert "(earliest time first)" in page


def test_comparison_shares_the_stall_axis(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    """broadcast vs housekeeping (emulated host; stalls 0.44-11.7 ms vs 0.35-1.47 ms):
    both episode timelines get one stall axis, so equal heights mean equal stalls."""
    fx = Path(__file__).parent / "fixtures"
    out = tmp_path / "bh.html"
    rc, _, err = _run(capsys, "report", str(fx / "emulated_broadcast_8cpu.pkstrace"),
                      str(fx / "emulated_housekeeping_8cpu.pkstrace"), "-o", str(out))
    assert rc == 0, err
    figs = [f for f in _figures(out.read_text()).values()
            if f["layout"]["title"]["text"].startswith("global-update episodes")]
    assert len(figs) == 2
    ya, yb = figs[0]["layout"]["yaxis"], figs[1]["layout"]["yaxis"]
    assert ya["type"] == "log" and ya["range"] == yb["range"]
    assert ya["tickvals"] == yb["tickvals"] and len(ya["tickvals"]) >= 3
    ys = [y for f in figs for d in f["data"] for y in d["y"]]
    lo, hi = 10 ** ya["range"][0], 10 ** ya["range"][1]
    assert lo < min(ys) and max(ys) < hi


def test_heatmap_rows_labelled_on_large_hosts() -> None:
    """64 CPUs with 60-63 isolated: rows too thin for a label each, so every 8th CPU and
    one 'CPU 60-63 (isolated)' label (the labels near it left out, so none overlap)."""
    f = synth_findings("v3", n_calls=4_000, n_episodes=50, n_cpus=64,
                       isolated=(60, 61, 62, 63))
    heat = next(v for v in _figures(html.render([("big", f)])).values()
                if v["data"][0]["type"] == "heatmap")
    y = heat["layout"]["yaxis"]
    assert "CPU 60-63 (isolated)" in y["ticktext"]
    assert 4 <= len(y["ticktext"]) <= 16
    vals = sorted(y["tickvals"])
    assert min(b - a for a, b in zip(vals, vals[1:], strict=False)) >= 4
    assert html._cpu_ticks(list(range(8)), [6, 7])[1][6:] == ["CPU 6 (isolated)",
                                                               "CPU 7 (isolated)"]
