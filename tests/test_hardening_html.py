"""Hostile strings from a trace file reach the HTML dashboard as text, end to end.

A real capture of this host (tests/fixtures/ftrace_cpuid_2cpu.txt) with its task name
replaced by ``<script>alert(1)</script>`` and its cross-CPU function and call sites by
names carrying ``onerror=``: imported, analysed and rendered by the real CLI, then
opened in headless Chromium with the report engineer's helpers
(tests/test_report_browser.py): no dialog, no injected element, no request, and the
strings are shown verbatim.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_report_browser import CHROMIUM, assert_clean, browser, open_report  # noqa: F401

from pkstrace import cli

FIXTURE = Path(__file__).parent / "fixtures" / "ftrace_cpuid_2cpu.txt"
TASK = "<script>alert(1)</script>"
FUNC = "<img/src=x/onerror=alert(2)>"
CALLSITE = "x'onerror='alert(3)"
HOST_NOTE = "</title><svg/onload=alert(4)>"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="needs Debian's chromium package (/usr/bin/chromium)"),
]


def hostile_capture(tmp: Path) -> Path:
    text = FIXTURE.read_text()
    text = text.replace("            bash-", f"{TASK:>16}-")
    text = text.replace("func=do_sync_core", f"func={FUNC}")
    text = text.replace("callsite=on_each_cpu_cond_mask", f"callsite={CALLSITE}")
    out = tmp / "hostile.txt"
    out.write_text(text)
    return out


def test_hostile_names_from_a_trace_stay_text(browser: Any, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = hostile_capture(tmp_path)
    trace = tmp_path / "hostile.pkstrace"
    assert cli.main(["import", str(src), "-o", str(trace), "-q"]) == 0
    from pkstrace import tracefile

    ev = tracefile.read_trace(trace).events
    assert (ev["comm"] == TASK).sum() > 100 and (ev["func"] == FUNC).sum() > 10
    assert ev["callsite"].astype(str).str.startswith(CALLSITE).sum() > 10
    page = tmp_path / "hostile.html"
    assert cli.main(["report", str(trace), "-o", str(page), "--title", HOST_NOTE]) == 0
    capsys.readouterr()
    o = open_report(browser, page, tmp_path / "hostile.png")
    assert_clean(o)  # no console error, dialog, request, <img>, or extra <script>
    assert o.page.evaluate("document.querySelectorAll('svg[onload], [onerror]').length") == 0
    body = o.page.evaluate("document.body.innerText")
    svg_text = o.page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot text'))"
                               ".map(t => t.textContent).join('\\n')")
    shown = body + "\n" + svg_text
    for s in (TASK, FUNC, CALLSITE):
        assert s in shown, f"{s!r} not shown as text"
    assert HOST_NOTE in o.page.title() or HOST_NOTE in body
