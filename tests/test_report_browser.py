"""The HTML report rendered in a real headless Chromium (Debian's /usr/bin/chromium).

Checks what a reviewer opening the file would see: no console or page errors, no
request leaves the page (self-contained), every figure drawn with its traces, hostile
task and symbol names shown as text (no dialog, no <img>), tables sortable with the
keyboard. Screenshots go to the test's tmp directory (PKSTRACE_SCREENSHOTS=DIR keeps
them) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report_synth import HOSTILE_COMM, HOSTILE_SYMBOL, synth_findings

from pkstrace import cli
from pkstrace.reports import html

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="needs Debian's chromium package (/usr/bin/chromium) to render "
                              "the report; `make setup` installs it"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Opened:
    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []


def open_report(browser: Any, path: Path, shot: Path | None = None) -> Opened:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    o = Opened(page)
    page.on("console", lambda m: o.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: o.errors.append(str(e)))

    def on_dialog(d: Any) -> None:
        o.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith("file://") and url.endswith(path.name):
            r.continue_()
        else:  # anything else would be a fetch a self-contained page must not make
            o.requests.append(url)
            r.abort()

    page.route("**/*", route)
    # Playwright's default 30 s ran out once while the shared 2-core host had a load
    # average over 20 (the page drew in 3-10 s then): a limit, not a speed target.
    page.set_default_timeout(180_000)
    page.goto(path.as_uri())
    page.wait_for_function("document.querySelectorAll('div.plot').length === "
                           "document.querySelectorAll('div.plot.js-plotly-plot').length")
    page.wait_for_timeout(300)
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
        keep = os.environ.get("PKSTRACE_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / shot.name)
    return o


# Per figure: is there a drawn plot, and how many traces/points does it show?
DRAWN = """() => Array.from(document.querySelectorAll('div.plot')).map(d => ({
  id: d.id,
  svg: d.querySelectorAll('.main-svg').length,
  traces: d.querySelectorAll('g.trace').length,
  heatmapImages: d.querySelectorAll('g.hm image').length,
  points: d.querySelectorAll('g.trace path.point, g.trace .js-line, g.trace path.js-fill')
           .length,
  bars: d.querySelectorAll('g.trace.bars path').length,
}))"""


def report_of(browser: Any, capsys: pytest.CaptureFixture[str], out: Path, *traces: Path,
              shot: Path | None = None) -> Opened:
    """`pkstrace report TRACE [TRACE2] -o OUT`, as a user runs it, then the page opened."""
    rc = cli.main(["report", *map(str, traces), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    return open_report(browser, out, shot)


def assert_all_drawn(o: Opened) -> list[dict[str, Any]]:
    drawn = o.page.evaluate(DRAWN)
    assert drawn, "no figures"
    for d in drawn:
        assert d["svg"] > 0, f"{d['id']}: no plotly SVG"
        assert d["traces"] > 0 or d["heatmapImages"] > 0, f"{d['id']}: no traces drawn"
        assert d["points"] + d["bars"] + d["heatmapImages"] > 0, f"{d['id']}: blank figure"
    return drawn


def assert_clean(o: Opened) -> None:
    assert o.errors == [], o.errors
    assert o.dialogs == [], f"script from the trace ran: {o.dialogs}"
    assert o.requests == [], f"the page fetched: {o.requests[:3]}"
    # Trace strings never became elements.
    assert o.page.evaluate("document.querySelectorAll('img').length") == 0
    assert o.page.evaluate("document.scripts.length") == 3


@pytest.fixture(scope="module")
def synthetic_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reports")
    one, two = d / "v3.html", d / "v3-vs-lazy.html"
    one.write_text(html.render([("v3.pkstrace", synth_findings("v3"))]))
    two.write_text(html.render([("v3", synth_findings("v3")),
                                ("lazy", synth_findings("lazy", seed=2))]))
    return {"one": one, "two": two}


def test_single_report_renders(browser: Any, synthetic_reports: dict[str, Path],
                               tmp_path: Path) -> None:
    o = open_report(browser, synthetic_reports["one"], tmp_path / "report-v3.png")
    assert_clean(o)
    drawn = assert_all_drawn(o)
    assert len(drawn) >= 10
    assert o.page.locator(".js-plotly-plot .main-svg").count() >= 10
    assert (tmp_path / "report-v3.png").stat().st_size > 50_000


def test_hostile_names_stay_text(browser: Any, synthetic_reports: dict[str, Path]) -> None:
    o = open_report(browser, synthetic_reports["one"])
    assert_clean(o)
    body = o.page.evaluate("document.body.innerText")
    assert HOSTILE_COMM in body
    assert HOSTILE_SYMBOL in body
    # ...also inside the figures (axis labels, legends), as SVG text.
    svg_text = o.page.evaluate(
        "Array.from(document.querySelectorAll('.js-plotly-plot text'))"
        ".map(t => t.textContent).join('\\n')")
    assert HOSTILE_COMM in svg_text
    assert HOSTILE_SYMBOL in svg_text
    # Hover text too: hover the redundant-writes bar for the hostile task.
    fig = o.page.locator("#redundant div.plot").first
    fig.scroll_into_view_if_needed()
    bar = fig.locator("g.trace.bars path").last
    box = bar.bounding_box()
    assert box
    o.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    o.page.wait_for_timeout(300)
    hover = o.page.evaluate("Array.from(document.querySelectorAll('.hoverlayer text'))"
                            ".map(t => t.textContent).join(' ')")
    assert HOSTILE_COMM in hover
    assert o.dialogs == []


def test_tables_sort_with_the_keyboard(browser: Any, synthetic_reports: dict[str, Path]) -> None:
    o = open_report(browser, synthetic_reports["one"])
    page = o.page
    # Tab reaches a table header (links and headers are the focusable things).
    for _ in range(200):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.tagName") == "TH":
            break
    else:
        pytest.fail("no table header reachable with Tab")
    th = page.locator("#latency table.sortable").first.locator("th").nth(1)  # calls
    th.focus()
    page.keyboard.press("Enter")
    assert th.get_attribute("aria-sort") == "ascending"
    col = page.locator("#latency table.sortable").first.locator("tbody tr td:nth-child(2)")
    values = [float(v) for v in col.evaluate_all("tds => tds.map(t => t.dataset.v)")]
    assert values == sorted(values)
    page.keyboard.press("Enter")
    assert th.get_attribute("aria-sort") == "descending"
    values = [float(v) for v in col.evaluate_all("tds => tds.map(t => t.dataset.v)")]
    assert values == sorted(values, reverse=True)
    assert_clean(o)


def test_comparison_renders_side_by_side(browser: Any, synthetic_reports: dict[str, Path],
                                         tmp_path: Path) -> None:
    o = open_report(browser, synthetic_reports["two"], tmp_path / "report-compare.png")
    assert_clean(o)
    assert_all_drawn(o)
    text = o.page.locator("#compare").inner_text()
    assert "remote cross-CPU calls: 2,800 → 0 (−2,800, −100%)" in text
    assert o.page.locator("#summary .run").count() == 2


def test_real_fixture_report_renders(browser: Any, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The whole path on a real capture from this host: import, analyse, render, draw."""
    o = report_of(browser, capsys, tmp_path / "ftrace.html", FIXTURES / "ftrace_cpuid_2cpu.txt",
                  FIXTURES / "perf_script_cpuid_2cpu.txt", shot=tmp_path / "report-fixtures.png")
    assert_clean(o)
    assert_all_drawn(o)
    # The latency view has drawn lines for the real cpuid calls to CPU 1.
    legend = o.page.locator("#latency").inner_text()
    assert "cpuid_smp_cpuid" in legend


def test_emulated_pks_comparison_renders(browser: Any, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Real PKS traces recorded in the emulated host (v3: serial wrmsrl_on_cpu walk;
    lazy: no IPIs): every view has data, and the page's differences equal the analysis'."""
    from pkstrace.analysis import analyse
    from pkstrace.importers import open_trace

    a_path = FIXTURES / "emulated_v3_8cpu.pkstrace"
    b_path = FIXTURES / "emulated_lazy_8cpu.pkstrace"
    o = report_of(browser, capsys, tmp_path / "v3-vs-lazy.html", a_path, b_path,
                  shot=tmp_path / "report-emulated.png")
    assert_clean(o)
    assert_all_drawn(o)
    a, b = analyse(open_trace(a_path)), analyse(open_trace(b_path))
    assert len(a.episodes) > 0 and len(a.drift) > 0 and len(a.violations) > 0
    text = o.page.locator("#compare").inner_text()
    ra, rb = a.cross_cpu_summary["remote"], b.cross_cpu_summary["remote"]
    assert f"remote cross-CPU calls: {ra:,} → {rb:,}" in text
    assert f"preempt-count drift episodes: {len(a.drift):,} → 0" in text
    # The PKS-only views are drawn from the v3 trace (left column).
    for sec in ("write-pkrs", "episodes", "isolation", "drift"):
        assert o.page.locator(f"#{sec} .run").first.locator(".js-plotly-plot").count() > 0, sec


def test_emulated_lost_updates_table(browser: Any, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """v3-race: remote cache updates race local write_pkrs(); the lost updates are listed."""
    from pkstrace.analysis import analyse
    from pkstrace.importers import open_trace

    src = FIXTURES / "emulated_v3-race_8cpu.pkstrace"
    o = report_of(browser, capsys, tmp_path / "race.html", src)
    assert_clean(o)
    f = analyse(open_trace(src))
    assert len(f.lost_updates) > 0
    rows = o.page.locator("#lost table tbody tr").count()
    assert rows == min(len(f.lost_updates), html.MAX_TABLE_ROWS)


# Per figure, as plotly drew it: the tick labels on each log axis, whether a legend is
# shown, and each heatmap's colour range and x range.
AXES = """() => Array.from(document.querySelectorAll('div.plot.js-plotly-plot')).map(d => {
  const fl = d._fullLayout;
  const ticks = (ax) => Array.from(d.querySelectorAll('g.' + ax + 'tick text'))
    .map(t => t.textContent).filter(s => s.trim() !== '');
  return {
    id: d.id, title: (fl.title && fl.title.text) || '',
    run: d.closest('.run') ? Array.from(document.querySelectorAll('#' +
         d.closest('section').id + ' .run')).indexOf(d.closest('.run')) : -1,
    xlog: fl.xaxis.type === 'log', ylog: fl.yaxis.type === 'log',
    xticks: ticks('x'), yticks: ticks('y'),
    legend: d.querySelectorAll('g.legend g.traces').length,
    heat: d._fullData.filter(t => t.type === 'heatmap').map(t => [t.zmin, t.zmax]),
    xrange: fl.xaxis.range,
  };
})"""


def assert_axes_readable(o: Opened) -> list[dict[str, Any]]:
    """Every log axis shows at least two labelled ticks (one label cannot be read as a
    scale), and every figure with several traces, or an idle/busy split, has a legend."""
    figs = o.page.evaluate(AXES)
    for f in figs:
        if f["xlog"]:
            assert len(f["xticks"]) >= 2, (f["title"], f["xticks"])
        if f["ylog"]:
            assert len(f["yticks"]) >= 2, (f["title"], f["yticks"])
        if "idle vs busy" in f["title"]:
            assert f["legend"] >= 1, f"{f['title']}: no legend says which state"
    return figs


def test_real_recordings_compared_in_numbers(browser: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Two real recordings of this host (ftrace and perf, different runs of the cpuid
    workload): the comparison states their differences as the analysis counts them,
    the idle/busy split is in numbers, and the axes can be read."""
    from pkstrace.analysis import analyse
    from pkstrace.importers import open_trace

    a_path, b_path = FIXTURES / "ftrace_cpuid_2cpu.txt", FIXTURES / "perf_script_cpuid_2cpu.txt"
    o = report_of(browser, capsys, tmp_path / "two-real.html", a_path, b_path,
                  shot=tmp_path / "report-two-real.png")
    assert_clean(o)
    assert_all_drawn(o)
    assert_axes_readable(o)
    a, b = analyse(open_trace(a_path)), analyse(open_trace(b_path))
    ra, rb = a.cross_cpu_summary["remote"], b.cross_cpu_summary["remote"]
    assert ra != rb
    text = o.page.locator("#compare").inner_text()
    d = rb - ra
    assert (f"remote cross-CPU calls: {ra:,} → {rb:,} "
            f"({'+' if d > 0 else '−'}{abs(d):,}, {'+' if d > 0 else '−'}"
            f"{abs(d) / ra * 100:.0f}%)") in text
    p99a, p99b = (html.fmt_ns(x.cross_cpu_summary["p99_ns"]) for x in (a, b))
    rows = o.page.locator("#diff-table tbody tr").all_inner_texts()
    row = next(r for r in rows if r.startswith("call latency p99"))
    assert f"\t{p99a}\t{p99b}\t{p99a} → {p99b} (" in row, row
    lat = o.page.locator("#latency .run")
    for i, f in enumerate((a, b)):
        s = f.cross_cpu_summary
        t = lat.nth(i).inner_text()
        if s["count_idle"]:
            assert f"target idle: {s['count_idle']:,} calls, p50 " \
                   f"{html.fmt_ns(s['p50_idle_ns'])}" in t
        if s["count_busy"]:
            assert f"target busy: {s['count_busy']:,} calls, p50 " \
                   f"{html.fmt_ns(s['p50_busy_ns'])}" in t


def test_comparison_heatmaps_share_scales(browser: Any, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """v3 vs lazy (emulated host, 958 ms vs 392 ms recorded): each heatmap pair has one
    bin width, one time axis and one colour range, so a colour means the same rate on
    both sides; the episodes' stall axis (1.1-3.5 ms) has readable ticks."""
    o = report_of(browser, capsys, tmp_path / "v3-vs-lazy.html",
                  FIXTURES / "emulated_v3_8cpu.pkstrace", FIXTURES / "emulated_lazy_8cpu.pkstrace")
    assert_clean(o)
    figs = assert_axes_readable(o)
    heat = [f for f in figs if f["heat"]]
    pairs: dict[str, list[dict[str, Any]]] = {}
    for f in heat:
        pairs.setdefault(f["title"].split(" per CPU")[0], []).append(f)
    both = {k: v for k, v in pairs.items() if len(v) == 2}
    assert {"MSR writes", "cross-CPU calls arriving"} <= set(both), list(pairs)
    for name, (fa, fb) in both.items():
        assert {fa["run"], fb["run"]} == {0, 1}, name
        assert fa["heat"] == fb["heat"], name
        assert fa["xrange"] == pytest.approx(fb["xrange"]), name
        bin_a = fa["title"].rsplit("bin ", 1)[1]
        assert bin_a == fb["title"].rsplit("bin ", 1)[1], name
    stall = next(f for f in figs if f["title"].startswith("global-update episodes"))
    assert len(stall["yticks"]) >= 2, stall["yticks"]


def test_keyboard_order_and_visible_focus(browser: Any, synthetic_reports: dict[str, Path]
                                          ) -> None:
    """Tab starts at the skip link, then the views' links in page order, then the
    tables' headers; every focused element shows a focus ring; j/k move between views."""
    o = open_report(browser, synthetic_reports["two"])
    page = o.page
    focus = """() => { const e = document.activeElement; const s = getComputedStyle(e);
      return {tag: e.tagName, text: e.textContent.trim().slice(0, 40),
              href: e.getAttribute('href'), outline: s.outlineStyle,
              width: parseFloat(s.outlineWidth), deco: s.textDecorationLine}; }"""
    seen = []
    for _ in range(40):
        page.keyboard.press("Tab")
        f = page.evaluate(focus)
        seen.append(f)
        assert f["outline"] != "none" and f["width"] > 0 or "underline" in f["deco"], f
        if f["tag"] == "TH":
            break
    assert seen[0]["href"] == "#main"
    nav = [f["href"] for f in seen[1:] if f["tag"] == "A"][:len(html.NAV)]
    assert nav == [f"#{k}" for k, _ in html.NAV]
    assert seen[-1]["tag"] == "TH", "no table header reached with Tab"
    # j / k: next / previous view, its heading focused.
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("j")
    page.keyboard.press("j")
    got = page.evaluate("document.activeElement.id")
    page.keyboard.press("k")
    back = page.evaluate("document.activeElement.id")
    assert got.endswith("-h") and back.endswith("-h") and got != back
    assert_clean(o)


def test_tables_sort_with_the_mouse(browser: Any, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A click on a header sorts a real trace's table by that column (numbers by value,
    not text: 848 µs after 64 µs), a second click reverses it; text columns sort too."""
    o = report_of(browser, capsys, tmp_path / "real.html", FIXTURES / "ftrace_cpuid_2cpu.txt")
    table = o.page.locator("#latency table.sortable").nth(1)  # latency by function
    heads = table.locator("thead th")
    titles = heads.all_inner_texts()
    col = titles.index("max") + 1
    heads.nth(col - 1).click()
    cells = table.locator(f"tbody tr td:nth-child({col})")
    values = [float(v) for v in cells.evaluate_all("tds => tds.map(t => t.dataset.v)")]
    assert len(values) >= 3 and values == sorted(values)
    assert heads.nth(col - 1).get_attribute("aria-sort") == "ascending"
    heads.nth(col - 1).click()
    values = [float(v) for v in cells.evaluate_all("tds => tds.map(t => t.dataset.v)")]
    assert values == sorted(values, reverse=True)
    heads.nth(0).click()  # function names
    names = table.locator("tbody tr td:nth-child(1)").all_inner_texts()
    assert names == sorted(names, key=str.lower)
    assert_clean(o)
