"""benchmarks/run_all.py: runs the scripts, summarises, plots; never touches committed results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


def _load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_ipi_through_runner(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/cpu/1/cpuid"):
        pytest.skip("bench_ipi needs root and /dev/cpu/1/cpuid (CONFIG_X86_CPUID, 2 CPUs)")
    committed = ROOT / "benchmarks" / "results" / "ipi.json"
    before = committed.stat().st_mtime if committed.exists() else None
    res = subprocess.run([sys.executable, str(RUN_ALL), "--smoke", "--only", "ipi",
                          "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "run_all.json").read_text())
    assert summary["smoke"] is True and summary["git_rev"]
    assert summary["host"]["online_cpus"]
    [run] = summary["benchmarks"]
    assert run["name"] == "ipi" and run["exit_status"] == 0 and run["fresh"]
    doc = json.loads((tmp_path / "ipi.json").read_text())
    assert doc["kind"] == "pkstrace-calibration" and doc["smoke"] is True
    html = (tmp_path / "summary.html").read_text()
    assert "plotly" in html and "serial walk vs broadcast" in html
    # The committed results are untouched by a test run.
    assert (committed.stat().st_mtime if committed.exists() else None) == before


def test_unknown_benchmark_name_fails_cleanly(tmp_path):
    res = subprocess.run([sys.executable, str(RUN_ALL), "--only", "nosuch",
                          "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "no benchmark named ['nosuch']" in res.stderr and "Traceback" not in res.stderr


def test_collect_targets_reads_list_and_dict_forms():
    run_all = _load_run_all()
    results = {
        "overhead": {"targets": [{"target": "a <= b", "measure": "bpf_stats", "value": 90.0,
                                  "limit": 100.0, "unit": "ns/event", "met": True}]},
        "analysis": {"targets": {"10M events/s": {"value": 4e6, "limit": 1e7, "met": False}}},
        "broken": {"error": "unreadable"},
    }
    rows = run_all.collect_targets(results)
    assert [(r["benchmark"], r["target"], r["met"]) for r in rows] == [
        ("overhead", "a <= b", True), ("analysis", "10M events/s", False)]
    assert run_all._cost_ratio(rows[0]) == pytest.approx(0.9)
    assert run_all._cost_ratio(rows[1]) == pytest.approx(2.5)  # 2.5x short of the floor
    html = run_all.render_summary(results, rows, [], {"host": {}, "created": "now"})
    assert "10M events/s" in html and "MISSED" in html
