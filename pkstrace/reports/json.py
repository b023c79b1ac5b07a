"""The JSON report: one document per trace (``Findings.to_json``), and its JSON Schema.

``render(findings)`` is what ``pkstrace replay --json`` prints.
``replay_schema()`` / ``trace_columns_schema()`` are generated from the same
column lists the analysis fills (findings.py) and from ``schema.COLUMNS``, so the
documented schema cannot drift from the code: a column without a type below makes
schema generation fail (and the tests with it).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pkstrace import schema
from pkstrace.analysis import findings as fd

DRAFT = "https://json-schema.org/draft/2020-12/schema"

INT: dict[str, Any] = {"type": "integer"}
INT_OR_NULL: dict[str, Any] = {"type": ["integer", "null"]}
NUM_OR_NULL: dict[str, Any] = {"type": ["number", "null"]}
STR: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "boolean"}
NS = {"type": "integer", "description": "nanoseconds"}
NS_OR_NULL = {"type": ["integer", "null"], "description": "nanoseconds"}

# Type of every table column, by name (one name means one thing in every table).
COLUMN_TYPES: dict[str, dict[str, Any]] = {
    "cpu": INT, "kind": {"type": "string", "enum": list(schema.KINDS)},
    "msr": {"type": ["integer", "null"], "description": "MSR number; null for non-MSR events"},
    "count": INT, "bin_start_ns": NS, "series": STR,
    "msr_name": STR, "writes": INT, "redundant": INT, "comm": STR, "callsite": STR,
    "calls": INT, "cache_hits": INT, "msr_writes": INT, "pkrs_msr_writes": INT,
    "target_cpu": INT, "source_cpu": INT, "func": STR,
    "p50_ns": NS, "p90_ns": NS, "p99_ns": NS, "max_ns": NS, "mean_ns": NS,
    "episode": INT, "start_ns": NS, "end_ns": NS, "pid": INT,
    "mode": {"type": "string", "enum": ["serial", "broadcast"]},
    "targets": INT, "target_cpus": {"type": "string", "description": "CPU list, e.g. 1-3,6"},
    "stall_ns": NS, "latency_sum_ns": NS,
    "cpus": INT, "design": {"type": "string", "enum": ["serial", "broadcast", "lazy"]},
    "p50_stall_ns": NS, "p99_stall_ns": NS,
    "source": {"type": "string", "enum": ["trace", "calibration", "review"]},
    "time_ns": NS, "tracer_induced": BOOL,
    "via": {"type": "string", "enum": ["csd", "csd_entry", "ipi"]},
    "depths": {"type": "array", "items": INT}, "step": {"type": "integer", "enum": [-1, 1]},
    "type": {"type": "string", "enum": ["stale_cache", "remote_overwrite"]},
    "cached_value": INT, "msr_value": INT, "expected_value": INT, "detail": STR,
}

# Scalar keys of cross_cpu_calls (crosscpu.py fills them).
CROSS_CPU_SUMMARY: dict[str, dict[str, Any]] = {
    "count": INT, "remote": INT, "local": INT,
    "unmatched_queue": INT, "unmatched_entry": INT, "unmatched_exit": INT,
    "p50_ns": NS_OR_NULL, "p90_ns": NS_OR_NULL, "p99_ns": NS_OR_NULL, "max_ns": NS_OR_NULL,
    "mean_ns": NS_OR_NULL, "handler_p50_ns": NS_OR_NULL, "handler_p99_ns": NS_OR_NULL,
    "count_idle": INT, "p50_idle_ns": NS_OR_NULL, "count_busy": INT, "p50_busy_ns": NS_OR_NULL,
    "cpus_with_lost_events": {"type": "array", "items": INT},
}


def _table(columns: list[str], description: str = "") -> dict[str, Any]:
    missing = [c for c in columns if c not in COLUMN_TYPES]
    if missing:
        raise KeyError(f"JSON schema: no type for columns {missing}")
    t: dict[str, Any] = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {c: COLUMN_TYPES[c] for c in columns},
            "required": list(columns),
            "additionalProperties": False,
        },
    }
    if description:
        t["description"] = description
    return t


def _obj(props: dict[str, Any], description: str = "", closed: bool = True) -> dict[str, Any]:
    o: dict[str, Any] = {"type": "object", "properties": props, "required": list(props)}
    if closed:
        o["additionalProperties"] = False
    if description:
        o["description"] = description
    return o


def _lat(keys: list[str]) -> dict[str, Any]:
    return _table([*keys, *fd.LATENCY_TABLE_COLUMNS])


def replay_schema() -> dict[str, Any]:
    """JSON Schema of the document ``pkstrace replay --json`` prints."""
    return {
        "$schema": DRAFT,
        "$id": f"https://pkstrace.invalid/replay-v{fd.JSON_SCHEMA_VERSION}.json",
        "title": "pkstrace replay document",
        **_obj({
            "schema_version": {"const": fd.JSON_SCHEMA_VERSION},
            "trace": {"type": "object", "description": "trace metadata: source, backend, "
                      "events, window, host, lost_events, unparsed_lines ..."},
            "counts": _table(fd.COUNTS_COLUMNS, "events per (cpu, kind, msr)"),
            "activity": _obj({"bin_ns": INT,
                              "rows": _table(fd.ACTIVITY_COLUMNS, "events per time bin")}),
            "findings": _obj({
                "isolation_violations": _table(fd.VIOLATION_COLUMNS,
                                               "one row per call landing on an isolated CPU"),
                "redundant_msr_writes": _obj({
                    "total": INT,
                    "per_cpu_msr": _table(fd.REDUNDANT_BY_CPU_MSR_COLUMNS),
                    "per_task_callsite": _table(fd.REDUNDANT_BY_TASK_COLUMNS),
                    "write_pkrs": _table(fd.WRITE_PKRS_COLUMNS),
                }),
            }),
            "cross_cpu_calls": _obj({
                **CROSS_CPU_SUMMARY,
                "per_target_cpu": _lat(["target_cpu"]),
                "per_func": _lat(["func"]),
                "per_callsite": _lat(["callsite"]),
                "per_source_target": _lat(["source_cpu", "target_cpu"]),
            }, "delivery latency (queue -> entry) of matched remote calls"),
            "global_updates": _obj({
                "episodes": _table(fd.EPISODE_COLUMNS),
                "projection": _table(fd.PROJECTION_COLUMNS),
            }),
            "isolated_cpus": {"type": "array", "items": INT},
            "preempt_drift": _table(fd.DRIFT_COLUMNS),
            "lost_updates": _table(fd.LOST_UPDATE_COLUMNS),
            "ground_truth": {"type": "object"},
            "notes": {"type": "array", "items": STR},
        }),
    }


def trace_columns_schema() -> dict[str, Any]:
    """JSON Schema of one row of a trace's events table (schema.COLUMNS)."""
    props: dict[str, Any] = {}
    for c in schema.COLUMNS:
        if c.dtype == "kind":
            t: dict[str, Any] = {"type": "string", "enum": list(schema.KINDS)}
        elif c.dtype == "category":
            t = {"type": "string"}
        else:
            info = np.iinfo(np.dtype(c.dtype))
            t = {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}
        t["description"] = f"{c.doc} (dtype {c.dtype}; not applicable = {c.na!r})"
        props[c.name] = t
    return {
        "$schema": DRAFT,
        "$id": f"https://pkstrace.invalid/trace-columns-v{schema.FORMAT_VERSION}.json",
        "title": f"pkstrace trace event row (format version {schema.FORMAT_VERSION})",
        **_obj(props),
    }


def render(findings: fd.Findings) -> str:
    return json.dumps(findings.to_json(), indent=1, sort_keys=False) + "\n"
