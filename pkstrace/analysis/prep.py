"""The events table made ready for analysis, and the vectorised helpers every family shares.

:class:`Prepared` holds the events sorted by timestamp (stably: events with equal
timestamps keep their order in the source, which is right within one CPU) with a
RangeIndex, so that *row number* is a total order that is correct per CPU. Most
families work on row numbers, not timestamps: "the last event on this CPU before
that one" is then exact even where a text trace has microsecond timestamps.

Everything here is numpy over columns; loops run over CPUs or categories, never
over events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pkstrace import schema

# Columns the analysis reads; `pkstrace replay` reads only these from a trace file.
ANALYSIS_COLUMNS: tuple[str, ...] = (
    "ts", "cpu", "pid", "comm", "kind", "preempt_depth", "msr", "value", "failed",
    "target_cpu", "cpumask", "callsite", "func", "csd",
    "next_pid",
)

KIND_CODE: dict[str, int] = {k: i for i, k in enumerate(schema.KINDS)}


def _as_kind_codes(col: pd.Series) -> np.ndarray:
    """kind column -> int8 codes into schema.KINDS (recoding a file's own dictionary)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in col.cat.categories]
        codes = col.cat.codes.to_numpy()
        if cats == list(schema.KINDS)[: len(cats)]:
            return codes.astype(np.int8, copy=False)
        lut = np.array([KIND_CODE.get(c, -1) for c in cats] + [-1], dtype=np.int8)
        return lut[codes]  # code -1 indexes the trailing -1
    return pd.Categorical(col.astype(object), dtype=schema.KIND_DTYPE).codes.astype(np.int8)


@dataclass
class Prepared:
    """Events sorted by ts (stable), RangeIndex; columns as numpy arrays on demand."""

    ev: pd.DataFrame
    meta: schema.TraceMeta
    kind: np.ndarray  # int8 codes into schema.KINDS
    n: int
    notes: list[str] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict)

    def col(self, name: str) -> np.ndarray:
        """A numeric column as a numpy array (NA sentinel if the table lacks it)."""
        a = self._cache.get(name)
        if a is None:
            if name in self.ev.columns:
                a = self.ev[name].to_numpy()
            else:
                c = schema.column(name)
                a = np.full(self.n, c.na, dtype=c.dtype)
            self._cache[name] = a
        return a

    def codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A string column as (codes, categories); code -1 = missing."""
        key = "codes:" + name
        got = self._cache.get(key)
        if got is None:
            if name in self.ev.columns:
                s = self.ev[name]
                if not isinstance(s.dtype, pd.CategoricalDtype):
                    s = s.astype("category")
                codes = s.cat.codes.to_numpy()
                cats = np.asarray(s.cat.categories.astype(str), dtype=object)
            else:
                codes = np.full(self.n, -1, dtype=np.int8)
                cats = np.array([], dtype=object)
            got = (codes, cats)
            self._cache[key] = got  # one store, so a parallel family never sees half
        return got

    def strings(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The string values of ``rows`` (object array; "" where missing)."""
        codes, cats = self.codes(name)
        lut = np.append(cats, "").astype(object)
        return lut[codes[rows]]

    def rows(self, *kinds: schema.Kind | str) -> np.ndarray:
        """Row numbers of events of the given kinds, in time order (int32 when the
        table allows: half the memory for every array derived from them).

        The families ask for the same kinds again and again: every kind's rows come
        from one stable radix sort of the int8 kind codes (made once, by
        :meth:`warm`), instead of a pass over all events per call."""
        by_kind = self._rows_by_kind()
        parts = [by_kind[KIND_CODE[str(k)]] for k in kinds]
        if len(parts) == 1:
            return parts[0]
        # each part is sorted: a stable sort of their concatenation merges the runs
        return np.sort(np.concatenate(parts), kind="stable")

    def _rows_by_kind(self) -> list[np.ndarray]:
        cached = self._cache.get("rows_by_kind")
        if cached is None:
            dt = np.int32 if self.n < 1 << 31 else np.int64
            order = np.argsort(self.kind, kind="stable").astype(dt, copy=False)
            order.setflags(write=False)  # shared by every family: read only
            sizes = np.bincount(self.kind[self.kind >= 0].astype(np.int64),
                                minlength=len(schema.KINDS))
            start = int((self.kind < 0).sum())  # code -1 (no kind) sorts first
            cached = []
            for size in sizes:
                cached.append(order[start:start + int(size)])
                start += int(size)
            self._cache["rows_by_kind"] = cached
        return cached

    def warm(self, columns: tuple[str, ...], string_columns: tuple[str, ...]) -> None:
        """Fill the lazy caches up front, so that families running in parallel
        threads only read them."""
        self._rows_by_kind()
        for c in columns:
            self.col(c)
        for c in string_columns:
            self.codes(c)


def prepare(trace: schema.Trace) -> Prepared:
    """Sort by timestamp (only if needed: files are usually sorted) and index by row."""
    ev = trace.events
    notes: list[str] = []
    ts = ev["ts"].to_numpy()
    if len(ts) > 1 and bool((ts[1:] < ts[:-1]).any()):
        order = np.argsort(ts, kind="stable")
        ev = ev.take(order)
        notes.append("events were not in time order; sorted by timestamp (stable)")
    if not isinstance(ev.index, pd.RangeIndex) or ev.index.start != 0 or ev.index.step != 1:
        ev = ev.reset_index(drop=True)
    kind = _as_kind_codes(ev["kind"])
    return Prepared(ev=ev, meta=trace.meta, kind=kind, n=len(ev), notes=notes)


# ---------------------------------------------------------------------------
# Vectorised building blocks
# ---------------------------------------------------------------------------

def small_int(a: np.ndarray) -> np.ndarray:
    """Narrow a non-negative small-valued int array so numpy's stable sort is a radix sort."""
    if len(a) == 0:
        return a.astype(np.int16)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi < 1 << 15:
        return a.astype(np.int16, copy=False)
    return a


def group_order(keys: np.ndarray) -> np.ndarray:
    """Stable order grouping equal keys; within a group the input order is kept."""
    return np.argsort(small_int(keys), kind="stable")


def asof_prev(left_group: np.ndarray, left_row: np.ndarray, right_group: np.ndarray,
              right_row: np.ndarray, n: int, inclusive: bool = False,
              right_index: tuple[np.ndarray | None, np.ndarray] | None = None) -> np.ndarray:
    """For each left event, the position in ``right_*`` of the last right event of the
    same group with a smaller row number (``<=`` if inclusive); -1 where none.
    Of right events with one group and one row, the last in input order counts.

    Rows are positions in the time-sorted table, so this is "the latest event of
    that kind on that CPU before this one", exact even on equal timestamps.
    The right side is put in (group, row) order once, as one int64 key
    ``group * (n + 1) + row`` (a radix sort by group where its rows are already in
    order, as the families' are); the left side is put in the same key order, and
    every left event finds its predecessor by a binary search of its own key (in
    ascending order, so each search starts where the last one ended).
    ``right_index``: ``_asof_index(right_group, right_row, n)``, where a caller
    looks up the same right side several times.
    """
    nl, nr = len(left_row), len(right_row)
    if nl == 0:
        return np.zeros(0, dtype=np.int64)
    if nr == 0:
        return np.full(nl, -1, dtype=np.int64)
    lg = np.asarray(left_group, dtype=np.int64)
    rkeys, rorder = right_index or _asof_index(right_group, right_row, n)
    if rkeys is None or not _fits_key(lg, n):
        return _asof_prev_sorting(left_group, left_row, right_group, right_row, inclusive)
    # the left keys in ascending order too: numpy's binary search then narrows each
    # search by the previous one's answer (and memory is walked forward, not at random)
    lkeys, lorder = _asof_index(lg, left_row, n)
    base = lkeys - np.asarray(left_row)[lorder]  # each left event's group's lowest key
    # strict: the first right key >= the left key ends the candidates; inclusive: > it
    pos = np.searchsorted(rkeys, lkeys, side="right" if inclusive else "left")
    del lkeys
    pos -= 1  # the last right key below (strict) / not above (inclusive) the left key
    ok = pos >= 0
    np.maximum(pos, 0, out=pos)
    ok &= rkeys[pos] >= base  # in the left event's group, not an earlier one
    found = np.empty(nl, dtype=np.int64)
    found[lorder] = np.where(ok, rorder[pos], -1)
    return found


def _asof_index(group: np.ndarray, row: np.ndarray, n: int
                ) -> tuple[np.ndarray | None, np.ndarray]:
    """(keys ``group * (n + 1) + row`` in ascending order, positions they came from),
    stable; (None, empty) where the keys would not fit in int64."""
    g = np.asarray(group, dtype=np.int64)
    if not _fits_key(g, n):
        return None, np.zeros(0, dtype=np.int64)
    key = g * (n + 1)
    key += row
    if len(row) < 2 or bool((row[1:] >= row[:-1]).all()):
        order = group_order(g)  # rows in order: only the groups need sorting
    else:
        order = np.argsort(key, kind="stable")
    return key[order], order


def _fits_key(group: np.ndarray, n: int) -> bool:
    """Whether ``group * (n + 1) + row`` (0 <= row <= n) fits in int64 for every group."""
    if len(group) == 0:
        return True
    return max(-int(group.min()), int(group.max()) + 1) < (1 << 62) // (n + 2)


def _asof_prev_sorting(left_group: np.ndarray, left_row: np.ndarray, right_group: np.ndarray,
                       right_row: np.ndarray, inclusive: bool) -> np.ndarray:
    """:func:`asof_prev` for groups too wide for one int64 key: merge both sides by
    row, stably regroup, carry the last right position forward."""
    nl = len(left_row)
    # at equal rows a strict lookup puts the left side first, an inclusive one last
    tie_l, tie_r = (1, 0) if inclusive else (0, 1)
    key = np.concatenate([left_row.astype(np.int64) * 2 + tie_l,
                          right_row.astype(np.int64) * 2 + tie_r])
    o = np.argsort(key, kind="stable")
    del key
    grp = np.concatenate([np.asarray(left_group, dtype=np.int64),
                          np.asarray(right_group, dtype=np.int64)])
    o = o[group_order(grp[o])]
    is_right = o >= nl
    last = np.where(is_right, np.arange(len(o)), -1)
    np.maximum.accumulate(last, out=last)
    lefts = np.flatnonzero(~is_right)
    cand = last[lefts]
    ok = cand >= 0
    ok[ok] = grp[o[cand[ok]]] == grp[o[lefts[ok]]]
    found = np.full(nl, -1, dtype=np.int64)
    found[o[lefts[ok]]] = o[cand[ok]] - nl
    return found


def prev_next_in_group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of the previous / next element with the same key (-1 where none).

    Elements are taken in their given order (time order); uses a stable sort by key.
    """
    m = len(keys)
    prev = np.full(m, -1, dtype=np.int64)
    nxt = np.full(m, -1, dtype=np.int64)
    if m < 2:
        return prev, nxt
    order = group_order(keys)
    ks = keys[order]
    same = ks[1:] == ks[:-1]
    prev[order[1:][same]] = order[:-1][same]
    nxt[order[:-1][same]] = order[1:][same]
    return prev, nxt


def dense_key(*parts: np.ndarray) -> np.ndarray:
    """Combine integer columns into one exact int64 key.

    A part with a small range (CPUs, codes) is used as its offset from its minimum;
    only wide parts (csd tokens, pids) are factorised (a hash pass, slower than the
    arithmetic).
    """
    # in place on one int64 array (these are full-length: a temporary per operation
    # would cost a pass and fresh memory each); the values are those of
    # key = key * span + offset, part after part
    key: np.ndarray | None = None
    for p in parts:
        span, lo = 0, 0
        if len(p) and p.dtype.kind in "iu":
            lo, hi = int(p.min()), int(p.max())
            if hi - lo < 1 << 24 and hi < 1 << 62:
                span = hi - lo + 1
                if p.dtype.kind == "u":
                    p = p.astype(np.int64)  # below 2**62: exact
        if span == 0:
            p, uniq = pd.factorize(p, sort=False)
            span, lo = max(len(uniq), 1), 0
        if key is None:
            key = p.astype(np.int64)  # a copy: the part is not ours to change
        else:
            key *= span
            key += p
        if lo:
            key -= lo
    if key is None:
        return np.zeros(0, dtype=np.int64)
    return key


def hashed_group_order(*parts: np.ndarray) -> np.ndarray:
    """Stable order grouping equal tuples of ``parts`` (input order kept inside a group).

    Sorts one 64-bit mix of the parts instead of factorising each part; a collision
    (two different tuples with one mix) is detected, since it leaves unequal tuples
    next to each other, and then the exact :func:`dense_key` is used instead.
    """
    m = len(parts[0])
    mix = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, p in enumerate(parts):
            mul = np.uint64(0x9E3779B97F4A7C15 + 2 * i)
            mix = (mix ^ p.astype(np.uint64)) * mul
            mix ^= mix >> np.uint64(29)
    order = np.argsort(mix, kind="stable")
    if m > 1:
        ms = mix[order]
        same_mix = ms[1:] == ms[:-1]
        same_tuple = np.ones(m - 1, dtype=bool)
        for p in parts:
            ps = p[order]
            same_tuple &= ps[1:] == ps[:-1]
        if (same_mix & ~same_tuple).any():
            return group_order(dense_key(*parts))
    return order


def grouped_order(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order grouping equal int keys, and whether each sorted element's
    successor has the same key (for :func:`neighbours`).

    Where key bits + position bits fit in 63, the positions ride in the low bits of
    the keys and a plain value sort (SIMD, about twice as fast as a stable argsort)
    gives the stable order; the sorted keys then come out of the same array, so no
    random gather over the inputs is needed to find the group boundaries (on tens
    of millions of events those gathers cost more than the sort)."""
    m = len(key)
    if m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    lo = int(key.min())
    span = int(key.max()) - lo
    sh = max(int(m - 1).bit_length(), 1)
    if span.bit_length() + sh <= 63:
        comp = key.astype(np.int64) - lo
        comp <<= sh
        comp |= np.arange(m, dtype=np.int64)
        comp.sort()
        order = comp & ((1 << sh) - 1)
        comp >>= sh
        same = comp[1:] == comp[:-1]
        return order, same
    order = np.argsort(key, kind="stable")
    ks = key[order]
    return order, ks[1:] == ks[:-1]


def neighbours(order: np.ndarray, equal_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prev / next position in the same group, from a grouping order and whether each
    sorted element's successor is in the same group."""
    m = len(order)
    dt = np.int32 if m < 1 << 31 else np.int64
    prev = np.full(m, -1, dtype=dt)
    nxt = np.full(m, -1, dtype=dt)
    prev[order[1:][equal_next]] = order[:-1][equal_next]
    nxt[order[:-1][equal_next]] = order[1:][equal_next]
    return prev, nxt


def latency_table(df: pd.DataFrame, keys: list[str], col: str,
                  value_order: np.ndarray | None = None) -> pd.DataFrame:
    """Percentiles of ``col`` per group: keys + findings.LATENCY_TABLE_COLUMNS.

    One sort by (group, value), then every group's percentiles by index arithmetic
    (numpy's default linear interpolation), so many groups cost no Python loop.
    ``value_order``: an argsort of ``df[col]`` (stable or not: equal values are
    interchangeable in every figure here), when several tables share it.
    """
    from pkstrace.analysis.findings import LATENCY_TABLE_COLUMNS

    vals = df[col].to_numpy(dtype=np.float64)
    ok = ~np.isnan(vals)
    if not ok.any():
        return pd.DataFrame({c: pd.Series([], dtype=object)
                             for c in [*keys, *LATENCY_TABLE_COLUMNS]})
    if value_order is None:
        value_order = np.argsort(vals, kind="stable")
    if ok.all():  # (matched remote calls all have a latency)
        d = df[keys]
    else:
        # NaN sorts last: keep the valid values, renumbered to positions among them
        value_order = value_order[: int(ok.sum())]
        renumber = np.cumsum(ok) - 1
        value_order = renumber[value_order]
        d = df.loc[ok, keys]
        vals = vals[ok]
    parts = []
    for k in keys:
        s = d[k]
        if isinstance(s.dtype, pd.CategoricalDtype):
            parts.append(s.cat.codes.to_numpy().astype(np.int64))
        else:
            parts.append(s.to_numpy())
    gkey = dense_key(*parts)
    # sort by value once, then stably by group (a radix sort for small group keys)
    order = value_order[group_order(gkey[value_order])]
    g, v = gkey[order], vals[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    counts = np.diff(np.r_[starts, len(g)])
    first_rows = order[starts]
    out = d.iloc[first_rows].reset_index(drop=True)
    for name, q in (("p50_ns", 0.5), ("p90_ns", 0.9), ("p99_ns", 0.99)):
        pos = q * (counts - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, counts - 1)
        frac = pos - lo
        a, b = v[starts + lo], v[starts + hi]
        out[name] = np.round(a + (b - a) * frac).astype(np.int64)
    out["count"] = counts.astype(np.int64)
    out["max_ns"] = v[starts + counts - 1].astype(np.int64)
    out["mean_ns"] = np.round(np.add.reduceat(v, starts) / counts).astype(np.int64)
    for k in keys:
        if isinstance(out[k].dtype, pd.CategoricalDtype):
            out[k] = out[k].astype(object)
    out = out.sort_values(["count", *keys], ascending=[False, *[True] * len(keys)],
                          kind="stable").reset_index(drop=True)
    return out[[*keys, *LATENCY_TABLE_COLUMNS]]


def percentiles(values: np.ndarray, sorted_values: np.ndarray | None = None
                ) -> dict[str, int | None]:
    """p50/p90/p99/max/mean of ``values`` (NaN ignored). ``sorted_values``: the same
    values in ascending order, if at hand: numpy's selection is then a fast pass
    (the result is the same: it depends only on the order statistics); the mean is
    always summed in the order of ``values``, as float sums depend on the order."""
    v = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if len(v) == 0:
        return {"p50_ns": None, "p90_ns": None, "p99_ns": None, "max_ns": None, "mean_ns": None}
    s = v if sorted_values is None else sorted_values[: len(v)]  # NaN sorts last
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    return {"p50_ns": int(round(p50)), "p90_ns": int(round(p90)), "p99_ns": int(round(p99)),
            "max_ns": int(v.max()), "mean_ns": int(round(float(v.mean())))}


def enclosing_handler(p: Prepared, rows: np.ndarray) -> np.ndarray:
    """For events at ``rows``: the row of the csd_function_entry whose handler they ran
    in (the last csd entry/exit on that CPU before them is an entry), else -1."""
    from pkstrace import schema as _schema

    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    cpu = p.col("cpu")
    # several families ask this of the same handlers: their lookup index is made once
    cached = p._cache.get("handler_index")
    if cached is None:
        hx = p.rows(_schema.Kind.CSD_ENTRY, _schema.Kind.CSD_EXIT)
        cached = (hx, _asof_index(cpu[hx], hx, p.n) if len(hx) else None)
        p._cache["handler_index"] = cached  # one store: a parallel family sees all or none
    hx, index = cached
    if len(hx) == 0:
        return np.full(len(rows), -1, dtype=np.int64)
    last = asof_prev(cpu[rows], rows, cpu[hx], hx, p.n, right_index=index)
    cand = hx[np.maximum(last, 0)]
    inside = (last >= 0) & (p.kind[cand] == KIND_CODE["csd_entry"])
    return np.where(inside, cand, -1)


def take(arr: np.ndarray, idx: np.ndarray, default: int | float = -1) -> np.ndarray:
    """``arr[idx]`` where idx >= 0, ``default`` where idx is -1 (also if arr is empty)."""
    ok = idx >= 0
    if len(arr) == 0:
        return np.full(len(idx), default)
    return np.where(ok, arr[np.where(ok, idx, 0)], default)
