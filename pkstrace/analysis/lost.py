"""Family 7: lost PKRS updates (the review's race between the cache and the MSR).

``stale_cache``: a write_pkrs call on CPU c with value v is a cache hit (see
redundant.py: no MSR 0x6e1 write followed), yet the last MSR 0x6e1 value seen on
c before it (write or read) is m != v. The per-CPU cache said "the MSR holds v";
it held m: cache and MSR have diverged, so an update was lost.
``cached_value`` = v, ``msr_value`` = m, ``expected_value`` = v.

``remote_overwrite``: an MSR 0x6e1 write W (value u) made on CPU c inside a
remote call's handler (a global update reaching c) is followed, as the next
0x6e1 write on c, by a write N of another value whose write_pkrs call on c had
started *before* W: that call read the old cache, then overwrote the update.
``cached_value`` = the value of that write_pkrs call, ``msr_value`` = N's value,
``expected_value`` = u.

``episode``: the global-update episode that raced, or -1. For stale_cache, the episode
running at that moment (a serial walk stores into c's cache, then reaches c's MSR
later: the writer's stale hit falls between), else the episode of the last remote
call to c before the event; for remote_overwrite, the episode of the call that made W.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import LOST_UPDATE_COLUMNS
from pkstrace.analysis.prep import (
    Prepared,
    asof_prev,
    enclosing_handler,
    prev_next_in_group,
    take,
)


def running_episode(t: np.ndarray, episodes: pd.DataFrame | None) -> np.ndarray:
    """The episode whose [start_ns, end_ns] holds each time (the latest started), else -1."""
    out = np.full(len(t), -1, np.int64)
    if episodes is None or len(episodes) == 0 or len(t) == 0:
        return out
    order = np.argsort(episodes["start_ns"].to_numpy(), kind="stable")
    start = episodes["start_ns"].to_numpy()[order]
    end = episodes["end_ns"].to_numpy()[order]
    ep = episodes["episode"].to_numpy()[order]
    k = np.searchsorted(start, t, side="right") - 1
    inside = (k >= 0) & (t <= end[np.maximum(k, 0)])
    out[inside] = ep[k[inside]]
    return out


def lost_updates(p: Prepared, wp_rows: np.ndarray, wp_hit: np.ndarray,
                 calls: pd.DataFrame, episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in LOST_UPDATE_COLUMNS})
    cpu = p.col("cpu")
    ts, val = p.col("ts"), p.col("value")
    pk = p.rows(schema.Kind.MSR_WRITE, schema.Kind.MSR_READ)
    pk = pk[(p.col("msr")[pk] == schema.MSR_PKRS) & (p.col("failed")[pk] != 1)]
    if len(pk) == 0:
        return empty
    remote = calls[(~calls["local"]) & (calls["episode"] >= 0)]
    rem_entry = remote["_entry_row"].to_numpy()
    rem_ep = remote["episode"].to_numpy()
    ro = np.argsort(rem_entry, kind="stable")
    rem_entry, rem_ep = rem_entry[ro], rem_ep[ro]
    parts = []

    # (a) stale cache
    hits = wp_rows[wp_hit]
    if len(hits):
        last = asof_prev(cpu[hits], hits, cpu[pk], pk, p.n)
        known = last >= 0
        m = val[pk[np.maximum(last, 0)]]
        bad = known & (m != val[hits])
        h = hits[bad]
        if len(h):
            ep = asof_prev(cpu[h], h, cpu[rem_entry], rem_entry, p.n)
            running = running_episode(ts[h], episodes)
            parts.append(pd.DataFrame({
                "time_ns": ts[h], "cpu": cpu[h], "type": "stale_cache",
                "cached_value": val[h], "msr_value": m[bad], "expected_value": val[h],
                "episode": np.where(running >= 0, running, take(rem_ep, ep)),
                "detail": "write_pkrs skipped the MSR write (cache hit) but the MSR held "
                          "another value"}))

    # (b) remote overwrite
    writes = pk[p.kind[pk] == schema.KINDS.index("msr_write")]
    if len(writes) > 1:
        handler = enclosing_handler(p, writes)
        csd_of_handler = p.col("csd")[np.maximum(handler, 0)]
        is_remote_w = (handler >= 0) & (csd_of_handler != 0)
        _, nxt = prev_next_in_group(cpu[writes])
        has_n = (nxt >= 0) & is_remote_w
        w_idx = np.flatnonzero(has_n)
        n_idx = nxt[w_idx]
        w_rows, n_rows = writes[w_idx], writes[n_idx]
        differs = (val[n_rows] != val[w_rows]) & ~is_remote_w[n_idx]
        wp = p.rows(schema.Kind.WRITE_PKRS)
        owner = asof_prev(cpu[n_rows], n_rows, cpu[wp], wp, p.n)
        owner_row = wp[np.maximum(owner, 0)] if len(wp) else np.zeros(len(n_rows), np.int64)
        raced = differs & (owner >= 0) & (owner_row < w_rows)
        if raced.any():
            wr, nr, orow = w_rows[raced], n_rows[raced], owner_row[raced]
            hrow = handler[w_idx][raced]
            k = np.searchsorted(rem_entry, hrow)
            found = (k < len(rem_entry)) & (rem_entry[np.minimum(k, len(rem_entry) - 1)] == hrow) \
                if len(rem_entry) else np.zeros(len(hrow), bool)
            parts.append(pd.DataFrame({
                "time_ns": ts[nr], "cpu": cpu[nr], "type": "remote_overwrite",
                "cached_value": val[orow], "msr_value": val[nr], "expected_value": val[wr],
                "episode": np.where(found, rem_ep[np.minimum(k, max(len(rem_ep) - 1, 0))]
                                    if len(rem_ep) else -1, -1),
                "detail": "a remote update's PKRS write was overwritten by a write_pkrs "
                          "call that began before it"}))
    if not parts:
        return empty
    out = pd.concat(parts, ignore_index=True).sort_values("time_ns", kind="stable")
    for c in ("cached_value", "msr_value", "expected_value"):
        out[c] = out[c].astype(np.uint64)
    out["episode"] = out["episode"].astype(np.int64)
    return out[LOST_UPDATE_COLUMNS].reset_index(drop=True)
