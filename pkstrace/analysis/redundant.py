"""Family 2: redundant MSR writes, and what write_pkrs' per-CPU cache saves.

Redundant write: an MSR write (not failed) on a CPU whose value equals the value
that CPU's MSR already holds, by the last write *or read* of the same MSR seen on
that CPU. MSRs whose writes are commands rather than state (``schema.MSRS`` with
``is_command``: x2APIC ICR, EOI, self-IPI, PRED_CMD ...) are never redundant.

Attribution: ``comm`` is the task running when the write happened; ``callsite``
is the function of the cross-CPU call handler the write ran in (e.g.
``__wrmsr_on_cpu`` for ``wrmsrl_on_cpu``), else ``write_pkrs`` for a PKRS write
that follows a write_pkrs call on that CPU, else "" (unknown: msr:write_msr
carries no caller).

write_pkrs, per CPU: ``calls``; ``cache_hits``: calls after which the MSR was not
written. Precisely: a write_pkrs call on CPU c by task p is a *cache hit* unless
the next event on c among {write_pkrs call, sched_switch, MSR 0x6e1 write not
made by a cross-CPU call handler} is an MSR 0x6e1 write by the same task p.
``msr_writes`` = calls - cache_hits (calls that wrote the MSR); ``pkrs_msr_writes``:
every MSR 0x6e1 write on c, including
remote ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import (
    REDUNDANT_BY_CPU_MSR_COLUMNS,
    REDUNDANT_BY_TASK_COLUMNS,
    WRITE_PKRS_COLUMNS,
)
from pkstrace.analysis.prep import (
    KIND_CODE,
    Prepared,
    asof_prev,
    enclosing_handler,
    prev_next_in_group,
)


@dataclass
class Redundant:
    total: int
    by_cpu_msr: pd.DataFrame
    by_task: pd.DataFrame
    write_pkrs: pd.DataFrame
    # per write_pkrs call (row order): rows, cache hit flags (used by lost updates)
    wp_rows: np.ndarray
    wp_hit: np.ndarray


def _empty(cols: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})


def redundant(p: Prepared) -> Redundant:
    cpu = p.col("cpu")
    rows = p.rows(schema.Kind.MSR_WRITE, schema.Kind.MSR_READ)
    rows = rows[p.col("failed")[rows] != 1]
    msr = p.col("msr")[rows]
    val = p.col("value")[rows]
    is_w = p.kind[rows] == KIND_CODE["msr_write"]
    total = 0
    by_cpu_msr = _empty(REDUNDANT_BY_CPU_MSR_COLUMNS)
    by_task = _empty(REDUNDANT_BY_TASK_COLUMNS)
    if len(rows):
        mcode, muniq = pd.factorize(msr, sort=True)
        key = cpu[rows].astype(np.int64) * len(muniq) + mcode
        prev, _ = prev_next_in_group(key)
        command = np.isin(muniq, schema.command_msrs())[mcode]
        red = is_w & (prev >= 0) & (val == val[np.maximum(prev, 0)]) & ~command
        total = int(red.sum())
        w = np.flatnonzero(is_w)
        wrows = rows[w]
        names = np.array([schema.msr_name(int(m)) for m in muniq], dtype=object)
        # per (cpu, msr): one dense key (mcode follows the MSR's sort order), counted
        # with bincount, in (cpu, msr) order as a sorted groupby gives it
        nm = len(muniq)
        wcpu = cpu[wrows].astype(np.int64)
        cpu_lo = int(wcpu.min()) if len(wcpu) else 0
        keys, writes, n_red = _count_by_key((wcpu - cpu_lo) * nm + mcode[w], red[w])
        kc = keys % nm
        by_cpu_msr = pd.DataFrame({
            "cpu": (keys // nm + cpu_lo).astype(cpu.dtype), "msr": muniq[kc],
            "msr_name": names[kc], "writes": writes, "redundant": n_red})
        # attribution of writes: handler func, else write_pkrs for PKRS writes
        handler = enclosing_handler(p, wrows)
        fcodes, fcats = p.codes("func")
        n_f = len(fcats)
        site = np.where(handler >= 0, fcodes[np.maximum(handler, 0)].astype(np.int64), n_f)
        pk = (msr[w] == schema.MSR_PKRS) & (handler < 0)
        if pk.any():
            wp = p.rows(schema.Kind.WRITE_PKRS, schema.Kind.SCHED_SWITCH)
            last = asof_prev(cpu[wrows[pk]], wrows[pk], cpu[wp], wp, p.n)
            by_wp = (last >= 0) & (p.kind[wp[np.maximum(last, 0)]] == KIND_CODE["write_pkrs"]) \
                if len(wp) else np.zeros(int(pk.sum()), bool)
            site[np.flatnonzero(pk)[by_wp]] = n_f + 1
        site_names = np.append(fcats.astype(object), ["", "write_pkrs"])
        comm_codes, comm_cats = p.codes("comm")
        # per (task, callsite, msr), in that sorted order (code -1, no comm, first)
        n_site = n_f + 2
        ckey = comm_codes[wrows].astype(np.int64) + 1
        keys, writes, n_red = _count_by_key((ckey * n_site + site) * nm + mcode[w], red[w])
        kc = keys % nm
        ks = (keys // nm) % n_site
        kcomm = keys // (nm * n_site) - 1
        bt = pd.DataFrame({
            "comm": np.append(comm_cats.astype(object), "")[kcomm],
            "callsite": site_names[ks], "msr": muniq[kc], "msr_name": names[kc],
            "writes": writes, "redundant": n_red})
        by_task = bt.sort_values(["redundant", "writes"], ascending=False, kind="stable")
        by_task = by_task[REDUNDANT_BY_TASK_COLUMNS].reset_index(drop=True)
        for df in (by_cpu_msr, by_task):
            df["writes"] = df["writes"].astype(np.int64)
            df["redundant"] = df["redundant"].astype(np.int64)
            df["msr"] = df["msr"].astype(np.int64)

    wp_rows, wp_hit, wp_table = _write_pkrs(p, cpu)
    return Redundant(total=total, by_cpu_msr=by_cpu_msr, by_task=by_task,
                     write_pkrs=wp_table, wp_rows=wp_rows, wp_hit=wp_hit)


def _count_by_key(key: np.ndarray, flag: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """(distinct keys in ascending order, rows per key, flagged rows per key)."""
    if len(key) and int(key.max()) < max(1 << 22, 4 * len(key)):
        n = np.bincount(key)
        uniq = np.flatnonzero(n)
        flagged = np.bincount(key, weights=flag, minlength=len(n))[uniq]
        return uniq, n[uniq].astype(np.int64), np.rint(flagged).astype(np.int64)
    uniq, inv, n = np.unique(key, return_inverse=True, return_counts=True)
    flagged = np.bincount(inv, weights=flag, minlength=len(uniq))
    return uniq, n.astype(np.int64), np.rint(flagged).astype(np.int64)


def _write_pkrs(p: Prepared, cpu: np.ndarray) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    calls = p.rows(schema.Kind.WRITE_PKRS)
    pk_writes = p.rows(schema.Kind.MSR_WRITE)
    pk_writes = pk_writes[(p.col("msr")[pk_writes] == schema.MSR_PKRS)
                          & (p.col("failed")[pk_writes] != 1)]
    # a write made by a cross-CPU call's handler (a remote update landing here) is
    # not the write of an interrupted write_pkrs call
    own_writes = pk_writes[enclosing_handler(p, pk_writes) < 0]
    if len(calls) == 0:
        cols = WRITE_PKRS_COLUMNS
        if len(pk_writes) == 0:
            return calls, np.zeros(0, dtype=bool), _empty(cols)
    seq = np.sort(np.concatenate([calls, own_writes, p.rows(schema.Kind.SCHED_SWITCH)]))
    _, nxt = prev_next_in_group(cpu[seq])
    pos = np.searchsorted(seq, calls)
    j = nxt[pos]
    nj = seq[np.maximum(j, 0)]
    pid = p.col("pid")
    wrote = (j >= 0) & (p.kind[nj] == KIND_CODE["msr_write"]) & (p.col("msr")[nj] ==
                                                                  schema.MSR_PKRS) \
        & (pid[nj] == pid[calls])
    hit = ~wrote
    all_cpus = np.union1d(cpu[calls], cpu[pk_writes])
    n_calls = pd.Series(1, index=cpu[calls]).groupby(level=0).sum()
    n_hits = pd.Series(hit.astype(np.int64), index=cpu[calls]).groupby(level=0).sum()
    n_pk = pd.Series(1, index=cpu[pk_writes]).groupby(level=0).sum()
    t = pd.DataFrame({"cpu": all_cpus.astype(np.int64)})
    t["calls"] = n_calls.reindex(all_cpus, fill_value=0).to_numpy().astype(np.int64)
    t["cache_hits"] = n_hits.reindex(all_cpus, fill_value=0).to_numpy().astype(np.int64)
    t["msr_writes"] = t["calls"] - t["cache_hits"]
    t["pkrs_msr_writes"] = n_pk.reindex(all_cpus, fill_value=0).to_numpy().astype(np.int64)
    return calls, hit, t
