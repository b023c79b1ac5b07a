"""Family 3: cross-CPU function calls, matched queue -> entry -> exit.

Matching (all vectorised):

1. Take every csd_queue, csd_entry and csd_exit in time order. On equal
   timestamps (text traces have microseconds) a queue sorts before an entry and an
   entry before an exit.
2. Key each event by (CPU the function runs on, csd token, func): the queue's
   ``target_cpu``, the entry's / exit's own ``cpu``. A csd is locked while pending,
   so for one key the kernel produces queue, entry, exit, queue, entry, exit ... even
   when the token is reused (a serial walk reuses its on-stack csd for every CPU).
3. A call is *matched* when, within its key's sequence, a queue is immediately
   followed by an entry; the entry's handler is timed when the entry is immediately
   followed by an exit. Anything else is counted, never paired: a queue whose entry
   fell after the window or was lost (``unmatched_queue``), an entry whose queue fell
   before the window or was lost (``unmatched_entry``), an exit without its entry
   (``unmatched_exit``). Where a CPU lost events, the loss breaks the alternation and
   the halves around it stay unmatched instead of being paired across the gap.
4. Entries with csd 0 (``csd=(nil)``) are calls a CPU ran for itself: ``local``.
   Nested local calls of the same func on one CPU would pair the inner entry with
   the first exit (the outer entry stays unmatched): rare, and counted.

Kernels before 6.3 have no csd tracepoints: there the recorder puts kprobes on
``generic_exec_single`` (-> csd_queue) and ``smp_call_function_many_cond`` (->
ipi_send with a cpumask) and records the call-function vector tracepoints
(callfunc_entry / exit) instead (importers/kprobe_calls.py). Such a trace has no
csd tokens on the entry side, so :func:`cross_cpu_by_time` matches each remote
queue, and each CPU of a cpumask send, to the first call-function vector entry on
the target CPU after it (``pd.merge_asof`` by target CPU, forward), or to the
target's switch away from the idle task where that comes first (an idle CPU runs
pending calls before it leaves idle; the late vector then has nothing to do: seen
on the emulated host, and the csd tracepoints of the same run agree). Several calls
queued to one CPU before its interrupt runs share that entry, as they share the
IPI. A queue with no entry within ``VECTOR_MATCH_MAX_NS`` stays unmatched, and a
vector entry no queue claims is an ``unmatched_entry`` (remote wake-ups queued by
the scheduler, which do not pass through generic_exec_single, land there).
Handler time is then the whole vector handler (every call it ran), and an
episode's end is its last call's vector entry (see ``done_ns`` below).

Latency = entry - queue (delivery); handler = exit - entry. ``target_idle``: the
target CPU ran the idle task (pid 0) at queue time, by the last sched_switch on it;
where no sched_switch for that CPU precedes the queue, by the entry's pid being 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.counts import expand_ipi_targets
from pkstrace.analysis.findings import CALLS_COLUMNS
from pkstrace.analysis.prep import (
    KIND_CODE,
    Prepared,
    asof_prev,
    dense_key,
    grouped_order,
    latency_table,
    neighbours,
    percentiles,
)


@dataclass
class CrossCpu:
    calls: pd.DataFrame  # CALLS_COLUMNS + "episode" (filled by episodes)
    # One row per csd_queue (matched or not): what episodes, drift and isolation use
    # (only what they read: a full-length column nobody reads costs a gather here and
    # a copy in every selection of queues).
    queues: pd.DataFrame
    # Remote entries with no queue (queue lost or before the window).
    orphan_entries: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for Findings.notes


# kind code -> 0 queue, 1 entry, 2 exit (the order of events with equal timestamps)
_CSD_RANK = np.full(256, 2, dtype=np.int8)
_CSD_RANK[KIND_CODE["csd_queue"]] = 0
_CSD_RANK[KIND_CODE["csd_entry"]] = 1


def _cat(p: Prepared, name: str, rows: np.ndarray) -> pd.Categorical:
    """A string column's values at ``rows``, kept categorical (cheap for millions of calls)."""
    codes, cats = p.codes(name)
    return pd.Categorical.from_codes(codes[rows].astype(np.int32), categories=cats)


def cross_cpu(p: Prepared) -> CrossCpu:
    if matched_by_time(p):
        return cross_cpu_by_time(p)
    sub = p.rows(schema.Kind.CSD_QUEUE, schema.Kind.CSD_ENTRY, schema.Kind.CSD_EXIT)
    rank = _CSD_RANK[p.kind[sub]]  # one table lookup (the kinds here are the three)
    ts_all = p.col("ts")
    ts = ts_all[sub]
    if len(sub) > 1:
        inverted = (np.diff(ts) == 0) & (np.diff(rank) < 0)
        if inverted.any():
            order = np.argsort((ts - ts[0]) * 4 + rank, kind="stable")
            sub, rank, ts = sub[order], rank[order], ts[order]
        del inverted
    cpu_all = p.col("cpu")
    csd = p.col("csd")[sub]
    func_codes, _ = p.codes("func")
    is_q, is_e, is_x = rank == 0, rank == 1, rank == 2
    run_cpu = np.where(is_q, p.col("target_cpu")[sub], cpu_all[sub]).astype(np.int32)
    fn = func_codes[sub].astype(np.int32)
    # one exact key per (CPU the function runs on, csd token, func): the tokens are
    # factorised (a hash pass), CPUs and func codes are small ranges
    order, same = grouped_order(dense_key(run_cpu, csd, fn))
    prev, nxt = neighbours(order, same)
    del order, same, run_cpu, fn, ts  # full-size temporaries: free before the next step
    has_nxt, has_prev = nxt >= 0, prev >= 0
    nxt_c, prev_c = np.where(has_nxt, nxt, 0), np.where(has_prev, prev, 0)
    q_matched = is_q & has_nxt & is_e[nxt_c]
    e_from_q = is_e & has_prev & is_q[prev_c]
    e_exit = is_e & has_nxt & is_x[nxt_c]
    x_from_e = is_x & has_prev & is_e[prev_c]
    local = is_e & (csd == 0)
    orphan = is_e & (csd != 0) & ~e_from_q

    # --- calls: matched remote entries and local entries
    ent = np.flatnonzero(e_from_q | local)
    e_rows = sub[ent]
    q_pos = np.where(e_from_q[ent], prev_c[ent], -1)
    x_pos = np.where(e_exit[ent], nxt_c[ent], -1)
    is_remote = q_pos >= 0
    q_rows = np.where(is_remote, sub[np.maximum(q_pos, 0)], e_rows)  # local: itself
    x_rows = np.where(x_pos >= 0, sub[np.maximum(x_pos, 0)], -1)
    entry_ns = ts_all[e_rows]
    queue_ns = np.where(is_remote, ts_all[q_rows], -1)
    exit_ns = np.where(x_rows >= 0, ts_all[np.maximum(x_rows, 0)], -1)
    latency = np.where(is_remote, (entry_ns - queue_ns).astype(np.float64), np.nan)
    handler = np.where(x_rows >= 0, (exit_ns - entry_ns).astype(np.float64), np.nan)
    target_cpu = cpu_all[e_rows]
    source_cpu = cpu_all[q_rows]
    pid_all = p.col("pid")
    # target idle at queue time
    ss = p.rows(schema.Kind.SCHED_SWITCH)
    last_ss = asof_prev(target_cpu, q_rows, cpu_all[ss], ss, p.n)
    idle_by_ss = p.col("next_pid")[ss[np.maximum(last_ss, 0)]] == 0 if len(ss) else \
        np.zeros(len(e_rows), dtype=bool)
    target_idle = np.where(last_ss >= 0, idle_by_ss, pid_all[e_rows] == 0) & is_remote
    callsite = _cat(p, "callsite", q_rows)
    if (~is_remote).any():
        # a local call has no callsite of its own (csd_function_entry carries none)
        callsite = callsite.add_categories([""]) if "" not in callsite.categories else callsite
        callsite[~is_remote] = ""
    calls = pd.DataFrame({
        "queue_ns": queue_ns.astype(np.int64),
        "entry_ns": entry_ns.astype(np.int64),
        "exit_ns": exit_ns.astype(np.int64),
        "source_cpu": source_cpu,
        "target_cpu": target_cpu,
        "func": _cat(p, "func", e_rows),
        "callsite": callsite,
        "comm": _cat(p, "comm", q_rows),
        "pid": pid_all[q_rows].astype(np.int64),
        "local": ~is_remote,
        "latency_ns": latency,
        "handler_ns": handler,
        "target_idle": target_idle,
        "episode": np.full(len(e_rows), -1, dtype=np.int64),
        # internal: rows in the events table (not part of the JSON)
        "_queue_row": np.where(is_remote, q_rows, -1),
        "_entry_row": e_rows,
    }, copy=False)

    # --- queues (matched or not), for episodes / drift / isolation
    qi = np.flatnonzero(is_q)
    qr = sub[qi]
    q_e = np.where(q_matched[qi], sub[nxt_c[qi]], -1)
    q_e_pos = np.where(q_matched[qi], nxt_c[qi], 0)
    q_x = np.where(q_matched[qi] & e_exit[q_e_pos], sub[nxt_c[q_e_pos]], -1)
    q_entry_ns = np.where(q_e >= 0, ts_all[np.maximum(q_e, 0)], -1)
    q_exit_ns = np.where(q_x >= 0, ts_all[np.maximum(q_x, 0)], -1)
    q_ts = ts_all[qr]
    queues = pd.DataFrame({
        "row": qr, "ts": q_ts, "source_cpu": cpu_all[qr].astype(np.int32),
        "target_cpu": p.col("target_cpu")[qr].astype(np.int32),
        "pid": pid_all[qr].astype(np.int32),
        "comm_code": p.codes("comm")[0][qr].astype(np.int32),
        "callsite_code": p.codes("callsite")[0][qr].astype(np.int32),
        "func_code": func_codes[qr].astype(np.int32),
        "depth": p.col("preempt_depth")[qr].astype(np.int32),
        "entry_ns": q_entry_ns,
        "done_ns": np.where(q_x >= 0, q_exit_ns, np.where(q_e >= 0, q_entry_ns, q_ts)),
    }, copy=False)
    orow = sub[np.flatnonzero(orphan)]
    orphan_entries = pd.DataFrame({
        "row": orow, "ts": ts_all[orow], "cpu": cpu_all[orow].astype(np.int64),
        "pid": pid_all[orow].astype(np.int64),
        "func_code": func_codes[orow].astype(np.int64)})

    return _finish(p, calls, queues, orphan_entries, {
        "unmatched_queue": int((is_q & ~q_matched).sum()),
        "unmatched_entry": int(orphan.sum()),
        "unmatched_exit": int((is_x & ~x_from_e).sum()),
    })


def _finish(p: Prepared, calls: pd.DataFrame, queues: pd.DataFrame,
            orphan_entries: pd.DataFrame, unmatched: dict[str, int],
            notes: list[str] | None = None) -> CrossCpu:
    """Summary and latency tables of matched calls (both matching methods)."""
    # only the columns the summary and the tables read (not a copy of the whole table)
    remote = calls.loc[~calls["local"].to_numpy(),
                       ["source_cpu", "target_cpu", "func", "callsite", "latency_ns",
                        "handler_ns", "target_idle"]]
    lat = remote["latency_ns"].to_numpy()
    # One sort of the latencies serves the percentiles and the four tables. Not a
    # stable one: what is read from it (order statistics, per-group values in value
    # order) is the same whichever of two equal latencies comes first.
    by_lat = np.argsort(lat)
    lat_sorted = lat[by_lat]
    summary: dict[str, Any] = {
        "count": int(len(calls)),
        "remote": int(len(remote)),
        "local": int(calls["local"].sum()),
        **unmatched,
        **percentiles(lat, sorted_values=lat_sorted),
    }
    h = percentiles(remote["handler_ns"].to_numpy())
    summary["handler_p50_ns"], summary["handler_p99_ns"] = h["p50_ns"], h["p99_ns"]
    idle = remote["target_idle"].to_numpy()
    # the medians from the sorted latencies (a median needs no particular order)
    idle_sorted = idle[by_lat]
    summary["count_idle"] = int(idle.sum())
    summary["p50_idle_ns"] = percentiles(lat_sorted[idle_sorted])["p50_ns"]
    summary["count_busy"] = int((~idle).sum())
    summary["p50_busy_ns"] = percentiles(lat_sorted[~idle_sorted])["p50_ns"]
    del idle_sorted, lat_sorted
    lost = {int(c): int(v) for c, v in p.meta.lost_events.items() if int(v) > 0}
    summary["cpus_with_lost_events"] = sorted(lost)

    tables = {
        "per_target_cpu": latency_table(remote, ["target_cpu"], "latency_ns", by_lat),
        "per_func": latency_table(remote, ["func"], "latency_ns", by_lat),
        "per_callsite": latency_table(remote, ["callsite"], "latency_ns", by_lat),
        "per_source_target": latency_table(remote, ["source_cpu", "target_cpu"], "latency_ns",
                                           by_lat),
    }
    return CrossCpu(calls=calls, queues=queues, orphan_entries=orphan_entries,
                    summary=summary, tables=tables, notes=list(notes or []))


# Probes whose presence in a trace means calls were recorded without csd tokens.
FALLBACK_PROBES = frozenset({"kprobe:generic_exec_single", "kprobe:smp_call_function_many_cond",
                             "kprobe:smp_call_function_many"})
# A queue whose target shows no call-function vector entry within this long is left
# unmatched rather than paired with an unrelated later interrupt (a polling idle CPU
# runs its queue without an IPI; a cond_func can decline a CPU of a mask).
VECTOR_MATCH_MAX_NS = 100_000_000
BY_TIME_NOTE = ("cross-CPU calls were recorded without csd tracepoints (kprobes on "
                "generic_exec_single / smp_call_function_many_cond): latencies were matched "
                "by time to the next call-function vector entry on the target CPU, not by "
                "csd token; handler times are whole vector handlers")


def matched_by_time(p: Prepared) -> bool:
    """Whether this trace's calls must be matched by time (no csd entries to pair with).

    Yes where the recorder says it used the fallback kprobes, or where the events
    show it: remote calls queued and call-function vector entries, but no remote
    csd_function_entry at all.
    """
    if any(pr.get("attached") and pr.get("name") in FALLBACK_PROBES
           for pr in p.meta.probes if isinstance(pr, dict)):
        return True
    ent = p.rows(schema.Kind.CSD_ENTRY)
    if (p.col("csd")[ent] != 0).any() or len(p.rows(schema.Kind.CALLFUNC_ENTRY)) == 0:
        return False
    return len(p.rows(schema.Kind.CSD_QUEUE)) > 0 or len(_mask_sends(p)[0]) > 0


def _mask_sends(p: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """Cpumask sends that name the function (kprobe on smp_call_function_many_cond),
    once per target CPU other than the sender: (row, target cpu)."""
    rows, tgt = expand_ipi_targets(p)
    keep = (p.col("target_cpu")[rows] < 0) & (tgt != p.col("cpu")[rows])
    func_codes, _ = p.codes("func")
    keep &= func_codes[rows] >= 0
    if keep.any():
        _, cats = p.codes("func")
        named = np.append(cats.astype(str) != "", False)  # code -1 -> False
        keep &= named[func_codes[rows]]
    return rows[keep], tgt[keep]


def _clamp_to_next_single_queue(done_ns: np.ndarray, q_ts: np.ndarray, single: np.ndarray,
                                source_cpu: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """A single-target call (generic_exec_single) is done, at the latest, when the
    same task on the same CPU queues its next single-target call.

    A synchronous caller (smp_call_function_single / wrmsrl_on_cpu) waits for its
    call before it goes on. The time match cannot always see when a call ran: a
    polling-idle target runs it with no vector and no context switch, and the next
    vector on that CPU (a later call's) would otherwise make a serial walk look
    like a broadcast. (An async sender, which does not wait, reads as serial.)
    """
    idx = np.flatnonzero(single)
    if len(idx) < 2:
        return done_ns
    key = dense_key(source_cpu[idx].astype(np.int64), pid[idx].astype(np.int64))
    srt = np.lexsort((q_ts[idx], key))  # by task, then time
    o, ko = idx[srt], key[srt]
    same = ko[1:] == ko[:-1]
    out = done_ns.copy()
    nxt = q_ts[o[1:]]
    cur = o[:-1]
    sel = same & (nxt < out[cur])
    out[cur[sel]] = np.maximum(nxt[sel], q_ts[cur[sel]] + 1)
    return out


def cross_cpu_by_time(p: Prepared) -> CrossCpu:
    """Cross-CPU calls matched queue -> call-function vector entry by time (see top)."""
    ts_all, cpu_all, pid_all = p.col("ts"), p.col("cpu"), p.col("pid")
    tcpu_all = p.col("target_cpu")
    q1 = p.rows(schema.Kind.CSD_QUEUE)
    q1 = q1[tcpu_all[q1] != cpu_all[q1]]
    m_rows, m_tgt = _mask_sends(p)
    q_rows = np.concatenate([q1, m_rows]).astype(np.int64)
    q_tgt = np.concatenate([tcpu_all[q1].astype(np.int64), m_tgt]).astype(np.int64)
    order = np.argsort(q_rows, kind="stable")  # rows are time order
    q_rows, q_tgt = q_rows[order], q_tgt[order]
    q_single = np.r_[np.ones(len(q1), bool), np.zeros(len(m_rows), bool)][order]
    ent = p.rows(schema.Kind.CALLFUNC_ENTRY).astype(np.int64)
    ext = p.rows(schema.Kind.CALLFUNC_EXIT).astype(np.int64)
    # queue -> first vector entry on the target CPU after it (rows break equal times)
    hit = pd.merge_asof(
        pd.DataFrame({"row": q_rows, "cpu": q_tgt}),
        pd.DataFrame({"row": ent, "cpu": cpu_all[ent].astype(np.int64), "entry_row": ent}),
        on="row", by="cpu", direction="forward", allow_exact_matches=False)
    e_row = hit["entry_row"].fillna(-1).to_numpy().astype(np.int64)
    # An idle CPU runs its pending calls itself before it leaves idle (do_idle():
    # flush_smp_call_function_queue() before schedule_idle()), and the vector that
    # arrives later finds nothing to do: where the target switches away from the idle
    # task before its next vector entry, the call ran by then.
    ss = p.rows(schema.Kind.SCHED_SWITCH)
    idle_out = ss[pid_all[ss] == 0].astype(np.int64)  # sched_switch's pid: the prev task
    out = pd.merge_asof(
        pd.DataFrame({"row": q_rows, "cpu": q_tgt}),
        pd.DataFrame({"row": idle_out, "cpu": cpu_all[idle_out].astype(np.int64),
                      "out_row": idle_out}),
        on="row", by="cpu", direction="forward", allow_exact_matches=False)
    o_row = out["out_row"].fillna(-1).to_numpy().astype(np.int64)
    # Only for generic_exec_single, which queues within microseconds of its kprobe:
    # smp_call_function_many_cond's kprobe fires at its entry, and it may queue
    # hundreds of microseconds later (seen on the emulated host), so an idle exit
    # between the two says nothing about the call.
    by_idle = (o_row >= 0) & ((e_row < 0) | (o_row < e_row)) & q_single
    e_row = np.where(by_idle, o_row, e_row)
    found = e_row >= 0
    lat = np.where(found, ts_all[np.maximum(e_row, 0)] - ts_all[q_rows], -1)
    found &= lat <= VECTOR_MATCH_MAX_NS
    e_row = np.where(found, e_row, -1)
    # entry -> its exit: the next vector exit on that CPU, if no other entry comes first
    e_cpu = cpu_all[ent].astype(np.int64)
    nxt = pd.merge_asof(
        pd.DataFrame({"row": ent, "cpu": e_cpu}),
        pd.DataFrame({"row": np.concatenate([ent, ext]),
                      "cpu": np.concatenate([e_cpu, cpu_all[ext].astype(np.int64)]),
                      "next_row": np.concatenate([ent, ext]),
                      "is_exit": np.r_[np.zeros(len(ent), bool), np.ones(len(ext), bool)]}
                     ).sort_values("row", kind="stable"),
        on="row", by="cpu", direction="forward", allow_exact_matches=False)
    exit_of_entry = np.where(nxt["is_exit"].fillna(False).to_numpy(dtype=bool),
                             nxt["next_row"].fillna(-1).to_numpy(), -1).astype(np.int64)
    pos = np.searchsorted(ent, np.maximum(e_row, 0))
    x_row = np.where(found & ~by_idle, exit_of_entry[np.minimum(pos, max(len(ent) - 1, 0))]
                     if len(ent) else -1, -1)
    entry_ns = np.where(found, ts_all[np.maximum(e_row, 0)], -1)
    q_ts = ts_all[q_rows]
    done_ns = np.where(found, np.maximum(entry_ns, q_ts + 1), q_ts)
    done_ns = _clamp_to_next_single_queue(done_ns, q_ts, q_single, cpu_all[q_rows],
                                          pid_all[q_rows])
    func_codes, _ = p.codes("func")
    queues = pd.DataFrame({
        "row": q_rows, "ts": q_ts, "source_cpu": cpu_all[q_rows].astype(np.int32),
        "target_cpu": q_tgt.astype(np.int32),
        "pid": pid_all[q_rows].astype(np.int32),
        "comm_code": p.codes("comm")[0][q_rows].astype(np.int32),
        "callsite_code": p.codes("callsite")[0][q_rows].astype(np.int32),
        "func_code": func_codes[q_rows].astype(np.int32),
        "depth": p.col("preempt_depth")[q_rows].astype(np.int32),
        "entry_ns": entry_ns,
        # When the caller may go on is not visible here: it waits for the csd's
        # unlock, somewhere between the vector's entry and exit. The entry is the
        # bound that keeps a serial walk serial (the exit often comes after the next
        # queue); +1 ns keeps a cpumask send's queues (one timestamp) overlapping.
        "done_ns": done_ns,
    }, copy=False)

    # calls: matched remote queues, then local calls (csd_entry with no csd, as the
    # importer writes a generic_exec_single to the caller's own CPU)
    mq = np.flatnonzero(found)
    loc = p.rows(schema.Kind.CSD_ENTRY)
    loc = loc[p.col("csd")[loc] == 0].astype(np.int64)
    n_r, n_l = len(mq), len(loc)
    src_rows = np.concatenate([q_rows[mq], loc])  # where func/callsite/comm come from
    c_entry = np.concatenate([e_row[mq], loc])
    c_exit = np.concatenate([x_row[mq], np.full(n_l, -1, np.int64)])
    target = np.concatenate([q_tgt[mq], cpu_all[loc].astype(np.int64)]).astype(np.int32)
    is_remote = np.r_[np.ones(n_r, bool), np.zeros(n_l, bool)]
    c_entry_ns = ts_all[c_entry] if len(c_entry) else np.zeros(0, np.int64)
    c_queue_ns = np.where(is_remote, ts_all[src_rows] if len(src_rows) else 0, -1)
    c_exit_ns = np.where(c_exit >= 0, ts_all[np.maximum(c_exit, 0)] if len(c_exit) else 0, -1)
    last_ss = asof_prev(target, src_rows, cpu_all[ss], ss, p.n)
    idle_by_ss = p.col("next_pid")[ss[np.maximum(last_ss, 0)]] == 0 if len(ss) else \
        np.zeros(len(src_rows), dtype=bool)
    target_idle = np.where(last_ss >= 0, idle_by_ss,
                           pid_all[c_entry] == 0 if len(c_entry) else False) & is_remote
    callsite = _cat(p, "callsite", src_rows)
    if n_l:
        callsite = callsite.add_categories([""]) if "" not in callsite.categories else callsite
        callsite[~is_remote] = ""
    calls = pd.DataFrame({
        "queue_ns": c_queue_ns.astype(np.int64),
        "entry_ns": c_entry_ns.astype(np.int64),
        "exit_ns": c_exit_ns.astype(np.int64),
        "source_cpu": cpu_all[src_rows],
        "target_cpu": target,
        "func": _cat(p, "func", src_rows),
        "callsite": callsite,
        "comm": _cat(p, "comm", src_rows),
        "pid": pid_all[src_rows].astype(np.int64),
        "local": ~is_remote,
        "latency_ns": np.where(is_remote, (c_entry_ns - c_queue_ns).astype(np.float64), np.nan),
        "handler_ns": np.where(c_exit >= 0, (c_exit_ns - c_entry_ns).astype(np.float64), np.nan),
        "target_idle": target_idle,
        "episode": np.full(len(src_rows), -1, dtype=np.int64),
        "_queue_row": np.where(is_remote, src_rows, -1),
        "_entry_row": c_entry,
    }, copy=False)
    calls = calls.sort_values("entry_ns", kind="stable").reset_index(drop=True)

    claimed = np.zeros(len(ent), bool)
    if len(ent) and n_r:
        claimed[np.searchsorted(ent, e_row[mq][~by_idle[mq]])] = True
    orow = ent[~claimed]
    orphan_entries = pd.DataFrame({
        "row": orow, "ts": ts_all[orow], "cpu": cpu_all[orow].astype(np.int64),
        "pid": pid_all[orow].astype(np.int64),
        "func_code": func_codes[orow].astype(np.int64)})
    x_claimed = np.zeros(len(ext), bool)
    if len(ext):
        xr = exit_of_entry[exit_of_entry >= 0]
        x_claimed[np.searchsorted(ext, xr)] = True
    return _finish(p, calls, queues, orphan_entries, {
        "unmatched_queue": int((~found).sum()),
        "unmatched_entry": int((~claimed).sum()),
        "unmatched_exit": int((~x_claimed).sum()),
    }, notes=[BY_TIME_NOTE])


def public_calls(calls: pd.DataFrame) -> pd.DataFrame:
    """The calls table as findings carry it (internal row columns dropped)."""
    cols = [c for c in CALLS_COLUMNS if c in calls.columns]
    extra = [c for c in calls.columns if c not in cols and not c.startswith("_")]
    return calls[cols + extra]
