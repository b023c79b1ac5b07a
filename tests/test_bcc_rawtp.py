"""bcc raw tracepoint programs (``--bpf-attach raw``, the default) against classic ones
(``tp``), on the live kernel.

Both kinds attached at once see the same kernel events: each tracepoint hit runs
the classic program (through perf) and the raw one. So two recorders side by side,
one per kind, must record the same rows, field by field (the raw programs decode
TP_PROTO arguments and task_struct themselves; the classic ones read the
tracepoint's formatted record), except for the runs the kernel skipped, which
each recorder counts (recursion misses).
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_record_live import PKSTRACE, need_backend
from workload import CALLED_FUNC, cross_cpu_calls, foreign_slow_bpf, workload_command

from pkstrace import schema, tracefile

N = 2000

# Row fields compared between the two recorders (ts differs: each program takes its
# own). comm is compared for sched_switch rows only: elsewhere it is not in the
# record but looked up per pid by the reader (and /proc read at different times).
FIELDS = ["cpu", "kind", "pid", "msr", "value", "failed", "target_cpu", "cpumask",
          "callsite", "func", "csd", "vector", "next_pid", "next_comm", "prev_state"]


def need_raw() -> None:
    need_backend("bcc")
    from pkstrace.backends.bcc import kernel_has_raw_tracepoints

    if not kernel_has_raw_tracepoints():
        pytest.skip("raw tracepoints need Linux >= 4.17")


def bcc_backend(attach: str, mode: str = "events", buffer: str = "auto"):  # noqa: ANN201
    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.bcc import BccBackend
    from pkstrace.backends.symbols import function_names

    specs, _ = plan_probes(RecordOptions(), function_names(), False, False)
    return BccBackend(specs, mode=mode, bpf_attach=attach, bpf_buffer=buffer)


def quiet_cut(ts: np.ndarray, start: int, end: int) -> int:
    """The middle of the longest gap between events in [start, end] (ns)."""
    inside = np.sort(ts[(ts >= start) & (ts <= end)])
    edges = np.concatenate([[start], inside, [end]])
    k = int(np.argmax(np.diff(edges)))
    return int((edges[k] + edges[k + 1]) // 2)


def rows(events: pd.DataFrame) -> collections.Counter:
    df = events[FIELDS].copy()
    df["comm"] = np.where(events["kind"] == "sched_switch", events["comm"], "")
    return collections.Counter(map(tuple, df.astype(str).to_numpy().tolist()))


def skipped(backend) -> int:  # noqa: ANN001 - a BccBackend after drain()
    return sum(backend.lost_events().values())


def slow_write_msr_probes(where: Path) -> Path:
    """probes/ with rawtp_write_msr's body made 20 us longer: an interrupt's MSR write
    then often comes while it runs, the nesting its twin program is there for (3 us
    gave 26 such writes in one run and none in another)."""
    src = (Path(__file__).resolve().parents[1] / "probes" / "pkstrace.bpf.c").read_text()
    old = ("    msr_event(ctx, KIND_MSR_WRITE, (u32)ctx->args[0], ctx->args[1], "
           "(int)ctx->args[2]);\n#ifdef WRITE_MSR_TWIN\n    if (busy)\n")
    assert src.count(old) == 1
    spin = ("    { u64 t0 = bpf_ktime_get_ns(); for (int i = 0; i < 2000; i++) "
            "{ if (bpf_ktime_get_ns() - t0 > 20000) break; } }\n")
    where.mkdir()
    slow = old.replace("#ifdef", spin + "#ifdef", 1)
    (where / "pkstrace.bpf.c").write_text(src.replace(old, slow))
    return where


@pytest.mark.parametrize("raw_buffer,slow_msr", [("ring", False), ("perf", False),
                                                  ("ring", True)])
def test_raw_and_classic_record_the_same_events(raw_buffer: str, slow_msr: bool,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Side by side on one workload: per (CPU, kind) the same counts, and the same
    rows field by field, but for the runs either recorder reports as lost. With a
    slow write_msr program, its twin records the MSR writes the kernel skipped it
    for, each once."""
    need_raw()
    from pkstrace.backends.bcc import kernel_has_per_program_guard

    if slow_msr:
        if not kernel_has_per_program_guard():
            pytest.skip("write_msr's twin needs the per-program guard (Linux 6.1+)")
        monkeypatch.setenv("PKSTRACE_PROBES", str(slow_write_msr_probes(tmp_path / "p")))
    raw, classic = bcc_backend("raw", buffer=raw_buffer), bcc_backend("tp")
    with raw, classic:
        raw.attach()
        classic.attach()
        assert raw.extra()["attach"]["classic"] == {}  # every tracepoint raw here
        assert classic.extra()["attach"]["raw"] == []
        t0 = time.monotonic_ns()
        time.sleep(0.1)
        t1 = time.monotonic_ns()
        cross_cpu_calls(N, target_cpu=1, source_cpu=0)
        t2 = time.monotonic_ns()
        time.sleep(0.1)
        t3 = time.monotonic_ns()
        raw.stop()
        classic.stop()
        ev_raw, ev_classic = raw.drain(), classic.drain()
        lost = skipped(raw) + skipped(classic)
    if slow_msr:
        took = raw.guard["write_msr_twin_took"]
        assert took > 0, raw.guard
        skips = raw.guard["skipped_by_kernel"]["rawtp_write_msr"]
        assert raw.misses.get("rawtp_write_msr", 0) == skips - took, (raw.guard, raw.misses)
    # The window both recorded all along: cut where neither saw anything for longest,
    # so no event's two timestamps (one per program) fall on either side of a cut.
    both_ts = np.concatenate([ev_raw["ts"].to_numpy(), ev_classic["ts"].to_numpy()])
    lo, hi = quiet_cut(both_ts, t0 + 10_000_000, t1), quiet_cut(both_ts, t2, t3)
    a = ev_raw[(ev_raw["ts"] > lo) & (ev_raw["ts"] < hi)]
    b = ev_classic[(ev_classic["ts"] > lo) & (ev_classic["ts"] < hi)]
    per_kind_a = a.groupby(["cpu", "kind"], observed=True).size()
    per_kind_b = b.groupby(["cpu", "kind"], observed=True).size()
    diff = per_kind_a.sub(per_kind_b, fill_value=0).abs()
    assert diff.sum() <= lost, (diff[diff > 0], lost)
    ours = a[(a["kind"] == "csd_queue") & (a["func"] == CALLED_FUNC) & (a["target_cpu"] == 1)]
    assert len(ours) >= N - lost
    for kind in ("sched_switch", "msr_write", "csd_entry", "callfunc_entry", "ipi_send"):
        assert per_kind_a.xs(kind, level="kind").sum() > 0, kind
    ra, rb = rows(a), rows(b)
    only = (ra - rb) + (rb - ra)
    assert sum(only.values()) <= lost, list(only.items())[:5]


def test_raw_and_classic_count_the_same() -> None:
    """Counts mode side by side, switched on and off within microseconds of each
    other: the same per-(CPU, kind, MSR) counts and the same workload calls."""
    need_raw()
    raw, classic = bcc_backend("raw", "counts"), bcc_backend("tp", "counts")
    with raw, classic:
        raw.attach()
        raw._switch(False)  # off until both are attached (the classic one compiles)
        classic.attach()
        classic._switch(False)
        raw._switch(True)
        classic._switch(True)
        cross_cpu_calls(N, target_cpu=1, source_cpu=0)
        raw._switch(False)
        classic._switch(False)
        raw.stop()
        classic.stop()
        agg = {"raw": raw.aggregates(), "tp": classic.aggregates()}
        lost = skipped(raw) + skipped(classic)
    counts = {k: pd.DataFrame(a["per_cpu"]).fillna({"msr": -1})
              .groupby(["cpu", "kind", "msr"])["count"].sum() for k, a in agg.items()}
    diff = counts["raw"].sub(counts["tp"], fill_value=0).abs()
    # Events in the few microseconds between the two switches may differ too.
    assert diff.sum() <= lost + 10, (diff[diff > 0], lost)
    for a in agg.values():
        calls = {(r["source_cpu"], r["target_cpu"], r["func"]): r["count"] for r in a["calls"]}
        assert calls[(0, 1, CALLED_FUNC)] >= N - lost


def test_counts_latency_slots_match_the_events() -> None:
    """The counts-mode log2 histogram puts each call's queue -> entry latency in slot
    k = [2^k, 2^(k+1)) ns, as the events of the same run do (one program doing both):
    bcc's bpf_log2l() is floor(log2) + 1, which once put every call one slot (2x) high."""
    need_raw()
    from pkstrace.analysis import analyse

    backend = bcc_backend("raw", "both")
    with backend:
        backend.attach()
        cross_cpu_calls(N, target_cpu=1, source_cpu=0)
        backend.stop()
        events = backend.drain()
        agg = backend.aggregates()
    trace = schema.Trace(events=events, meta=schema.TraceMeta(backend="bcc", clock="mono"))
    calls = analyse(trace).calls
    ours = calls[(calls["func"] == CALLED_FUNC) & (calls["target_cpu"] == 1) & ~calls["local"]]
    lat = ours["latency_ns"].dropna().to_numpy(dtype=float)
    assert len(lat) >= N // 2
    from_events = np.floor(np.log2(np.maximum(lat, 1))).astype(int)
    hist = [r for r in agg["latency_log2"] if r["target_cpu"] == 1 and r["func"] == CALLED_FUNC]
    slots = np.repeat([r["slot"] for r in hist], [r["count"] for r in hist])
    # Each histogram takes its own timestamps (a few hundred ns apart): the medians
    # agree to a slot, and most calls land in the same slot.
    assert abs(int(np.median(slots)) - int(np.median(from_events))) == 0, (
        np.bincount(slots), np.bincount(from_events))
    ev_share = np.bincount(from_events, minlength=64)[:64] / len(from_events)
    ct_share = np.bincount(slots, minlength=64)[:64] / len(slots)
    assert np.abs(ev_share - ct_share).sum() / 2 < 0.2, (ev_share, ct_share)


def test_a_foreign_bpf_program_no_longer_costs_raw_events() -> None:
    """Another tool's slow BPF program (classic tracepoint, interrupts on) makes the
    kernel skip every classic program on that CPU meanwhile; raw programs run inside
    it. Both recorders side by side on the same calls."""
    need_raw()
    raw, classic = bcc_backend("raw", "counts"), bcc_backend("tp", "counts")
    with raw, classic:
        raw.attach()
        classic.attach()
        with foreign_slow_bpf():
            cross_cpu_calls(N, target_cpu=0, source_cpu=1)
        raw.stop()
        classic.stop()
        miss_raw, miss_tp = sum(raw.misses.values()), sum(classic.misses.values())
    assert miss_tp > 0, "the slow program made no recursion misses"
    # Raw programs miss only where one interrupts itself (write_msr in an interrupt
    # while write_msr's program runs): rare, and unrelated to the foreign program.
    assert miss_raw * 10 <= miss_tp, (raw.misses, classic.misses)
    assert all(k.startswith("tracepoint__") for k in classic.misses), classic.misses


def test_forced_classic_tracepoints_record(tmp_path: Path) -> None:
    """--bpf-attach tp: every tracepoint through a classic program, said in the probe
    status and the trace's bcc extra, and the workload's calls all there."""
    need_raw()
    out = tmp_path / "tp.pkstrace"
    rec = subprocess.run([*PKSTRACE, "record", "--backend", "bcc", "--mode", "counts",
                          "--bpf-attach", "tp", "-o", str(out), "--no-status", "-q", "--",
                          *workload_command(N // 4)], capture_output=True, text=True,
                         timeout=180)
    assert rec.returncode == 0, rec.stderr
    meta = tracefile.read_meta(out)
    attach = meta.extra["bcc"]["attach"]
    assert attach["requested"] == "tp" and attach["raw"] == []
    tps = [p for p in meta.probes if p["name"].count(":") == 1
           and not p["name"].startswith("kprobe:") and p["attached"]]
    assert tps and all("BPF tracepoint program (not raw: tp (asked for))" in p["reason"]
                       for p in tps), tps
    assert set(attach["classic"]) == {p["name"] for p in tps}
    calls = {(r["source_cpu"], r["target_cpu"], r["func"]): r["count"]
             for r in meta.aggregates["calls"]}
    lost = sum(meta.lost_events.values())
    assert calls.get((0, 1, CALLED_FUNC), 0) >= N // 4 - lost


def test_a_raw_program_the_kernel_refuses_falls_back_to_classic(tmp_path: Path) -> None:
    """A raw program the kernel will not attach (it reads an argument the tracepoint
    does not have: the kernel checks the context size at attach) is compiled again as
    a classic tracepoint program; the others stay raw."""
    need_raw()
    probes = tmp_path / "probes"
    probes.mkdir()
    src = (Path(__file__).resolve().parents[1] / "probes" / "pkstrace.bpf.c").read_text()
    old = "on_csd_exit(ctx, ctx->args[0], ctx->args[1]);"
    assert src.count(old) == 1
    # csd_function_exit has two arguments: args[5] is beyond them.
    (probes / "pkstrace.bpf.c").write_text(
        src.replace(old, "on_csd_exit(ctx, ctx->args[0], ctx->args[1] + ctx->args[5]);"))
    out = tmp_path / "fallback.pkstrace"
    env = dict(os.environ, PKSTRACE_PROBES=str(probes))
    rec = subprocess.run([*PKSTRACE, "record", "--backend", "bcc", "-o", str(out),
                          "--no-status", "-q", "--", *workload_command(N // 4)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert rec.returncode == 0, rec.stderr
    trace = tracefile.read_trace(out)
    attach = trace.meta.extra["bcc"]["attach"]
    # sched_switch is classic under auto anyway (interrupts off, cheaper classic)
    assert set(attach["classic"]) == {"csd:csd_function_exit", "sched:sched_switch"}, attach
    assert attach["classic"]["sched:sched_switch"].startswith("auto: sched_switch runs")
    assert "raw attach failed" in attach["classic"]["csd:csd_function_exit"]
    assert "csd:csd_function_entry" in attach["raw"]
    status = {p["name"]: p for p in trace.meta.probes}
    assert status["csd:csd_function_exit"]["attached"]
    assert "not raw: raw attach failed" in status["csd:csd_function_exit"]["reason"]
    assert status["csd:csd_function_entry"]["reason"] == "BPF raw tracepoint program"
    # The classic exit program records like the raw entry one: one exit per entry.
    ev = trace.events
    n_entry = int((ev["kind"] == "csd_entry").sum())
    n_exit = int((ev["kind"] == "csd_exit").sum())
    assert n_entry >= N // 4
    assert abs(n_entry - n_exit) <= sum(trace.meta.lost_events.values()) + 2, (n_entry, n_exit)
