"""`pkstrace export`: Perfetto / Chrome trace-event JSON, and findings tables as CSV/Parquet."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_report_synth import HOSTILE_COMM, HOSTILE_SYMBOL, synth_findings

from pkstrace import cli, schema
from pkstrace.analysis import analyse
from pkstrace.analysis import findings as fd
from pkstrace.importers import open_trace
from pkstrace.reports import perfetto, tables

FIXTURES = Path(__file__).parent / "fixtures"


def synth_trace(n_cpus: int = 8, start: int = 1_000_000_000) -> schema.Trace:
    """MSR writes on every CPU (timer MSR and PKRS), as a schema events table."""
    rng = np.random.default_rng(3)
    n = 5000
    ts = np.sort(rng.integers(start, start + 500_000_000, n))
    msr = np.where(rng.random(n) < 0.3, schema.MSR_PKRS, 0x6E0)
    ev = schema.normalize({
        "ts": ts, "cpu": rng.integers(0, n_cpus, n), "pid": np.full(n, 321),
        "comm": np.full(n, HOSTILE_COMM, dtype=object), "kind": np.full(n, "msr_write"),
        "msr": msr, "value": rng.integers(0, 1 << 32, n).astype(np.uint64)})
    meta = schema.TraceMeta(host={"hostname": "<b>guest</b>", "online_cpus": list(range(n_cpus)),
                                  "isolated_cpus": [6, 7]},
                            window={"start_ns": start, "end_ns": start + 500_000_000},
                            backend="tracefs", source="synthetic")
    return schema.Trace(events=ev, meta=meta)


def check_chrome_trace(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Validate the trace-event format; return events by phase."""
    assert isinstance(doc["traceEvents"], list)
    by_ph: dict[str, list[dict[str, Any]]] = {}
    for e in doc["traceEvents"]:
        assert e["ph"] in {"M", "X", "s", "f", "C", "i"}, e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        assert isinstance(e["name"], str), e
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)), e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
        if e["ph"] == "i":
            assert e["s"] == "t", e
        by_ph.setdefault(e["ph"], []).append(e)
    assert_nested(by_ph.get("X", []))
    return by_ph


def assert_nested(slices: list[dict[str, Any]]) -> None:
    """Complete slices on one track must nest (viewers drop ones that straddle)."""
    by_tid: dict[int, list[tuple[float, float]]] = {}
    for x in slices:
        by_tid.setdefault(x["tid"], []).append((x["ts"], x["ts"] + x["dur"]))
    for tid, spans in by_tid.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[float] = []
        for a, b in spans:
            while stack and stack[-1] <= a:
                stack.pop()
            assert not stack or b <= stack[-1] + 1e-9, f"tid {tid}: slice {a}-{b} straddles"
            stack.append(b)


def check_flows(by_ph: dict[str, list[dict[str, Any]]]) -> int:
    """Every flow start has exactly one finish (same id, cat, name), later, on a slice."""
    starts = {e["id"]: e for e in by_ph.get("s", [])}
    finishes = Counter(e["id"] for e in by_ph.get("f", []))
    assert len(starts) == len(by_ph.get("s", [])), "duplicate flow ids"
    assert set(starts) == set(finishes) and set(finishes.values()) <= {1}
    slices: dict[int, list[tuple[float, float]]] = {}
    for x in by_ph.get("X", []):
        slices.setdefault(x["tid"], []).append((x["ts"], x["ts"] + x["dur"]))

    def inside(tid: int, ts: float) -> bool:
        return any(a <= ts <= b for a, b in slices.get(tid, []))

    for f in by_ph.get("f", []):
        s = starts[f["id"]]
        assert (s["cat"], s["name"]) == (f["cat"], f["name"])
        assert f["bp"] == "e"
        assert f["ts"] >= s["ts"]
        assert inside(s["tid"], s["ts"]), f"flow {s['id']} starts outside a slice"
        assert inside(f["tid"], f["ts"]), f"flow {f['id']} ends outside a slice"
    return len(starts)


def test_perfetto_synthetic(tmp_path: Path) -> None:
    f = synth_findings("v3")
    trace = synth_trace()
    out = tmp_path / "t.json"
    counts = perfetto.write_perfetto(out, trace, f)
    doc = json.loads(out.read_text())
    by_ph = check_chrome_trace(doc)
    n_flows = check_flows(by_ph)
    remote = f.calls[~f.calls["local"]]
    assert n_flows == counts["flows"] == len(remote)
    # One handler slice per call on the target CPU, named by its function (hostile kept exact).
    handlers = [x for x in by_ph["X"] if x.get("cat") == "csd" and "sender" in x["args"]]
    assert len(handlers) == len(f.calls)
    assert {x["name"] for x in handlers} == set(f.calls["func"])
    assert HOSTILE_SYMBOL in {x["name"] for x in handlers}
    assert HOSTILE_COMM in {x["args"]["sender"] for x in handlers}
    # Timestamps: µs since the window start, exact to the ns.
    first = f.calls.iloc[0]
    h0 = next(x for x in handlers if x["tid"] == first["target_cpu"]
              and abs(x["ts"] - (first["entry_ns"] - 1_000_000_000) / 1000) < 1e-6)
    assert h0["dur"] == pytest.approx((first["exit_ns"] - first["entry_ns"]) / 1000, abs=1e-6)
    # Named tracks per CPU, isolated ones said so.
    names = {e["tid"]: e["args"]["name"] for e in by_ph["M"] if e["name"] == "thread_name"}
    assert names[6] == "CPU 6 (isolated)" and names[0] == "CPU 0"
    # MSR write counters add up to the writes; PKRS value counters, one per PKRS write.
    per_bin = [e for e in by_ph["C"] if "MSR writes" in e["name"]]
    assert sum(sum(e["args"].values()) for e in per_bin) == len(trace.events)
    pkrs = [e for e in by_ph["C"] if e["name"].endswith("PKRS value")]
    assert len(pkrs) == int((trace.events["msr"] == schema.MSR_PKRS).sum())
    # Isolation violations are instants on the isolated CPU.
    assert len(by_ph["i"]) == len(f.violations)
    assert {e["tid"] for e in by_ph["i"]} == {6, 7}


def test_perfetto_real_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = FIXTURES / "ftrace_cpuid_2cpu.txt"
    out = tmp_path / "fixture.json"
    assert cli.main(["export", str(src), "--format", "perfetto", "-o", str(out)]) == 0
    assert "flows" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    by_ph = check_chrome_trace(doc)
    n_flows = check_flows(by_ph)
    f = analyse(open_trace(src))
    remote = f.calls[~f.calls["local"].astype(bool)]
    assert n_flows == len(remote) > 100
    # The workload's 200 preads of /dev/cpu/1/cpuid from CPU 0 run cpuid_smp_cpuid on
    # CPU 1; its 50 local preads run it on CPU 0: slices on the right tracks.
    cpuid = Counter((x["tid"], x["args"]["source_cpu"]) for x in by_ph["X"]
                    if x["name"] == "cpuid_smp_cpuid")
    calls = f.calls[f.calls["func"] == "cpuid_smp_cpuid"]
    assert cpuid[(1, 0)] == int((calls["target_cpu"] == 1).sum()) >= 190
    assert cpuid[(0, 0)] == int((calls["target_cpu"] == 0).sum()) == 50
    assert any(e["ph"] == "C" for e in doc["traceEvents"])


def test_tables_csv_and_parquet(tmp_path: Path) -> None:
    f = synth_findings("v3")
    for fmt in ("csv", "parquet"):
        out = tmp_path / fmt
        written = tables.write_tables(f, out, fmt)
        assert {p.name for p in written} == {f"{n}.{fmt}" for n in tables.findings_tables(f)}
        read = pd.read_csv if fmt == "csv" else pd.read_parquet
        calls = read(out / f"calls.{fmt}")
        assert list(calls.columns) == fd.CALLS_COLUMNS
        assert len(calls) == len(f.calls)
        assert calls["latency_ns"].sum() == f.calls["latency_ns"].sum()
        assert set(calls["comm"]) == set(f.calls["comm"])  # hostile names kept verbatim
        ep = read(out / f"episodes.{fmt}")
        assert list(ep.columns) == fd.EPISODE_COLUMNS and len(ep) == len(f.episodes)
        # Empty tables still carry their documented columns.
        lost = read(out / f"lost_updates.{fmt}")
        assert list(lost.columns) == fd.LOST_UPDATE_COLUMNS
        summary = read(out / f"summary.{fmt}")
        row = summary[(summary["section"] == "cross_cpu_calls") & (summary["key"] == "remote")]
        assert row["value"].astype(str).tolist() == ["2800"]


def test_tables_of_empty_findings(tmp_path: Path) -> None:
    from pkstrace.analysis.findings import Findings

    written = tables.write_tables(Findings(), tmp_path / "t", "parquet")
    df = pd.read_parquet(tmp_path / "t" / "violations.parquet")
    assert list(df.columns) == fd.VIOLATION_COLUMNS and len(df) == 0
    assert len(written) == len(tables.findings_tables(Findings()))


def test_tables_refuse_to_overwrite(tmp_path: Path) -> None:
    f = synth_findings("lazy")
    tables.write_tables(f, tmp_path, "csv")
    with pytest.raises(tables.ExportError, match="exists"):
        tables.write_tables(f, tmp_path, "csv")
    tables.write_tables(f, tmp_path, "csv", force=True)


def test_export_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["export", str(tmp_path / "nope.pkstrace"), "--format", "csv",
                   "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pkstrace export: error:") and err.count("\n") == 1
    rc = cli.main(["export", str(FIXTURES / "ftrace_cpuid_2cpu.txt"), "--format", "perfetto",
                   "-o", str(tmp_path / "missing-dir" / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and err.count("\n") == 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\x01 not a trace \xff")
    rc = cli.main(["export", str(bad), "--format", "perfetto", "-o", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_perfetto_emulated_pks(tmp_path: Path) -> None:
    """Real PKS trace (emulated host, v3): PKRS value counters, violation instants."""
    src = FIXTURES / "emulated_v3_8cpu.pkstrace"
    trace = open_trace(src)
    f = analyse(trace)
    out = tmp_path / "v3.json"
    perfetto.write_perfetto(out, trace, f)
    by_ph = check_chrome_trace(json.loads(out.read_text()))
    remote = f.calls[~f.calls["local"].astype(bool)]
    assert check_flows(by_ph) == len(remote) > 0
    ev = trace.events
    pkrs_writes = int(((ev["kind"] == "msr_write") & (ev["msr"] == schema.MSR_PKRS)).sum())
    pkrs = [e for e in by_ph["C"] if e["name"].endswith("PKRS value")]
    assert len(pkrs) == pkrs_writes > 0
    assert len(by_ph["i"]) == len(f.violations) > 0
    isolated = set(f.isolated_cpus)
    assert {e["tid"] for e in by_ph["i"]} <= isolated
    names = {e["tid"]: e["args"]["name"] for e in by_ph["M"] if e["name"] == "thread_name"}
    assert all(names[c].endswith("(isolated)") for c in isolated)
