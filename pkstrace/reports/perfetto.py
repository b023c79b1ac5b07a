"""Export a trace to Chrome trace-event JSON, for ui.perfetto.dev and chrome://tracing.

The one report that renders events as well as Findings: a timeline is events.

- one process ("pkstrace: HOST"), one thread track per CPU (tid = CPU number),
  named and ordered by metadata events ("M");
- each cross-CPU call handler run (csd entry -> exit, from ``Findings.calls``)
  is a complete slice ("X") on the target CPU's track;
- each remote call's queueing is a short "X" slice on the sender's track, and a
  flow ("s" -> "f", same ``id``, ``cat`` and ``name``) joins it to the handler on
  the target CPU; the "f" binds to its enclosing slice (``"bp": "e"``);
- MSR writes are counters ("C"): per CPU, writes per time bin by MSR name, and
  the value written to IA32_PKRS when there are such writes;
- isolation violations are thread-scoped instant events ("i") on the isolated CPU.

Timestamps are microseconds since the trace's start (``otherData.origin_ns``),
with nanosecond precision (three decimals). Rows are formatted column-wise with
pandas string operations, never one Python loop iteration per event.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import Findings
from pkstrace.tracefile import create_output, finish_output

PID = 1
FLOW_CAT = "csd"
FLOW_NAME = "cross-CPU call"
QUEUE_SLICE_NS = 1_000  # drawn length of a queue slice (the flow needs a slice to start in)
MAX_COUNTER_BINS = 2_000  # counter samples per CPU
CHUNK_ROWS = 200_000  # rows formatted at a time (bounded memory for 10 M events)


def _jstr(values: pd.Series) -> pd.Series:
    """JSON string literals, escaped once per distinct value (values are categories)."""
    cat = pd.Categorical(values.astype(str))
    lit = [json.dumps(c) for c in cat.categories]
    return pd.Series(pd.Categorical.from_codes(cat.codes, categories=lit).astype(str),
                     index=values.index)


def _us(ns: np.ndarray) -> pd.Series:
    """Integer ns -> 'µs.nnn' strings, exactly (no float rounding)."""
    ns = np.asarray(ns, dtype=np.int64)
    neg = ns < 0
    a = np.abs(ns)
    whole = pd.Series(a // 1000).astype(str)
    frac = pd.Series(a % 1000).astype(str).str.zfill(3)
    s = whole + "." + frac
    if neg.any():
        s = pd.Series(np.where(neg, "-", "")) + s
    return s


def _num(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if not np.isfinite(f) else int(f)


def _ints(s: pd.Series) -> np.ndarray:
    return pd.Series(pd.to_numeric(s, errors="coerce")).to_numpy(dtype=float, na_value=np.nan)


def origin_ns(trace: schema.Trace, findings: Findings) -> int:
    start = _num((trace.meta.window or {}).get("start_ns"))
    if start is not None:
        return start
    ts = trace.events["ts"].to_numpy()
    ts = ts[ts >= 0]
    if len(ts):
        return int(ts.min())
    q = _ints(findings.calls["queue_ns"]) if len(findings.calls) else np.zeros(0)
    q = q[np.isfinite(q)]
    return int(q.min()) if len(q) else 0


def _metadata(trace: schema.Trace, findings: Findings) -> list[str]:
    host = trace.meta.host or {}
    cpus: set[int] = set(int(c) for c in trace.meta.online_cpus)
    cpu_col = trace.events["cpu"].to_numpy()
    cpus.update(int(c) for c in np.unique(cpu_col[cpu_col >= 0]))
    for col in ("source_cpu", "target_cpu"):
        if len(findings.calls):
            v = _ints(findings.calls[col])
            cpus.update(int(c) for c in np.unique(v[np.isfinite(v) & (v >= 0)]))
    isolated = set(findings.isolated_cpus) | set(trace.meta.isolated_cpus)
    name = f"pkstrace: {host.get('hostname') or trace.meta.source or 'trace'}"
    out = [json.dumps({"ph": "M", "pid": PID, "tid": 0, "name": "process_name",
                       "args": {"name": name}})]
    for c in sorted(cpus):
        label = f"CPU {c}" + (" (isolated)" if c in isolated else "")
        out.append(json.dumps({"ph": "M", "pid": PID, "tid": c, "name": "thread_name",
                               "args": {"name": label}}))
        out.append(json.dumps({"ph": "M", "pid": PID, "tid": c, "name": "thread_sort_index",
                               "args": {"sort_index": c}}))
    return out


def _queue_durations(queue: np.ndarray, src: np.ndarray, entry: np.ndarray,
                     exit_: np.ndarray, tgt: np.ndarray, has_entry: np.ndarray,
                     flow: np.ndarray) -> np.ndarray:
    """Length of each queue slice: up to QUEUE_SLICE_NS, but never past the next slice
    on the sender's track nor past the end of a handler it sits in, so slices nest
    properly (viewers drop improperly nested slices). One loop step per CPU."""
    dur = np.ones(len(queue), dtype=np.int64)
    if not flow.any():
        return dur
    h_end_all = np.where(np.isfinite(exit_), exit_, entry)
    for cpu in np.unique(src[flow]):
        qi = np.flatnonzero(flow & (src == cpu))
        q = queue[qi].astype(np.int64)
        hm = has_entry & (tgt == cpu)
        h_start = entry[hm].astype(np.int64)
        h_end = h_end_all[hm].astype(np.int64)
        order = np.argsort(h_start, kind="stable")
        h_start, h_end = h_start[order], h_end[order]
        starts = np.sort(np.concatenate([h_start, q]))
        nxt = np.searchsorted(starts, q, side="right")
        next_start = np.where(nxt < len(starts), starts[np.minimum(nxt, len(starts) - 1)],
                              np.iinfo(np.int64).max)
        d = np.minimum(QUEUE_SLICE_NS, next_start - q)
        d = np.minimum(d, entry[qi].astype(np.int64) - q)
        if len(h_start):
            k = np.searchsorted(h_start, q, side="right") - 1
            end = h_end[np.maximum(k, 0)]
            d = np.where((k >= 0) & (end > q), np.minimum(d, end - q), d)
        dur[qi] = np.maximum(d, 1)
    return dur


def _call_rows(calls: pd.DataFrame, origin: int) -> Iterator[pd.Series]:
    """Handler slices, queue slices and their flows, CHUNK_ROWS calls at a time."""
    if len(calls) == 0:
        return
    entry = _ints(calls["entry_ns"])
    exit_ = _ints(calls["exit_ns"])
    queue = _ints(calls["queue_ns"])
    src = _ints(calls["source_cpu"])
    tgt = _ints(calls["target_cpu"])
    local = pd.Series(pd.to_numeric(calls["local"], errors="coerce")).to_numpy(
        dtype=float, na_value=np.nan) == 1
    has_entry = np.isfinite(entry) & np.isfinite(tgt) & (tgt >= 0)
    flow = has_entry & np.isfinite(queue) & np.isfinite(src) & (src >= 0) & ~local
    qdur_all = _queue_durations(queue, src, entry, exit_, tgt, has_entry, flow)
    for lo in range(0, len(calls), CHUNK_ROWS):
        sl = slice(lo, lo + CHUNK_ROWS)
        part = calls.iloc[sl]
        idx = np.arange(lo, min(lo + CHUNK_ROWS, len(calls)))
        he = has_entry[sl]
        # Handler slices on the target CPU.
        e = entry[sl][he].astype(np.int64)
        x = exit_[sl][he]
        dur = np.where(np.isfinite(x), x - e, 0).clip(min=0).astype(np.int64)
        sub = part[he]
        func = _jstr(sub["func"]).to_numpy()
        sender = _jstr(sub["comm"]).to_numpy()
        lat = _ints(sub["latency_ns"])
        lat_s = pd.Series(np.where(np.isfinite(lat), lat, -1).astype(np.int64)).astype(str)
        yield ('{"ph":"X","pid":' + str(PID) + ',"tid":'
               + pd.Series(tgt[sl][he].astype(np.int64)).astype(str)
               + ',"ts":' + _us(e - origin) + ',"dur":' + _us(dur)
               + ',"cat":"csd","name":' + pd.Series(func)
               + ',"args":{"sender":' + pd.Series(sender)
               + ',"source_cpu":' + pd.Series(np.nan_to_num(src[sl][he], nan=-1)
                                              .astype(np.int64)).astype(str)
               + ',"latency_ns":' + lat_s + "}}")
        # Queue slice + flow start on the sender, flow end on the target's handler.
        fl = flow[sl]
        if not fl.any():
            continue
        q = queue[sl][fl].astype(np.int64)
        s_cpu = pd.Series(src[sl][fl].astype(np.int64)).astype(str)
        t_cpu = pd.Series(tgt[sl][fl].astype(np.int64)).astype(str)
        ent = entry[sl][fl].astype(np.int64)
        qdur = qdur_all[sl][fl]
        fid = pd.Series(idx[fl] + 1).astype(str)
        ffunc = pd.Series(_jstr(part[fl]["func"]).to_numpy())
        qts = _us(q - origin)
        yield ('{"ph":"X","pid":' + str(PID) + ',"tid":' + s_cpu + ',"ts":' + qts
               + ',"dur":' + _us(qdur) + ',"cat":"csd","name":"queue → CPU ' + t_cpu
               + '","args":{"func":' + ffunc + "}}")
        yield ('{"ph":"s","pid":' + str(PID) + ',"tid":' + s_cpu + ',"ts":' + qts
               + ',"cat":"' + FLOW_CAT + '","name":"' + FLOW_NAME + '","id":' + fid + "}")
        yield ('{"ph":"f","bp":"e","pid":' + str(PID) + ',"tid":' + t_cpu + ',"ts":'
               + _us(ent - origin) + ',"cat":"' + FLOW_CAT + '","name":"' + FLOW_NAME
               + '","id":' + fid + "}")


def _counter_rows(events: pd.DataFrame, origin: int) -> Iterator[pd.Series]:
    """MSR writes per CPU per time bin (one counter track per CPU, one series per MSR)."""
    kind = events["kind"]
    w = events[(kind == schema.Kind.MSR_WRITE.value).to_numpy()]
    if len(w) == 0:
        return
    ts = w["ts"].to_numpy(dtype=np.int64)
    t0, t1 = int(ts.min()), int(ts.max())
    n_cpus = max(1, w["cpu"].nunique())
    # Enough bins to see bursts, few enough that a sparse trace is not mostly zeros.
    n_bins = int(max(50, min(MAX_COUNTER_BINS, 200_000 // n_cpus, 4 * np.sqrt(len(w)))))
    bin_ns = max(1_000, -(-(t1 - t0 + 1) // n_bins))
    msr_cat = pd.Categorical(w["msr"].to_numpy())
    names = msr_cat.rename_categories([schema.msr_name(int(m)) for m in msr_cat.categories])
    grid = pd.DataFrame({"cpu": w["cpu"].to_numpy(), "bin": (ts - t0) // bin_ns,
                         "msr": names})
    counts = grid.groupby(["cpu", "bin", "msr"], observed=True).size().unstack("msr",
                                                                               fill_value=0)
    # Dense bins per CPU between its first and last write, so the counter drops to 0.
    parts = []
    for cpu, sub in counts.groupby(level="cpu"):
        b = sub.index.get_level_values("bin")
        full = pd.RangeIndex(int(b.min()), int(b.max()) + 2)
        dense = sub.droplevel("cpu").reindex(full, fill_value=0)
        dense.index.name = "bin"
        dense.insert(0, "cpu", cpu)
        parts.append(dense.reset_index())
    dense = pd.concat(parts, ignore_index=True)
    msrs = [c for c in dense.columns if c not in ("cpu", "bin")]
    args = "{" + pd.Series([""] * len(dense))
    for i, m in enumerate(msrs):
        args = args + ("," if i else "") + json.dumps(m) + ":" + dense[m].astype(str)
    args = args + "}"
    cpu_s = dense["cpu"].astype(str)
    yield ('{"ph":"C","pid":' + str(PID) + ',"tid":' + cpu_s + ',"ts":'
           + _us(t0 + dense["bin"].to_numpy(dtype=np.int64) * bin_ns - origin)
           + ',"name":"CPU ' + cpu_s + ' MSR writes per ' + f"{bin_ns / 1000:g}" + ' µs",'
           + '"args":' + args + "}")
    pk = w[(w["msr"] == schema.MSR_PKRS).to_numpy()]
    if len(pk):
        cpu_p = pk["cpu"].astype(int).astype(str).reset_index(drop=True)
        yield ('{"ph":"C","pid":' + str(PID) + ',"tid":' + cpu_p + ',"ts":'
               + _us(pk["ts"].to_numpy(dtype=np.int64) - origin)
               + ',"name":"CPU ' + cpu_p + ' PKRS value","args":{"value":'
               + pd.Series(pk["value"].to_numpy()).astype(str) + "}}")


def _violation_rows(v: pd.DataFrame, origin: int) -> Iterator[pd.Series]:
    if len(v) == 0:
        return
    t = _ints(v["time_ns"])
    tgt = _ints(v["target_cpu"])
    ok = np.isfinite(t) & np.isfinite(tgt)
    v = v[ok]
    if len(v) == 0:
        return
    tracer = pd.Series(pd.to_numeric(v["tracer_induced"], errors="coerce")).to_numpy(
        dtype=float, na_value=np.nan) == 1
    label = np.where(tracer, '"isolation violation (tracer-induced)"',
                     '"isolation violation"')
    yield ('{"ph":"i","s":"t","pid":' + str(PID) + ',"tid":'
           + pd.Series(tgt[ok].astype(np.int64)).astype(str) + ',"ts":'
           + _us(t[ok].astype(np.int64) - origin) + ',"cat":"isolation","name":'
           + pd.Series(label) + ',"args":{"func":' + pd.Series(_jstr(v["func"]).to_numpy())
           + ',"callsite":' + pd.Series(_jstr(v["callsite"]).to_numpy())
           + ',"sender":' + pd.Series(_jstr(v["comm"]).to_numpy())
           + ',"source_cpu":' + pd.Series(np.nan_to_num(_ints(v["source_cpu"]), nan=-1)
                                          .astype(np.int64)).astype(str) + "}}")


def write_perfetto(path: str | os.PathLike[str], trace: schema.Trace,
                   findings: Findings) -> dict[str, int]:
    """Write the JSON (atomically: a temporary file renamed into place). Returns counts."""
    path = Path(path)
    origin = origin_ns(trace, findings)
    counts = {"metadata": 0, "slices": 0, "flows": 0, "counters": 0, "instants": 0}
    # O_EXCL temp file, written through its descriptor, owned by the sudo user
    out_file, tmp = create_output(path, "w")
    other = {"pkstrace": {"origin_ns": origin, "source": trace.meta.source,
                          "backend": trace.meta.backend, "clock": trace.meta.clock,
                          "host": trace.meta.host.get("hostname", ""),
                          "isolated_cpus": list(findings.isolated_cpus)}}
    try:
        with out_file as out:
            out.write('{"displayTimeUnit":"ns","otherData":' + json.dumps(other)
                      + ',"traceEvents":[\n')
            first = True

            def emit(lines: pd.Series | list[str]) -> int:
                nonlocal first
                if len(lines) == 0:
                    return 0
                if not first:
                    out.write(",\n")
                # Series.str.cat joins in Arrow: ~3x faster than str.join over Arrow strings.
                out.write(lines.str.cat(sep=",\n") if isinstance(lines, pd.Series)
                          else ",\n".join(lines))
                first = False
                return len(lines)

            counts["metadata"] += emit(_metadata(trace, findings))
            for rows in _call_rows(findings.calls, origin):
                n = emit(rows)
                head = rows.iloc[0][:10] if len(rows) else ""
                if head.startswith('{"ph":"X"'):
                    counts["slices"] += n
                elif head.startswith('{"ph":"s"'):
                    counts["flows"] += n
            for rows in _counter_rows(trace.events, origin):
                counts["counters"] += emit(rows)
            for rows in _violation_rows(findings.violations, origin):
                counts["instants"] += emit(rows)
            out.write("\n]}\n")
            finish_output(out, tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return counts
