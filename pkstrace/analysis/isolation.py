"""Family 5: interruptions of isolated / nohz_full CPUs, one row per interrupting call.

A call that lands on an isolated CPU shows up as several events (the csd_queue on
the source, an ipi_send, the csd_function_entry / exit on the target and whatever
the handler does there, such as an MSR write). They are one violation:

- ``via = "csd"``: each csd_queue whose target is isolated (matched or not: a
  queue whose entry was lost still interrupted the CPU);
- ``via = "csd_entry"``: a remote csd_function_entry on an isolated CPU whose
  queue was not seen (lost, or before the window);
- ``via = "ipi"``: an ipi_send to an isolated CPU (a cpumask send counts for each
  isolated CPU in it) that no csd_queue from the same source CPU to that target
  explains. The kernel sends at most one IPI per batch of calls queued to a CPU,
  right after queueing, so an IPI is part of a call when a csd_queue from the
  same source to the same target precedes it with no other IPI between them
  (source to target), at most ``IPI_AFTER_QUEUE_NS`` earlier (an emulated host
  can take milliseconds between the two). Reschedule and other IPIs without a csd
  remain violations; an isolated CPU's IPI to itself (irq_work) does not count.

``tracer_induced``: the call patches kernel text, which is what enabling a
tracepoint or kprobe does (``do_sync_core`` IPIs to every CPU, ``text_poke_*``
callsites): the tracer disturbed isolation itself while attaching.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.counts import expand_ipi_targets
from pkstrace.analysis.findings import VIOLATION_COLUMNS
from pkstrace.analysis.prep import Prepared, asof_prev

IPI_AFTER_QUEUE_NS = 20_000_000
TRACER_FUNCS = ("do_sync_core", "text_poke_sync_each_cpu", "smp_text_poke_sync_each_cpu",
                "do_sync_core_ipi")
TRACER_CALLSITE_MARKERS = ("text_poke", "arch_jump_label", "ftrace_", "do_sync_core")


def _tracer_induced(func: np.ndarray, callsite: np.ndarray) -> np.ndarray:
    f = pd.Series(func, dtype=object).astype(str)
    c = pd.Series(callsite, dtype=object).astype(str)
    hit = f.isin(TRACER_FUNCS)
    for m in TRACER_CALLSITE_MARKERS:
        hit |= c.str.contains(m, regex=False)
    return hit.to_numpy()


def violations(p: Prepared, isolated: list[int], queues: pd.DataFrame,
               orphan_entries: pd.DataFrame) -> pd.DataFrame:
    if not isolated:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in VIOLATION_COLUMNS})
    iso = np.asarray(sorted(isolated), dtype=np.int64)
    parts = []
    q = queues[np.isin(queues["target_cpu"].to_numpy(), iso)]
    if len(q):
        r = q["row"].to_numpy()
        parts.append(pd.DataFrame({
            "time_ns": q["ts"].to_numpy(), "source_cpu": q["source_cpu"].to_numpy(),
            "target_cpu": q["target_cpu"].to_numpy(),
            "func": p.strings("func", r), "callsite": p.strings("callsite", r),
            "comm": p.strings("comm", r), "pid": q["pid"].to_numpy(), "via": "csd"}))
    o = orphan_entries[np.isin(orphan_entries["cpu"].to_numpy(), iso)]
    if len(o):
        r = o["row"].to_numpy()
        parts.append(pd.DataFrame({
            "time_ns": o["ts"].to_numpy(), "source_cpu": -1, "target_cpu": o["cpu"].to_numpy(),
            "func": p.strings("func", r), "callsite": "", "comm": "", "pid": -1,
            "via": "csd_entry"}))
    ipi_rows, ipi_tgt = expand_ipi_targets(p)
    # a CPU's IPI to itself (irq_work, self-kick) is its own work, not an intrusion
    on_iso = np.isin(ipi_tgt, iso) & (ipi_tgt != p.col("cpu")[ipi_rows])
    ipi_rows, ipi_tgt = ipi_rows[on_iso], ipi_tgt[on_iso]
    if len(ipi_rows):
        cpu, ts = p.col("cpu"), p.col("ts")
        qr = queues["row"].to_numpy()
        width = int(max(ipi_tgt.max(), queues["target_cpu"].max() if len(queues) else 0)) + 2
        qkey = (queues["source_cpu"].to_numpy().astype(np.int64) * width
                + queues["target_cpu"].to_numpy() + 1)
        ikey = cpu[ipi_rows].astype(np.int64) * width + ipi_tgt + 1
        order = np.argsort(ipi_rows, kind="stable")
        ipi_rows, ipi_tgt, ikey = ipi_rows[order], ipi_tgt[order], ikey[order]
        qo = np.argsort(qr, kind="stable")
        # inclusive: a kprobe on smp_call_function_many_cond is one row that is both
        # the cpumask send and (per CPU in it) the queues (analysis/crosscpu.py)
        found = asof_prev(ikey, ipi_rows, qkey[qo], qr[qo], p.n, inclusive=True)
        # the previous IPI from the same source to the same target
        prev_ipi = asof_prev(ikey, ipi_rows, ikey, ipi_rows, p.n)
        explained = found >= 0
        if len(qr):
            fq = qr[qo][np.maximum(found, 0)]
            explained &= (ts[ipi_rows] - ts[fq]) <= IPI_AFTER_QUEUE_NS
            explained &= (prev_ipi < 0) | (fq > ipi_rows[np.maximum(prev_ipi, 0)])
        lone, lone_tgt = ipi_rows[~explained], ipi_tgt[~explained]
        if len(lone):
            parts.append(pd.DataFrame({
                "time_ns": ts[lone], "source_cpu": cpu[lone].astype(np.int64),
                "target_cpu": lone_tgt, "func": p.strings("func", lone),
                "callsite": p.strings("callsite", lone), "comm": p.strings("comm", lone),
                "pid": p.col("pid")[lone].astype(np.int64), "via": "ipi"}))
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in VIOLATION_COLUMNS})
    v = pd.concat(parts, ignore_index=True)
    v["tracer_induced"] = _tracer_induced(v["func"].to_numpy(), v["callsite"].to_numpy())
    v = v.sort_values("time_ns", kind="stable").reset_index(drop=True)
    for c in ("time_ns", "source_cpu", "target_cpu", "pid"):
        v[c] = v[c].astype(np.int64)
    return v[VIOLATION_COLUMNS]


def isolated_cpus(meta: schema.TraceMeta, override: list[int] | None) -> list[int]:
    """--isolated wins; else the trace's isolated + nohz_full CPUs."""
    if override is not None:
        return sorted(set(int(c) for c in override))
    return meta.isolated_cpus
