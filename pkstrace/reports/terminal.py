"""The terminal report: a concise summary of Findings as plain-text tables.

``render(findings)`` is what ``pkstrace replay`` and ``pkstrace record`` print.
It never looks at events, only at the findings; long tables are cut to their
top rows (the JSON and HTML reports carry everything).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pkstrace import schema
from pkstrace.analysis.findings import Findings

TOP = 8


def _dur(ns: Any) -> str:
    """ns -> short human duration (us below a second)."""
    if ns is None or (isinstance(ns, float) and ns != ns):
        return "-"
    ns = float(ns)
    if ns >= 1e9:
        return f"{ns / 1e9:.2f}s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns"


def _at(f: Findings, ns: int) -> str:
    """A time as an offset from the trace's first event (absolute ns are in --json)."""
    first = f.trace.get("first_ns") or 0
    return "+" + _dur(int(ns) - int(first))


def _table(rows: list[list[Any]], headers: list[str], indent: str = "  ") -> str:
    cells = [[str(h) for h in headers]] + [[("-" if v is None else str(v)) for v in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r: list[str]) -> str:
        out = []
        for i, v in enumerate(r):
            numeric = v[:1].isdigit() or v[:1] == "-" and v[1:2].isdigit()
            out.append(v.rjust(widths[i]) if numeric else v.ljust(widths[i]))
        return (indent + "  ".join(out)).rstrip()

    return "\n".join(fmt(r) for r in cells)


def _more(df: pd.DataFrame, shown: int) -> str:
    return f"\n  ... {len(df) - shown} more (see --json)" if len(df) > shown else ""


def _header(f: Findings) -> list[str]:
    t = f.trace
    host = t.get("host") or {}
    lines = ["pkstrace replay: " + (t.get("source") or "trace")]
    facts = [f"{t.get('events', 0)} events", f"over {_dur(t.get('duration_ns') or 0)}",
             f"backend {t.get('backend', '?')}"]
    if t.get("aggregates"):  # counts mode: the kernel counted, few or no rows were kept
        facts[0] = (f"{t.get('counted_events', 0)} events counted in the kernel "
                    f"(counts mode, {t.get('events', 0)} event rows)")
    if host.get("kernel"):
        facts.append(f"kernel {host['kernel']}")
    if host.get("online_cpus"):
        facts.append(f"{len(host['online_cpus'])} CPUs")
    lines.append("  " + ", ".join(facts))
    lost = {k: v for k, v in (t.get("lost_events") or {}).items() if v}
    if lost:
        lines.append("  lost events: " + ", ".join(
            f"{schema.lost_cpu_label(k)}: {v}" for k, v in lost.items())
                     + " (the kernel dropped them: every figure below is partial)")
    if t.get("unparsed_lines"):
        lines.append("  unparsed lines: " + ", ".join(
            f"{k}: {v}" for k, v in t["unparsed_lines"].items()))
    if t.get("partial"):
        lines.append("  PARTIAL recording (ended early)")
    # What the recorder or importer said about its own data (filters, drops, cleanup).
    lines += [f"  recorded with: {n}" for n in t.get("notes") or []]
    return lines


def _counts(f: Findings) -> list[str]:
    c = f.counts
    if len(c) == 0:
        return []
    c = c.copy()
    c["what"] = [k if m is None else f"{k} {_msr(m)}" for k, m in zip(c["kind"], c["msr"],
                                                                       strict=True)]
    piv = c.pivot_table(index="what", columns="cpu", values="count", aggfunc="sum",
                        fill_value=0)
    rows = [[w, *[int(x) for x in piv.loc[w]], int(piv.loc[w].sum())] for w in piv.index]
    return ["", "Events per CPU",
            _table(rows, ["event", *[f"cpu{c}" for c in piv.columns], "total"])]


def _msr(m: Any) -> str:
    from pkstrace import schema

    return schema.msr_name(int(m)) if m is not None else ""


def _redundant(f: Findings) -> list[str]:
    out = ["", f"Redundant MSR writes: {f.redundant_total}"]
    t = f.redundant_by_task
    if len(t) and f.redundant_total:
        t = t[t["redundant"] > 0]
        rows = [[r.comm, r.callsite or "-", r.msr_name, r.writes, r.redundant]
                for r in t.head(TOP).itertuples()]
        out.append(_table(rows, ["task", "callsite", "msr", "writes", "redundant"])
                   + _more(t, TOP))
    wp = f.write_pkrs
    if len(wp):
        rows = [[r.cpu, r.calls, r.cache_hits, r.msr_writes] for r in wp.itertuples()]
        out += ["write_pkrs per CPU",
                _table(rows, ["cpu", "calls", "cache_hits", "msr_writes"])]
    return out


def _lat_rows(df: pd.DataFrame, keys: list[str]) -> list[list[Any]]:
    return [[*[getattr(r, k) for k in keys], r.count, _dur(r.p50_ns), _dur(r.p90_ns),
             _dur(r.p99_ns), _dur(r.max_ns)] for r in df.head(TOP).itertuples()]


def _cross(f: Findings) -> list[str]:
    s = f.cross_cpu_summary
    if not s or not s.get("count"):
        return ["", "Cross-CPU calls: none"]
    exits = "" if f.trace.get("aggregates") else f", {s['unmatched_exit']} exit"
    out = ["", f"Cross-CPU calls: {s['remote']} remote, {s['local']} local; "
               f"unmatched: {s['unmatched_queue']} queue, {s['unmatched_entry']} entry"
               + exits]
    if s.get("remote"):
        bucketed = bool(f.trace.get("aggregates"))
        lat = (f"  latency p50 {_dur(s['p50_ns'])}  p90 {_dur(s['p90_ns'])}  "
               f"p99 {_dur(s['p99_ns'])}  max {_dur(s['max_ns'])}")
        if bucketed:
            out.append(lat + "  (from log2 buckets: each figure within a factor of 2)")
        else:
            out.append(lat + f";  handler p50 {_dur(s['handler_p50_ns'])}  "
                       f"p99 {_dur(s['handler_p99_ns'])}")
            out.append(f"  target idle: {s['count_idle']} calls, "
                       f"p50 {_dur(s['p50_idle_ns'])};  target busy: {s['count_busy']} "
                       f"calls, p50 {_dur(s['p50_busy_ns'])}")
        hdr = ["count", "p50", "p90", "p99", "max"]
        out.append(_table(_lat_rows(f.latency_per_func, ["func"]), ["func", *hdr])
                   + _more(f.latency_per_func, TOP))
        if len(f.latency_per_source_target):
            out.append(_table(_lat_rows(f.latency_per_source_target,
                                        ["source_cpu", "target_cpu"]),
                              ["from", "to", *hdr]) + _more(f.latency_per_source_target, TOP))
        elif len(f.latency_per_target_cpu):  # counts mode: histograms are per target only
            out.append(_table(_lat_rows(f.latency_per_target_cpu, ["target_cpu"]),
                              ["to", *hdr]) + _more(f.latency_per_target_cpu, TOP))
    return out


def _updates(f: Findings) -> list[str]:
    e = f.episodes
    out = ["", f"Global-update episodes: {len(e)}"]
    if len(e):
        rows = [[r.episode, r.comm, r.source_cpu, r.func, r.mode, r.targets, r.target_cpus,
                 _dur(r.stall_ns), _dur(r.latency_sum_ns)] for r in e.head(TOP).itertuples()]
        out.append(_table(rows, ["ep", "task", "cpu", "func", "mode", "targets", "cpus",
                                 "stall", "lat_sum"]) + _more(e, TOP))
    pr = f.projection
    if len(pr):
        out.append("Projected stall of one global update (p50 / p99)")
        piv: dict[tuple[str, str], dict[int, str]] = {}
        for r in pr.itertuples():
            piv.setdefault((r.source, r.design), {})[int(r.cpus)] = \
                f"{_dur(r.p50_stall_ns)} / {_dur(r.p99_stall_ns)}"
        cpus = sorted({int(c) for c in pr["cpus"]})
        rows = [[src, design, *[v.get(c, "-") for c in cpus]] for (src, design), v in piv.items()]
        out.append(_table(rows, ["from", "design", *[f"{c} CPUs" for c in cpus]]))
    return out


def _isolation(f: Findings) -> list[str]:
    v = f.violations
    iso = ",".join(map(str, f.isolated_cpus)) if f.isolated_cpus else "none"
    if not f.isolated_cpus:
        return ["", "Isolation: no isolated or nohz_full CPUs (use --isolated LIST)"]
    n_tr = int(v["tracer_induced"].sum()) if len(v) else 0
    out = ["", f"Isolation violations on CPUs {iso}: {len(v)}"
               + (f" ({n_tr} induced by the tracer's own attach)" if n_tr else "")]
    if len(v):
        rows = [[_at(f, r.time_ns), r.source_cpu, r.target_cpu, r.comm or "-", r.func, r.via,
                 "yes" if r.tracer_induced else "no"] for r in v.head(TOP).itertuples()]
        out.append(_table(rows, ["at", "from", "to", "task", "func", "via", "tracer"])
                   + _more(v, TOP))
    return out


def _drift(f: Findings) -> list[str]:
    d = f.drift
    out = ["", f"Preempt-count drift: {len(d) if len(d) else 'none'}"]
    if len(d):
        rows = [[r.cpu, r.comm, r.callsite, r.calls, "+1" if r.step > 0 else "-1",
                 " ".join(map(str, r.depths[:12])) + (" ..." if len(r.depths) > 12 else "")]
                for r in d.head(TOP).itertuples()]
        out.append(_table(rows, ["cpu", "task", "callsite", "calls", "step", "depths"])
                   + _more(d, TOP))
    return out


def _lost(f: Findings) -> list[str]:
    lu = f.lost_updates
    out = ["", f"Lost updates: {len(lu) if len(lu) else 'none'}"]
    if len(lu):
        rows = [[_at(f, r.time_ns), r.cpu, r.type, f"{int(r.cached_value):#x}",
                 f"{int(r.msr_value):#x}", f"{int(r.expected_value):#x}", r.episode]
                for r in lu.head(TOP).itertuples()]
        out.append(_table(rows, ["at", "cpu", "type", "cached", "msr", "expected",
                                 "episode"]) + _more(lu, TOP))
    return out


def render(findings: Findings) -> str:
    f = findings
    lines: list[str] = _header(f)
    for part in (_counts, _redundant, _cross, _updates, _isolation, _drift, _lost):
        lines += part(f)
    present = {k: v for k, v in f.present().items() if v}
    lines.append("")
    lines.append("Findings: " + (", ".join(f"{k} {v}" for k, v in present.items())
                                 if present else "none"))
    for n in f.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"
