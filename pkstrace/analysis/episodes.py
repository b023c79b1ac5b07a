"""Family 4: global-update episodes, one task calling many CPUs in turn or at once.

An *episode* is a run of csd_queue events (matched or not) issued by one task
(pid) on one CPU from one callsite for one func, to at least ``MIN_TARGETS``
distinct target CPUs, where a new run starts when

- the task enters a new global update (a ``global_update`` event, where the
  trace has them: they delimit updates exactly), or, for calls outside any
  traced update, the next queue comes more than ``gap_ns`` after the previous
  call completed (its exit, else its entry, else its queue); when the trace has
  global_update events, only runs inside an update are episodes; or
- the target CPU does not increase (``for_each_cpu`` walks and
  ``smp_call_function_many`` both visit CPUs in ascending order, so a repeat means
  a new walk).

``mode``: ``serial`` when every call was queued after the previous one completed
(a ``wrmsrl_on_cpu`` walk), else ``broadcast``. ``stall_ns`` = last completion -
first queue (how long the caller was held up); ``latency_sum_ns`` = sum of the
delivery latencies (entry - queue) of its matched calls.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import EPISODE_COLUMNS
from pkstrace.analysis.prep import Prepared, asof_prev, dense_key, group_order

DEFAULT_GAP_NS = 1_000_000
MIN_TARGETS = 2


def update_segments(p: Prepared, queues: pd.DataFrame) -> np.ndarray:
    """For each queue: the row of the last global_update event (a kprobe on
    update_global_pkrs & co) of the same task before it, else -1.

    Where the trace has these events they delimit the global updates exactly, so
    no time-gap guess is needed (an emulated host can stall a walk for
    milliseconds between two calls).
    """
    gu = p.rows(schema.Kind.GLOBAL_UPDATE)
    if len(gu) == 0 or len(queues) == 0:
        return np.full(len(queues), -1, dtype=np.int64)
    pid = p.col("pid")
    found = asof_prev(queues["pid"].to_numpy(), queues["row"].to_numpy(), pid[gu], gu, p.n)
    return np.where(found >= 0, gu[np.maximum(found, 0)], -1)


def runs(queues: pd.DataFrame, by: list[str], gap_ns: int,
         split_on_target: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split queues into runs: (order into queues, run id per ordered queue).

    Queues inside a global update (``segment`` >= 0) are split by update; the
    others by the time gap between one call's completion and the next queue.
    """
    if len(queues) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    parts = [queues[c].to_numpy() for c in by]
    seg = queues["segment"].to_numpy() if "segment" in queues.columns else None
    if seg is not None:
        parts.append(seg)
    key = dense_key(*parts)
    order = group_order(key)
    g = key[order]
    ts = queues["ts"].to_numpy()[order]
    done = queues["done_ns"].to_numpy()[order]
    new = np.ones(len(order), dtype=bool)
    gap = ts[1:] - done[:-1] > gap_ns
    if seg is not None:
        gap &= seg[order][1:] < 0
    new[1:] = (g[1:] != g[:-1]) | gap
    if split_on_target:
        tgt = queues["target_cpu"].to_numpy()[order]
        new[1:] |= tgt[1:] <= tgt[:-1]
    return order, np.cumsum(new) - 1


def episodes(p: Prepared, queues: pd.DataFrame,
             gap_ns: int = DEFAULT_GAP_NS) -> tuple[pd.DataFrame, np.ndarray]:
    """Episodes table, and the episode id of every queue (-1 = none), aligned to queues."""
    ep_of_queue = np.full(len(queues), -1, dtype=np.int64)
    if len(queues) == 0:
        return _empty(), ep_of_queue
    order, run = runs(queues, ["source_cpu", "pid", "callsite_code", "func_code"], gap_ns,
                      split_on_target=True)
    # distinct targets per run first: most runs (a task calling one CPU) are dropped
    # here, before any per-run aggregation
    tgt_o = queues["target_cpu"].to_numpy()[order]
    width = int(tgt_o.max()) + 2
    pairs = np.sort(run * width + tgt_o + 1)  # a plain sort: faster than np.unique here
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
    pr_run, pr_tgt = pairs // width, pairs % width - 1
    ntargets = np.bincount(pr_run, minlength=int(run[-1]) + 1)
    keep_row = ntargets[run] >= MIN_TARGETS
    if "segment" in queues.columns:
        seg = queues["segment"].to_numpy()[order]
        if (seg >= 0).any():
            # the trace marks its global updates: other multi-CPU runs (a kworker
            # waking tasks on two CPUs) are not reported as episodes
            keep_row &= seg >= 0
    if not keep_row.any():
        return _empty(), ep_of_queue
    order, run = order[keep_row], run[keep_row]
    q = queues.iloc[order].reset_index(drop=True)
    q["run"] = run
    ts, done = q["ts"].to_numpy(), q["done_ns"].to_numpy()
    # overlap: queued before the previous call of the same run completed
    overlap = np.zeros(len(q), dtype=bool)
    overlap[1:] = (run[1:] == run[:-1]) & (ts[1:] < done[:-1])
    q["overlap"] = overlap
    q["lat"] = np.where(q["entry_ns"].to_numpy() >= 0, q["entry_ns"].to_numpy() - ts, 0)
    g = q.groupby("run", sort=True)
    agg = pd.DataFrame({
        "start_ns": g["ts"].min(), "end_ns": g["done_ns"].max(),
        "calls": g.size(), "latency_sum_ns": g["lat"].sum(),
        "overlap": g["overlap"].any(),
        "source_cpu": g["source_cpu"].first(), "pid": g["pid"].first(),
        "comm_code": g["comm_code"].first(), "callsite_code": g["callsite_code"].first(),
        "func_code": g["func_code"].first(),
    })
    agg["targets"] = ntargets[agg.index.to_numpy()]
    keep = agg.sort_values("start_ns", kind="stable")
    kept_runs = keep.index.to_numpy()
    ep_id_of_run = np.full(len(ntargets), -1, dtype=np.int64)
    ep_id_of_run[kept_runs] = np.arange(len(kept_runs))
    ep_of_queue[order] = ep_id_of_run[run]
    # target lists: one string per episode (a loop over episodes, not events)
    sel = ep_id_of_run[pr_run] >= 0
    tgt_by_ep = pd.Series(pr_tgt[sel]).groupby(ep_id_of_run[pr_run[sel]]).agg(list)
    _, comm_cats = p.codes("comm")
    _, cs_cats = p.codes("callsite")
    _, fn_cats = p.codes("func")

    def names(cats: np.ndarray, codes: np.ndarray) -> np.ndarray:
        return np.append(cats, "").astype(object)[codes]

    out = pd.DataFrame({
        "episode": np.arange(len(keep), dtype=np.int64),
        "start_ns": keep["start_ns"].to_numpy().astype(np.int64),
        "end_ns": keep["end_ns"].to_numpy().astype(np.int64),
        "source_cpu": keep["source_cpu"].to_numpy().astype(np.int64),
        "pid": keep["pid"].to_numpy().astype(np.int64),
        "comm": names(comm_cats, keep["comm_code"].to_numpy()),
        "func": names(fn_cats, keep["func_code"].to_numpy()),
        "callsite": names(cs_cats, keep["callsite_code"].to_numpy()),
        "mode": np.where(keep["overlap"].to_numpy(), "broadcast", "serial"),
        "targets": keep["targets"].to_numpy().astype(np.int64),
        "target_cpus": [schema.format_cpulist(tgt_by_ep.get(i, [])) for i in range(len(keep))],
        "stall_ns": (keep["end_ns"] - keep["start_ns"]).to_numpy().astype(np.int64),
        "latency_sum_ns": keep["latency_sum_ns"].to_numpy().astype(np.int64),
        "calls": keep["calls"].to_numpy().astype(np.int64),
    })
    return out[EPISODE_COLUMNS], ep_of_queue


def broadcast_send_gaps(queues: pd.DataFrame, ep_of_queue: np.ndarray,
                        episodes_df: pd.DataFrame) -> np.ndarray:
    """Gaps between consecutive queues inside broadcast episodes: the per-target send cost."""
    if len(episodes_df) == 0:
        return np.zeros(0, dtype=np.int64)
    bcast = episodes_df.loc[episodes_df["mode"] == "broadcast", "episode"].to_numpy()
    m = np.isin(ep_of_queue, bcast)
    if m.sum() < 2:
        return np.zeros(0, dtype=np.int64)
    ep = ep_of_queue[m]
    ts = queues["ts"].to_numpy()[m]
    o = np.lexsort((ts, ep))
    ep, ts = ep[o], ts[o]
    same = ep[1:] == ep[:-1]
    return (ts[1:] - ts[:-1])[same]


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in EPISODE_COLUMNS})
