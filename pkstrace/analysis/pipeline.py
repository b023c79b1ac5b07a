"""analyse(): one trace in, one Findings out. Each family lives in its own module.

Order matters only where a family uses another's result: cross-CPU matching
feeds episodes, drift, isolation and lost updates; episodes feed the projection.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pkstrace import schema
from pkstrace.analysis import counts as counts_mod
from pkstrace.analysis.aggregates import apply as apply_aggregates
from pkstrace.analysis.aggregates import uses_aggregates
from pkstrace.analysis.crosscpu import cross_cpu, public_calls
from pkstrace.analysis.drift import drift
from pkstrace.analysis.episodes import (
    DEFAULT_GAP_NS,
    broadcast_send_gaps,
    episodes,
    update_segments,
)
from pkstrace.analysis.findings import Findings
from pkstrace.analysis.isolation import isolated_cpus, violations
from pkstrace.analysis.lost import lost_updates
from pkstrace.analysis.prep import ANALYSIS_COLUMNS, prepare
from pkstrace.analysis.projection import projection
from pkstrace.analysis.redundant import redundant


def trace_summary(trace: schema.Trace, n_events: int, t0: int | None,
                  t1: int | None) -> dict[str, Any]:
    m = trace.meta
    return {
        "format_version": m.format_version,
        "source": m.source,
        "backend": m.backend,
        "clock": m.clock,
        "mode": m.mode,
        "events": int(n_events),
        "first_ns": t0,
        "last_ns": t1,
        "duration_ns": (t1 - t0) if t0 is not None and t1 is not None else 0,
        "window": dict(m.window),
        "host": dict(m.host),
        "lost_events": {str(k): int(v) for k, v in m.lost_events.items()},
        "unmodeled_events": dict(m.unmodeled_events),
        "unparsed_lines": dict(m.unparsed_lines),
        "probes": list(m.probes),
        "partial": bool(m.partial),
        "scenario": dict(m.scenario),
        "notes": list(m.notes),
    }


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds. ``timings`` gets ``name`` (wall) and ``cpu:name`` (CPU time
    of the thread that ran the family, which a busy shared host distorts least; two
    families run in parallel threads, so process CPU time would count both)."""
    return time.perf_counter(), time.thread_time()


def _lap(tm: dict[str, float], name: str, start: tuple[float, float]) -> None:
    w, c = time.perf_counter(), time.thread_time()
    tm[name] = w - start[0]
    tm["cpu:" + name] = c - start[1]


# Families that need nothing but the prepared events, run in a second thread while
# cross-CPU matching (the largest family) runs in the first: their numpy sorts,
# takes and arithmetic release the GIL, so on 2 cores they overlap.
PARALLEL = True
PARALLEL_MIN_EVENTS = 200_000  # below this a thread costs more than it saves
STRING_COLUMNS_USED = ("comm", "callsite", "func", "cpumask")
NUMERIC_COLUMNS_USED = tuple(c for c in ANALYSIS_COLUMNS
                             if c not in STRING_COLUMNS_USED and c != "kind")


def _counts_and_redundant(p: Any, tm: dict[str, float]) -> tuple[Any, Any, int, Any]:
    t = clock()
    counts = counts_mod.counts(p)
    activity, bin_ns = counts_mod.activity(p)
    _lap(tm, "counts", t)
    t = clock()
    red = redundant(p)
    _lap(tm, "redundant", t)
    return counts, activity, bin_ns, red


def analyse(trace: schema.Trace, isolated: list[int] | None = None,
            calibration: dict[str, Any] | None = None,
            episode_gap_ns: int = DEFAULT_GAP_NS,
            timings: dict[str, float] | None = None) -> Findings:
    """Analyse one trace. ``isolated`` overrides the trace's isolated/nohz_full CPUs;
    ``calibration`` (projection.load_calibration) adds projection rows from it.
    ``timings``, if given, receives seconds spent per family (for benchmarks)."""
    tm: dict[str, float] = timings if timings is not None else {}
    t = clock()
    p = prepare(trace)
    _lap(tm, "prepare", t)
    f = Findings()
    f.notes.extend(p.notes)
    ts = p.col("ts")
    f.trace = trace_summary(trace, p.n, int(ts[0]) if p.n else None,
                            int(ts[-1]) if p.n else None)
    f.ground_truth = dict(trace.meta.ground_truth)

    side_tm: dict[str, float] = {}
    if PARALLEL and p.n >= PARALLEL_MIN_EVENTS:
        # the lazy caches are filled first: the threads then only read them
        p.warm(NUMERIC_COLUMNS_USED, STRING_COLUMNS_USED)
        with ThreadPoolExecutor(1, thread_name_prefix="pkstrace-analysis") as pool:
            side = pool.submit(_counts_and_redundant, p, side_tm)
            t = clock()
            cc = cross_cpu(p)
            _lap(tm, "crosscpu", t)
            f.counts, f.activity, f.activity_bin_ns, red = side.result()
    else:
        f.counts, f.activity, f.activity_bin_ns, red = _counts_and_redundant(p, side_tm)
        t = clock()
        cc = cross_cpu(p)
        _lap(tm, "crosscpu", t)
    tm.update(side_tm)
    f.redundant_total = red.total
    f.redundant_by_cpu_msr, f.redundant_by_task = red.by_cpu_msr, red.by_task
    f.write_pkrs = red.write_pkrs
    f.cross_cpu_summary = cc.summary
    f.notes.extend(cc.notes)  # how calls were matched, where it is not by csd token
    f.latency_per_target_cpu = cc.tables["per_target_cpu"]
    f.latency_per_func = cc.tables["per_func"]
    f.latency_per_callsite = cc.tables["per_callsite"]
    f.latency_per_source_target = cc.tables["per_source_target"]

    t = clock()
    cc.queues["segment"] = update_segments(p, cc.queues)
    eps, ep_of_queue = episodes(p, cc.queues, episode_gap_ns)
    cc.queues["episode"] = ep_of_queue
    # calls carry their episode (matched remote calls only)
    q_rows = cc.queues["row"].to_numpy()
    order = q_rows.argsort(kind="stable")
    cr = cc.calls["_queue_row"].to_numpy()
    pos = q_rows[order].searchsorted(cr)
    pos = pos.clip(0, max(len(q_rows) - 1, 0))
    if len(q_rows):
        hit = (cr >= 0) & (q_rows[order][pos] == cr)
        cc.calls["episode"] = np.where(hit, ep_of_queue[order][pos], -1)
    f.episodes = eps
    gaps = broadcast_send_gaps(cc.queues, ep_of_queue, eps)
    f.projection = projection(cc.calls, calibration, gaps, f.notes)
    _lap(tm, "episodes", t)

    t = clock()
    f.isolated_cpus = isolated_cpus(trace.meta, isolated)
    f.violations = violations(p, f.isolated_cpus, cc.queues, cc.orphan_entries)
    _lap(tm, "isolation", t)

    t = clock()
    f.drift = drift(p, cc.queues, episode_gap_ns)
    _lap(tm, "drift", t)

    t = clock()
    f.lost_updates = lost_updates(p, red.wp_rows, red.wp_hit, cc.calls, eps)
    _lap(tm, "lost", t)

    f.calls = public_calls(cc.calls)
    if uses_aggregates(trace.meta):
        # counts mode: the kernel counted every event; its aggregates replace the
        # (absent or sampled) rows' counts and cross-CPU figures
        apply_aggregates(f, trace.meta)
    if (p.col("preempt_depth") < 0).all() and len(cc.queues):
        f.notes.append("preempt depth not in this trace: drift cannot be checked")
    if trace.meta.lost_events and any(int(v) for v in trace.meta.lost_events.values()):
        lost_cpus = [int(c) for c, v in trace.meta.lost_events.items() if int(v)]
        where = [schema.lost_cpu_label(c) for c in lost_cpus if c == schema.LOST_CPU_UNKNOWN]
        known = [c for c in lost_cpus if c != schema.LOST_CPU_UNKNOWN]
        if known:
            where.insert(0, "CPUs " + schema.format_cpulist(known))
        f.notes.append("the trace lost events on " + " and ".join(where)
                       + ": calls around the losses are counted as unmatched")
    return f

