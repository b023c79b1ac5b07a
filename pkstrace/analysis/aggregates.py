"""Counts-mode traces: findings from the kernel's own aggregates (``meta.aggregates``).

``pkstrace record --backend bcc --mode counts`` keeps nothing per event: the BPF
program counts events per (CPU, kind, MSR), queued calls per (source, target,
func), and the queue -> entry latency of every matched call in log2 buckets per
(target CPU, func). The trace has no (or few) event rows and the aggregates in
its metadata (format 1, see backends/bcc.py)::

    {"format": 1, "per_cpu": [{cpu, kind, msr|None, count}],
     "calls": [{source_cpu, target_cpu, func, count}],
     "latency_log2": [{target_cpu, func, slot, low_ns, high_ns, count}],
     "unmatched_entries": n, "inflight_at_end": n}

From them: the counts table, and the cross-CPU summary and the per-target-CPU /
per-func latency tables. Percentiles are interpolated linearly within a log2
bucket ``[low_ns, high_ns)``: a figure is only known to lie in its bucket, so it
can be off by up to a factor of 2 (``max_ns`` is the upper bound of the highest
non-empty bucket, ``mean_ns`` weights bucket midpoints). The histograms have no
source CPU, callsite, handler time or idle state: those figures stay empty.
Everything here loops over aggregate rows (a few per CPU and func), never events.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import COUNTS_COLUMNS, LATENCY_TABLE_COLUMNS, Findings
from pkstrace.errors import InputError

AGGREGATES_FORMAT = 1
BUCKET_NOTE = ("counts mode: latency percentiles come from the kernel's log2 histograms, "
               "interpolated within buckets (each figure is only known to a factor of 2; "
               "max is the top bucket's upper bound); no handler time, source CPU, "
               "callsite or idle/busy split")


def uses_aggregates(meta: schema.TraceMeta) -> bool:
    """A counts-mode trace whose metadata holds the kernel's aggregates."""
    return meta.mode == "counts" and bool(meta.aggregates)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InputError(f"trace aggregates: {what} is not an integer ({v!r:.40})")
    return int(v)


def _rows(agg: dict[str, Any], key: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = agg.get(key) or []
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"trace aggregates: {key} is not a list of objects")
    for r in rows:
        missing = [f for f in fields if f not in r]
        if missing:
            raise InputError(f"trace aggregates: a {key} row lacks {missing[0]!r}")
    return rows


def counts_table(agg: dict[str, Any], notes: list[str]) -> pd.DataFrame:
    """COUNTS_COLUMNS from ``per_cpu`` (kinds the schema does not know are noted)."""
    rows = _rows(agg, "per_cpu", ("cpu", "kind", "msr", "count"))
    out = []
    unknown: dict[str, int] = {}
    for r in rows:
        kind = str(r["kind"])
        n = _int(r["count"], "per_cpu count")
        if kind not in schema.KINDS:
            unknown[kind] = unknown.get(kind, 0) + n
            continue
        msr = None if r["msr"] is None else _int(r["msr"], "per_cpu msr")
        out.append({"cpu": _int(r["cpu"], "per_cpu cpu"), "kind": kind,
                    "_m": -1 if msr is None else msr, "count": n})
    if unknown:
        notes.append("counts mode: event kinds this pkstrace does not model: "
                     + ", ".join(f"{k} ({v})" for k, v in sorted(unknown.items())))
    if not out:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in COUNTS_COLUMNS})
    df = pd.DataFrame(out)
    # the events path orders rows by (cpu, kind, msr): same here
    df["_k"] = df["kind"].map({k: i for i, k in enumerate(schema.KINDS)})
    df = df.sort_values(["cpu", "_k", "_m"], kind="stable").reset_index(drop=True)
    # MSR numbers stay Python ints beside None (pandas would make the column float)
    df["msr"] = pd.Series([None if m < 0 else int(m) for m in df["_m"]], dtype=object)
    return df[COUNTS_COLUMNS]


def histogram(agg: dict[str, Any]) -> pd.DataFrame:
    """latency_log2 as a DataFrame (target_cpu, func, low_ns, high_ns, count); empty
    buckets dropped."""
    rows = _rows(agg, "latency_log2", ("target_cpu", "func", "low_ns", "high_ns", "count"))
    h = pd.DataFrame({
        "target_cpu": [_int(r["target_cpu"], "latency_log2 target_cpu") for r in rows],
        "func": [str(r["func"]) for r in rows],
        "low_ns": [_int(r["low_ns"], "latency_log2 low_ns") for r in rows],
        "high_ns": [_int(r["high_ns"], "latency_log2 high_ns") for r in rows],
        "count": [_int(r["count"], "latency_log2 count") for r in rows],
    }, columns=["target_cpu", "func", "low_ns", "high_ns", "count"])
    if len(h) and ((h["count"] < 0).any() or (h["high_ns"] <= h["low_ns"]).any()
                   or (h["low_ns"] < 0).any()):
        raise InputError("trace aggregates: latency_log2 has a negative count or a bucket "
                         "whose high_ns is not above its low_ns")
    return h[h["count"] > 0].reset_index(drop=True)


def bucket_stats(low: np.ndarray, high: np.ndarray, count: np.ndarray) -> dict[str, int | None]:
    """Percentiles (linear within a bucket), max (top bucket's upper bound) and mean
    (bucket midpoints) of one histogram."""
    o = np.argsort(low, kind="stable")
    low, high, count = low[o].astype(float), high[o].astype(float), count[o].astype(float)
    n = float(count.sum())
    if n <= 0:
        return {"p50_ns": None, "p90_ns": None, "p99_ns": None, "max_ns": None,
                "mean_ns": None}
    cum = np.cumsum(count)
    before = cum - count
    out: dict[str, int | None] = {}
    for name, q in (("p50_ns", 0.5), ("p90_ns", 0.9), ("p99_ns", 0.99)):
        rank = q * n
        i = min(int(np.searchsorted(cum, rank, side="left")), len(cum) - 1)
        frac = (rank - before[i]) / count[i]
        out[name] = int(round(low[i] + (high[i] - low[i]) * min(max(frac, 0.0), 1.0)))
    out["max_ns"] = int(high[-1])
    out["mean_ns"] = int(round(float(((low + high) / 2 * count).sum()) / n))
    return out


def latency_table_from_hist(h: pd.DataFrame, key: str) -> pd.DataFrame:
    """key + LATENCY_TABLE_COLUMNS, one row per value of ``key`` (most calls first)."""
    rows = []
    # buckets of several (target, func) histograms with the same bounds add up
    h = h.groupby([key, "low_ns", "high_ns"], sort=True, as_index=False)["count"].sum()
    for k, g in h.groupby(key, sort=True):  # one group per target CPU / func
        st = bucket_stats(g["low_ns"].to_numpy(), g["high_ns"].to_numpy(),
                          g["count"].to_numpy())
        rows.append({key: k.item() if isinstance(k, np.generic) else k,
                     "count": int(g["count"].sum()), **st})
    cols = [key, *LATENCY_TABLE_COLUMNS]
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
    df = pd.DataFrame(rows)
    df = df.sort_values(["count", key], ascending=[False, True], kind="stable")
    return df[cols].reset_index(drop=True)


def apply(f: Findings, meta: schema.TraceMeta) -> None:
    """Fill counts and the cross-CPU figures of ``f`` from a counts-mode trace's
    aggregates (the event rows, if any, are a sample: the kernel counted them all)."""
    agg = meta.aggregates
    fmt = agg.get("format")
    if fmt != AGGREGATES_FORMAT:
        raise InputError(f"trace aggregates: format {fmt!r} is not one this pkstrace reads "
                         f"({AGGREGATES_FORMAT}); upgrade pkstrace")
    notes: list[str] = []
    f.counts = counts_table(agg, notes)
    counted = int(f.counts["count"].sum()) if len(f.counts) else 0
    f.trace["counted_events"] = counted
    f.trace["aggregates"] = True
    w = meta.window
    if not f.trace.get("duration_ns") and "start_ns" in w and "end_ns" in w:
        f.trace["duration_ns"] = max(int(w["end_ns"]) - int(w["start_ns"]), 0)

    h = histogram(agg)
    calls = _rows(agg, "calls", ("source_cpu", "target_cpu", "func", "count"))
    queued = sum(_int(r["count"], "calls count") for r in calls)
    unmatched_entries = _int(agg.get("unmatched_entries", 0), "unmatched_entries")
    inflight = _int(agg.get("inflight_at_end", 0), "inflight_at_end")
    remote = int(h["count"].sum()) if len(h) else 0
    # csd_function_entry counts every call run: remote ones (matched or not) and the
    # calls a CPU ran for itself
    entries = int(f.counts.loc[f.counts["kind"] == "csd_entry", "count"].sum()) \
        if len(f.counts) else 0
    local = max(entries - remote - unmatched_entries, 0)
    hb = h.groupby(["low_ns", "high_ns"], sort=True, as_index=False)["count"].sum()
    st = bucket_stats(hb["low_ns"].to_numpy(), hb["high_ns"].to_numpy(), hb["count"].to_numpy())
    summary = dict(f.cross_cpu_summary)
    summary.update({
        "count": remote + local, "remote": remote, "local": local,
        "unmatched_queue": inflight, "unmatched_entry": unmatched_entries,
        "unmatched_exit": 0,  # exits are counted, not matched, in the kernel
        **st,
        "handler_p50_ns": None, "handler_p99_ns": None,
        "count_idle": 0, "p50_idle_ns": None, "count_busy": 0, "p50_busy_ns": None,
    })
    summary.setdefault("cpus_with_lost_events", [])
    f.cross_cpu_summary = summary
    f.trace["calls_queued"] = queued
    if remote:
        f.latency_per_target_cpu = latency_table_from_hist(h, "target_cpu")
        f.latency_per_func = latency_table_from_hist(h, "func")
        notes.append(BUCKET_NOTE)
    if queued > remote + inflight:
        notes.append(f"counts mode: {queued} calls queued, {remote} matched to their entry, "
                     f"{inflight} still in flight at the end")
    f.notes.extend(notes)
