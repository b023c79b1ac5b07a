"""Findings: the output of the analysis, the input of every report.

Plain data: DataFrames plus small dataclasses, with one JSON form
(:meth:`Findings.to_json`). Reports render a Findings object and never look at
the events again. Column lists below are the contract between the analysis
modules (which fill them) and the reports (which read them); the JSON document's
version is ``JSON_SCHEMA_VERSION``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

JSON_SCHEMA_VERSION = 1

# Table columns, by finding family. A table always has exactly these columns
# (possibly zero rows), so reports and JSON consumers can rely on them.
COUNTS_COLUMNS = ["cpu", "kind", "msr", "count"]  # msr: MSR number or None
# Per-CPU activity over time for heatmaps: events per (time bin, cpu, series)
# series: "msr_write", "csd_queue_in" (calls arriving on cpu), "ipi_in", "write_pkrs", ...
# (as built by analysis/counts.py: "msr_write", "write_pkrs", "csd_in" (calls arriving
# on cpu), "ipi_in" (IPIs sent to cpu), "csd_out" (calls cpu queued for others))
ACTIVITY_COLUMNS = ["bin_start_ns", "cpu", "series", "count"]

REDUNDANT_BY_CPU_MSR_COLUMNS = ["cpu", "msr", "msr_name", "writes", "redundant"]
REDUNDANT_BY_TASK_COLUMNS = ["comm", "callsite", "msr", "msr_name", "writes", "redundant"]
WRITE_PKRS_COLUMNS = ["cpu", "calls", "cache_hits", "msr_writes", "pkrs_msr_writes"]

# One row per matched cross-CPU call.
CALLS_COLUMNS = [
    "queue_ns", "entry_ns", "exit_ns", "source_cpu", "target_cpu", "func", "callsite",
    "comm", "pid", "local", "latency_ns", "handler_ns", "target_idle", "episode",
]
LATENCY_TABLE_COLUMNS = ["count", "p50_ns", "p90_ns", "p99_ns", "max_ns", "mean_ns"]

EPISODE_COLUMNS = [
    "episode", "start_ns", "end_ns", "source_cpu", "pid", "comm", "func", "callsite",
    "mode", "targets", "target_cpus", "stall_ns", "latency_sum_ns", "calls",
]
PROJECTION_COLUMNS = ["cpus", "design", "p50_stall_ns", "p99_stall_ns", "source"]

VIOLATION_COLUMNS = [
    "time_ns", "source_cpu", "target_cpu", "func", "callsite", "comm", "pid",
    "tracer_induced", "via",
]
DRIFT_COLUMNS = [
    "cpu", "pid", "comm", "callsite", "start_ns", "end_ns", "calls", "depths", "step",
]
LOST_UPDATE_COLUMNS = [
    "time_ns", "cpu", "type", "cached_value", "msr_value", "expected_value", "episode",
    "detail",
]


def empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})


@dataclass
class Findings:
    """Everything the analysis found in one trace."""

    # From the trace metadata: host facts, window, backend, probes, lost events.
    trace: dict[str, Any] = field(default_factory=dict)
    counts: pd.DataFrame = field(default_factory=lambda: empty(COUNTS_COLUMNS))
    activity: pd.DataFrame = field(default_factory=lambda: empty(ACTIVITY_COLUMNS))
    activity_bin_ns: int = 0

    redundant_total: int = 0
    redundant_by_cpu_msr: pd.DataFrame = field(
        default_factory=lambda: empty(REDUNDANT_BY_CPU_MSR_COLUMNS))
    redundant_by_task: pd.DataFrame = field(
        default_factory=lambda: empty(REDUNDANT_BY_TASK_COLUMNS))
    write_pkrs: pd.DataFrame = field(default_factory=lambda: empty(WRITE_PKRS_COLUMNS))

    calls: pd.DataFrame = field(default_factory=lambda: empty(CALLS_COLUMNS))
    # {"count", "remote", "local", "unmatched_queue", "unmatched_entry",
    #  "p50_ns", "p90_ns", "p99_ns", "max_ns", "mean_ns"}
    cross_cpu_summary: dict[str, Any] = field(default_factory=dict)
    latency_per_target_cpu: pd.DataFrame = field(
        default_factory=lambda: empty(["target_cpu", *LATENCY_TABLE_COLUMNS]))
    latency_per_func: pd.DataFrame = field(
        default_factory=lambda: empty(["func", *LATENCY_TABLE_COLUMNS]))
    latency_per_callsite: pd.DataFrame = field(
        default_factory=lambda: empty(["callsite", *LATENCY_TABLE_COLUMNS]))
    latency_per_source_target: pd.DataFrame = field(
        default_factory=lambda: empty(["source_cpu", "target_cpu", *LATENCY_TABLE_COLUMNS]))

    episodes: pd.DataFrame = field(default_factory=lambda: empty(EPISODE_COLUMNS))
    projection: pd.DataFrame = field(default_factory=lambda: empty(PROJECTION_COLUMNS))

    isolated_cpus: list[int] = field(default_factory=list)
    violations: pd.DataFrame = field(default_factory=lambda: empty(VIOLATION_COLUMNS))
    drift: pd.DataFrame = field(default_factory=lambda: empty(DRIFT_COLUMNS))
    lost_updates: pd.DataFrame = field(default_factory=lambda: empty(LOST_UPDATE_COLUMNS))

    # Ground truth of an emulated host (copied from the trace metadata).
    ground_truth: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def present(self) -> dict[str, int]:
        """Finding kinds present, with their counts (what --fail-on gates on)."""
        return {
            "redundant": int(self.redundant_total),
            "isolation": int(len(self.violations)),
            "drift": int(len(self.drift)),
            "lost": int(len(self.lost_updates)),
        }

    def to_json(self) -> dict[str, Any]:
        """The versioned JSON document (see docs/json-schema.md)."""
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "trace": jsonable(self.trace),
            "counts": records(self.counts),
            "activity": {"bin_ns": int(self.activity_bin_ns),
                         "rows": records(self.activity)},
            "findings": {
                "isolation_violations": records(self.violations),
                "redundant_msr_writes": {
                    "total": int(self.redundant_total),
                    "per_cpu_msr": records(self.redundant_by_cpu_msr),
                    "per_task_callsite": records(self.redundant_by_task),
                    "write_pkrs": records(self.write_pkrs),
                },
            },
            "cross_cpu_calls": {
                **jsonable(self.cross_cpu_summary),
                "per_target_cpu": records(self.latency_per_target_cpu),
                "per_func": records(self.latency_per_func),
                "per_callsite": records(self.latency_per_callsite),
                "per_source_target": records(self.latency_per_source_target),
            },
            "global_updates": {
                "episodes": records(self.episodes),
                "projection": records(self.projection),
            },
            "isolated_cpus": list(self.isolated_cpus),
            "preempt_drift": records(self.drift),
            "lost_updates": records(self.lost_updates),
            "ground_truth": jsonable(self.ground_truth),
            "notes": list(self.notes),
        }


def jsonable(v: Any) -> Any:
    """Make a value JSON-safe: numpy scalars -> Python, NaN -> None."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [jsonable(x) for x in v.tolist()]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if math.isnan(f) or math.isinf(f) else f
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _column_values(s: pd.Series) -> list[Any]:
    """One column as JSON-safe Python values, converted column-wise (numpy's tolist
    makes Python ints / floats / bools at C speed); only object columns holding
    something other than strings go value by value through jsonable."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(object)
    a = s.to_numpy()
    if a.dtype.kind in "iub":
        return a.tolist()
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():  # NaN / inf -> None, as jsonable does
            out = a.astype(object)
            out[bad] = None
            return out.tolist()
        return a.tolist()
    if a.dtype.kind == "O" and pd.api.types.infer_dtype(a, skipna=False) == "string":
        return a.tolist()
    return [jsonable(v) for v in a.tolist()]


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as a list of flat JSON rows."""
    if df is None or len(df) == 0:
        return []
    names = [str(c) for c in df.columns]
    cols = [_column_values(df.iloc[:, i]) for i in range(df.shape[1])]
    return [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]
