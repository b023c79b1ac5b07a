"""Family 6: preempt-count drift, a leak that repeats with every call of a walk.

Within one task's run of csd_queue events from one callsite for one func on one CPU (one
traced global update, or, without global_update events, split where the next
queue comes more than ``gap_ns`` after the previous call completed, as for
episodes), look at the preempt depth each queue was issued at.
``per_cpu_ptr()`` paired with ``put_cpu_ptr()`` drops the count by one per
target, so the depth steps by -1 (or +1 for the opposite imbalance) from call to
call. A *drift* is a run of at least ``MIN_CALLS`` consecutive queues whose
depth changes by the same +1 or -1 at every step.

Not drift: depth differing between unrelated contexts (interrupts, locks held),
a single change, or changes that do not repeat in the same direction.

The ftrace flags column shows the depth as one hex digit, min(count & 0xff, 15),
so a count driven below zero saturates at f and its drift is visible only while
the depth stays in 1..14 (a walk that starts at depth 7, as the v3 module's does,
shows 7 6 5 ...). Steps are taken modulo 16 for sources that wrap instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkstrace.analysis.episodes import DEFAULT_GAP_NS, runs
from pkstrace.analysis.findings import DRIFT_COLUMNS
from pkstrace.analysis.prep import Prepared

MIN_CALLS = 3
DEPTH_MODULUS = 16


def drift(p: Prepared, queues: pd.DataFrame, gap_ns: int = DEFAULT_GAP_NS) -> pd.DataFrame:
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in DRIFT_COLUMNS})
    q = queues[queues["depth"].to_numpy() >= 0]
    if len(q) < MIN_CALLS:
        return empty
    order, run = runs(q, ["source_cpu", "pid", "callsite_code", "func_code"], gap_ns,
                      split_on_target=False)
    depth = q["depth"].to_numpy()[order]
    d = (depth[1:] - depth[:-1] + DEPTH_MODULUS // 2) % DEPTH_MODULUS - DEPTH_MODULUS // 2
    step = np.where((run[1:] == run[:-1]) & (np.abs(d) == 1), d, 0)
    # a streak: consecutive equal non-zero steps; streak id changes where the step changes
    change = np.ones(len(step), dtype=bool)
    change[1:] = step[1:] != step[:-1]
    sid = np.cumsum(change) - 1
    nz = step != 0
    if not nz.any():
        return empty
    sid_nz = sid[nz]
    lens = np.bincount(sid_nz)
    long_ids = np.flatnonzero(lens >= MIN_CALLS - 1)
    if len(long_ids) == 0:
        return empty
    # step i links ordered queues i and i+1; streak s covers steps starts[s]..ends[s],
    # i.e. queues starts[s]..ends[s]+1
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:] - 1, len(step) - 1)
    qq = q.iloc[order].reset_index(drop=True)
    ts = qq["ts"].to_numpy()
    rows = []
    for s in long_ids:  # one iteration per drift found, not per event
        a, b = int(starts[s]), int(ends[s]) + 1
        r = int(qq["row"].iat[a])
        rows.append({
            "cpu": int(qq["source_cpu"].iat[a]), "pid": int(qq["pid"].iat[a]),
            "comm": str(p.strings("comm", np.array([r]))[0]),
            "callsite": str(p.strings("callsite", np.array([r]))[0]),
            "start_ns": int(ts[a]), "end_ns": int(ts[b]), "calls": b - a + 1,
            "depths": [int(x) for x in depth[a:b + 1]], "step": int(step[a]),
        })
    return pd.DataFrame(rows)[DRIFT_COLUMNS]
