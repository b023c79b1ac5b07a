"""The analysis on real traces recorded on this host (tests/fixtures/capture.sh).

Workload: 200 synchronous cpuid cross-CPU calls from CPU 0 to CPU 1, then 50 run
locally on CPU 0, a correct kernel without PKS: expect the calls, no drift and no
lost updates, and never a redundant write of a command MSR (the x2APIC ICR is
written with the same value hundreds of times).
"""

from __future__ import annotations

import numpy as np
import pytest

from pkstrace.analysis import analyse
from pkstrace.importers import open_trace

FTRACE = "ftrace_cpuid_2cpu.txt"
PERF = "perf_script_cpuid_2cpu.txt"


@pytest.fixture(scope="module")
def ftrace_findings(request):
    path = request.path.parent / "fixtures" / FTRACE
    return analyse(open_trace(path), isolated=[1])


def test_cpuid_calls_to_cpu1_are_matched_with_plausible_latency(ftrace_findings):
    c = ftrace_findings.calls
    cpuid = c[(c["func"] == "cpuid_smp_cpuid") & ~c["local"]]
    assert 190 <= len(cpuid) <= 200
    assert (cpuid["source_cpu"] == 0).all() and (cpuid["target_cpu"] == 1).all()
    lat = cpuid["latency_ns"].to_numpy()
    assert (lat > 0).all() and (lat < 10_000_000).all()
    assert (cpuid["handler_ns"].dropna() >= 0).all()
    # the 50 preads on CPU 0 ran the function locally (csd=(nil))
    local = c[(c["func"] == "cpuid_smp_cpuid") & c["local"]]
    assert 45 <= len(local) <= 50 and (local["target_cpu"] == 0).all()
    per_func = ftrace_findings.latency_per_func.set_index("func")
    row = per_func.loc["cpuid_smp_cpuid"]
    assert row["count"] == len(cpuid)
    assert row["p50_ns"] == int(round(np.percentile(lat, 50)))
    assert row["p50_ns"] <= row["p90_ns"] <= row["p99_ns"] <= row["max_ns"]


def test_correct_kernel_has_no_drift_no_lost_updates_no_episodes(ftrace_findings):
    f = ftrace_findings
    assert len(f.drift) == 0
    assert len(f.lost_updates) == 0
    # a 2-CPU host cannot walk two remote CPUs: no global-update episodes
    assert len(f.episodes) == 0


def test_command_msr_writes_are_never_redundant(ftrace_findings):
    r = ftrace_findings.redundant_by_cpu_msr.set_index(["cpu", "msr"])
    assert r.loc[(0, 0x830), "writes"] > 100  # same ICR value over and over
    assert r.loc[(0, 0x830), "redundant"] == 0
    assert ftrace_findings.redundant_total == int(r["redundant"].sum())


def test_each_call_to_an_isolated_cpu_is_one_violation(ftrace_findings):
    f = ftrace_findings
    v = f.violations
    cpuid_v = v[v["func"] == "cpuid_smp_cpuid"]
    # 200 queued calls, each with an IPI, an entry, an exit and an ICR write on CPU 1:
    # exactly one violation each
    assert len(cpuid_v) == 200
    assert set(cpuid_v["via"]) == {"csd"} and not cpuid_v["tracer_induced"].any()
    # enabling the tracepoints patched kernel text: do_sync_core IPIs, the tracer's own
    sync = v[v["func"] == "do_sync_core"]
    assert len(sync) > 0 and sync["tracer_induced"].all()
    assert (v["target_cpu"] == 1).all()


def test_counts_add_up_and_name_msrs(ftrace_findings):
    f = ftrace_findings
    assert f.counts["count"].sum() == f.trace["events"]
    msrs = set(f.counts["msr"].dropna().astype(int))
    assert msrs == {0x6E0, 0x830}
    assert set(f.activity["series"]) >= {"msr_write", "csd_in", "csd_out", "ipi_in"}


def test_perf_script_capture_without_cpu1_entries_is_not_mispaired(fixtures):
    """perf's capture holds the 200 cpuid queues to CPU 1 but not CPU 1's entries
    (only 12 csd entries on CPU 1 survived): they must stay unmatched."""
    f = analyse(open_trace(fixtures / PERF))
    c = f.calls
    assert len(c[(c["func"] == "cpuid_smp_cpuid") & ~c["local"]]) == 0
    assert f.cross_cpu_summary["unmatched_queue"] >= 200
    remote = c[~c["local"]]
    assert (remote["latency_ns"] > 0).all() and (remote["latency_ns"] < 10_000_000).all()
    assert len(f.drift) == 0 and len(f.lost_updates) == 0
    assert f.redundant_by_cpu_msr.set_index(["cpu", "msr"]).loc[(0, 0x830), "redundant"] == 0
