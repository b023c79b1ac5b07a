"""Family 1: per-CPU event counts by kind and MSR, and per-CPU activity over time.

``counts``: one row per (cpu, kind, msr) with its number of events; ``msr`` is
the MSR number for msr_write / msr_read, else None.

``activity``: events per (time bin, CPU, series) for heatmaps. The bin width is
a 1-2-5 step chosen so the window has at most ``MAX_BINS`` bins. Series:

- ``msr_write``: MSR writes on the CPU;
- ``write_pkrs``: write_pkrs calls on the CPU;
- ``csd_in``: cross-CPU calls arriving on the CPU (csd_function_entry with a csd
  token, i.e. not a call the CPU ran for itself);
- ``ipi_in``: IPIs sent *to* the CPU (ipi_send by target; a cpumask send counts
  once for every CPU in the mask);
- ``csd_out``: calls the CPU queued for other CPUs (csd_queue by source).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import ACTIVITY_COLUMNS, COUNTS_COLUMNS
from pkstrace.analysis.prep import KIND_CODE, Prepared

MAX_BINS = 200
ACTIVITY_SERIES = ("msr_write", "write_pkrs", "csd_in", "ipi_in", "csd_out")


def counts(p: Prepared) -> pd.DataFrame:
    if p.n == 0:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in COUNTS_COLUMNS})
    cpu = p.col("cpu")
    is_msr = (p.kind == KIND_CODE["msr_write"]) | (p.kind == KIND_CODE["msr_read"])
    msr_rows = np.flatnonzero(is_msr)
    del is_msr
    msr_uniq = np.zeros(0, dtype=np.int64)
    codes = np.zeros(0, dtype=np.int64)
    if len(msr_rows):
        codes, msr_uniq = pd.factorize(p.col("msr")[msr_rows], sort=True)
    cpu_lo = int(cpu.min())
    nk, nm = len(schema.KINDS) + 1, len(msr_uniq) + 1
    # one key per event; int32 when it fits (memory: this is a full-length array)
    span = (int(cpu.max()) - cpu_lo + 1) * nk * nm
    dt = np.int32 if span < 1 << 31 else np.int64
    key = (cpu.astype(dt) - dt(cpu_lo)) * dt(nk)
    key += p.kind.astype(dt) + dt(1)
    key *= dt(nm)
    key[msr_rows] += (codes + 1).astype(dt)  # 0 = not an MSR event
    uniq, cnt = _count_keys(key)
    m = uniq % nm
    k = (uniq // nm) % nk - 1
    c = uniq // (nm * nk) + cpu_lo
    kinds = np.array([*schema.KINDS, ""], dtype=object)
    msrs = np.append(np.asarray(msr_uniq, dtype=object), None)
    out = pd.DataFrame({
        "cpu": c.astype(np.int64),
        "kind": kinds[k],
        "msr": np.where(m > 0, msrs[m - 1], None),
        "count": cnt.astype(np.int64),
    })
    return out[COUNTS_COLUMNS]


def _count_keys(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct non-negative keys, their counts): bincount when the key range is
    small (no sort), else np.unique."""
    if len(key) and int(key.max()) < max(1 << 22, 4 * len(key)):
        cnt = np.bincount(key)
        uniq = np.flatnonzero(cnt)
        return uniq, cnt[uniq]
    return np.unique(key, return_counts=True)


def bin_width(span_ns: int, max_bins: int = MAX_BINS) -> int:
    """Smallest 1-2-5 x 10^k ns width giving at most max_bins bins over span_ns."""
    need = max(1, -(-int(span_ns) // max_bins))
    mag = 1
    while True:
        for step in (1, 2, 5):
            if step * mag >= need:
                return step * mag
        mag *= 10


def _cpumask_cpus(cats: np.ndarray) -> list[list[int]]:
    out = []
    for text in cats:
        try:
            out.append(schema.parse_cpulist(str(text)))
        except ValueError:
            out.append([])
    return out


def activity(p: Prepared) -> tuple[pd.DataFrame, int]:
    """Long table (bin_start_ns, cpu, series, count) and the bin width in ns."""
    if p.n == 0:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in ACTIVITY_COLUMNS}), 0
    ts = p.col("ts")
    t0 = int(ts[0])
    width = bin_width(int(ts[-1]) - t0 + 1)
    cpu = p.col("cpu")
    parts: list[pd.DataFrame] = []

    def add(series: str, rows: np.ndarray, cpus: np.ndarray) -> None:
        ok = cpus >= 0
        rows, cpus = rows[ok], cpus[ok].astype(np.int64)
        if len(rows) == 0:
            return
        b = (ts[rows] - t0) // width
        ncpu = int(cpus.max()) + 1
        key, cnt = _count_keys(b * ncpu + cpus)
        parts.append(pd.DataFrame({
            "bin_start_ns": t0 + (key // ncpu) * width, "cpu": key % ncpu,
            "series": series, "count": cnt.astype(np.int64)}))

    r = p.rows(schema.Kind.MSR_WRITE)
    add("msr_write", r, cpu[r])
    r = p.rows(schema.Kind.WRITE_PKRS)
    add("write_pkrs", r, cpu[r])
    r = p.rows(schema.Kind.CSD_ENTRY)
    r = r[p.col("csd")[r] != 0]
    add("csd_in", r, cpu[r])
    r = p.rows(schema.Kind.CSD_QUEUE)
    add("csd_out", r, cpu[r])
    ipi_rows, ipi_cpus = expand_ipi_targets(p)
    add("ipi_in", ipi_rows, ipi_cpus)
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in ACTIVITY_COLUMNS}), width
    out = pd.concat(parts, ignore_index=True)
    return out[ACTIVITY_COLUMNS], width


def expand_ipi_targets(p: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """ipi_send events as (row, target cpu) pairs, a cpumask send once per CPU in it."""
    r = p.rows(schema.Kind.IPI_SEND)
    tgt = p.col("target_cpu")[r].astype(np.int64)
    single = tgt >= 0
    rows, cpus = [r[single]], [tgt[single]]
    mask_rows = r[~single]
    if len(mask_rows):
        codes, cats = p.codes("cpumask")
        mc = codes[mask_rows].astype(np.int64)
        ok = mc >= 0
        mask_rows, mc = mask_rows[ok], mc[ok]
        cpus_of = _cpumask_cpus(cats)
        lens = np.array([len(x) for x in cpus_of], dtype=np.int64)
        flat = np.array([c for x in cpus_of for c in x], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
        reps = lens[mc]
        offs = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        rows.append(np.repeat(mask_rows, reps))
        cpus.append(flat[np.repeat(starts[mc], reps) + offs] if len(flat)
                    else np.zeros(0, dtype=np.int64))
    return np.concatenate(rows), np.concatenate(cpus)
