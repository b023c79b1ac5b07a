"""Counts-mode traces: the analysis reads the kernel's aggregates (meta.aggregates).

The live test records a REAL counts-mode trace with the bcc backend (200 cross-CPU
calls from CPU 0 to CPU 1) and replays it; the others check the bucket arithmetic
on histograms with known answers and bad aggregates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from workload import CALLED_FUNC, workload_command

from pkstrace import schema, tracefile
from pkstrace.analysis import analyse
from pkstrace.analysis.aggregates import bucket_stats

PKSTRACE = [sys.executable, "-m", "pkstrace"]
N = 200


def replay(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PKSTRACE, "replay", str(path), *extra], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.live
def test_replay_of_a_real_counts_recording(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to attach BPF programs to the running kernel")
    if not os.path.exists("/dev/cpu/1/cpuid"):
        pytest.skip("needs /dev/cpu/1/cpuid (CONFIG_X86_CPUID and a second CPU)")
    from pkstrace.backends import checks

    problem = checks.backend_problem("bcc")
    if problem:
        pytest.skip(f"bcc cannot run here: {problem}")
    out = tmp_path / "counts.pkstrace"
    rec = subprocess.run([*PKSTRACE, "record", "--backend", "bcc", "--mode", "counts",
                          "-o", str(out), "--no-status", "-q", "--",
                          *workload_command(N)], capture_output=True, text=True, timeout=180)
    assert rec.returncode == 0, rec.stderr
    meta = tracefile.read_meta(out)
    agg = meta.aggregates
    assert meta.mode == "counts" and agg["format"] == 1

    p = replay(out, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    # counts: exactly the kernel's per-CPU aggregates
    want = {(r["cpu"], r["kind"], r["msr"]): r["count"] for r in agg["per_cpu"]}
    got = {(r["cpu"], r["kind"], r["msr"]): r["count"] for r in doc["counts"]}
    assert got == want and sum(got.values()) == doc["trace"]["counted_events"] > 0
    assert all(r["msr"] is None or isinstance(r["msr"], int) for r in doc["counts"])
    # cross-CPU latency from the histograms
    cc = doc["cross_cpu_calls"]
    hist = [r for r in agg["latency_log2"] if r["count"]]
    assert cc["remote"] == sum(r["count"] for r in hist) >= N
    per_func = {r["func"]: r for r in cc["per_func"]}
    ours = per_func[CALLED_FUNC]
    assert ours["count"] >= N
    assert ours["p50_ns"] <= ours["p90_ns"] <= ours["p99_ns"] <= ours["max_ns"]
    # the median lies in the bucket holding the median call
    mine = sorted((r for r in hist if r["func"] == CALLED_FUNC), key=lambda r: r["slot"])
    counts = np.array([r["count"] for r in mine])
    k = int(np.searchsorted(np.cumsum(counts), counts.sum() / 2))
    assert mine[k]["low_ns"] <= ours["p50_ns"] <= mine[k]["high_ns"]
    assert 1_000 < ours["p50_ns"] < 10_000_000  # a real cross-CPU call on this host
    assert any(r["target_cpu"] == 1 and r["count"] >= N for r in cc["per_target_cpu"])
    assert any("log2" in n for n in doc["notes"])

    t = replay(out)
    assert t.returncode == 0, t.stderr
    assert "events counted in the kernel" in t.stdout
    assert CALLED_FUNC in t.stdout and "log2 buckets" in t.stdout


def test_bucket_percentiles_known_answers() -> None:
    # 50 calls in [1024, 2048), 50 in [2048, 4096): the median is the boundary,
    # p90 is 80% into the upper bucket
    st = bucket_stats(np.array([2048, 1024]), np.array([4096, 2048]), np.array([50, 50]))
    assert st["p50_ns"] == 2048
    assert st["p90_ns"] == round(2048 + 2048 * 0.8)
    assert st["p99_ns"] == round(2048 + 2048 * 0.98)
    assert st["max_ns"] == 4096
    assert st["mean_ns"] == round((1536 * 50 + 3072 * 50) / 100)
    # one bucket: linear inside it
    st = bucket_stats(np.array([0]), np.array([2]), np.array([4]))
    assert (st["p50_ns"], st["max_ns"]) == (1, 2)


def _counts_trace(agg: dict) -> schema.Trace:
    meta = schema.TraceMeta(mode="counts", backend="bcc", aggregates=agg,
                            window={"start_ns": 0, "end_ns": 1_000_000})
    return schema.Trace(events=schema.empty_events(), meta=meta)


AGG = {
    "format": 1,
    "per_cpu": [{"cpu": 0, "kind": "csd_queue", "msr": None, "count": 30},
                {"cpu": 1, "kind": "csd_entry", "msr": None, "count": 25},
                {"cpu": 2, "kind": "csd_entry", "msr": None, "count": 12},
                {"cpu": 0, "kind": "msr_write", "msr": 0x830, "count": 30}],
    "calls": [{"source_cpu": 0, "target_cpu": 1, "func": "f", "count": 20},
              {"source_cpu": 0, "target_cpu": 2, "func": "f", "count": 10}],
    # the same func on two targets: its per-func row adds their buckets
    "latency_log2": [
        {"target_cpu": 1, "func": "f", "slot": 10, "low_ns": 1024, "high_ns": 2048, "count": 20},
        {"target_cpu": 2, "func": "f", "slot": 10, "low_ns": 1024, "high_ns": 2048, "count": 5},
        {"target_cpu": 2, "func": "f", "slot": 12, "low_ns": 4096, "high_ns": 8192, "count": 5},
    ],
    "unmatched_entries": 1, "inflight_at_end": 0,
}


def test_counts_trace_synthetic_answers() -> None:
    f = analyse(_counts_trace(AGG))
    assert f.trace["counted_events"] == 97
    assert len(f.counts) == 4 and int(f.counts["count"].sum()) == 97
    s = f.cross_cpu_summary
    # 37 entries = 30 matched remote + 1 unmatched remote + 6 run locally
    assert (s["remote"], s["local"], s["unmatched_entry"]) == (30, 6, 1)
    assert s["p50_ns"] == round(1024 + 1024 * 15 / 25)  # rank 15 of 25 in [1024, 2048)
    assert s["max_ns"] == 8192
    pf = f.latency_per_func
    assert list(pf["func"]) == ["f"] and int(pf["count"].iloc[0]) == 30
    assert int(pf["p50_ns"].iloc[0]) == s["p50_ns"]
    pt = f.latency_per_target_cpu.set_index("target_cpu")
    assert int(pt.loc[1, "count"]) == 20 and int(pt.loc[2, "count"]) == 10
    assert int(pt.loc[2, "p50_ns"]) == 2048  # rank 5 of 10: the top of the first bucket
    assert int(pt.loc[2, "p90_ns"]) == round(4096 + 4096 * 4 / 5)
    assert any("log2" in n for n in f.notes)
    doc = f.to_json()
    assert [r["msr"] for r in doc["counts"]] == [0x830, None, None, None]


@pytest.mark.parametrize("bad, message", [
    ({**AGG, "format": 7}, "format 7"),
    ({**AGG, "per_cpu": "lots"}, "per_cpu is not a list"),
    ({**AGG, "latency_log2": [{"target_cpu": 1, "func": "f", "low_ns": 8, "high_ns": 4,
                               "count": 1}]}, "high_ns"),
    ({**AGG, "calls": [{"source_cpu": 0, "target_cpu": 1, "func": "f", "count": "x"}]},
     "not an integer"),
])
def test_bad_aggregates_are_one_line_errors(tmp_path: Path, bad: dict, message: str) -> None:
    path = tmp_path / "bad.pkstrace"
    tracefile.write_trace(path, _counts_trace(bad))
    p = replay(path)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_events_mode_empty_trace_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.pkstrace"
    meta = schema.TraceMeta(mode="events", aggregates=AGG)
    tracefile.write_trace(path, schema.Trace(events=schema.empty_events(), meta=meta))
    p = replay(path)
    assert p.returncode == 2 and "no events" in p.stderr


def test_counts_table_matches_the_events_path_shape() -> None:
    f = analyse(_counts_trace(AGG))
    assert list(f.counts.columns) == ["cpu", "kind", "msr", "count"]
    assert f.counts["msr"].dtype == object
    # ordered by (cpu, kind as in schema.KINDS, msr), as the events path orders them
    assert list(zip(f.counts["cpu"], f.counts["kind"], strict=True)) == [
        (0, "msr_write"), (0, "csd_queue"), (1, "csd_entry"), (2, "csd_entry")]
    assert f.counts["msr"].iloc[1] is None
