"""Projection of a global update's stall to large machines, for three designs.

From a distribution of per-target round-trip costs (the trace's measured calls,
a calibration file from ``pkstrace bench ipi``, or the review's figures):

- ``serial``: one synchronous call per target CPU in turn (``wrmsrl_on_cpu`` in a
  ``for_each_online_cpu`` loop): stall = sum over the N-1 remote targets of a
  sampled round trip, plus one local call when local samples exist;
- ``broadcast``: queue to all, send, wait for all (``on_each_cpu_mask``):
  stall = the slowest of N-1 sampled round trips + (N-1) x per-target send cost;
- ``lazy``: no remote calls (each CPU picks the new value up at its next
  ``write_pkrs`` / context switch): stall on the updater = 0.

Sampling is numpy, vectorised and seeded (``ITERATIONS`` draws per row), so the
same input gives the same table. Round trip = delivery latency + handler time of a
matched remote call (entry - queue + exit - entry). Remote samples mix idle and
busy targets: with a calibration, a target is idle with the probability seen in
``DEFAULT_IDLE_FRACTION`` (half the targets idle: the middle of the review's band;
the traced workload's own idle share says nothing about another machine's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkstrace.analysis.findings import PROJECTION_COLUMNS
from pkstrace.errors import InputError

CPUS = (64, 256, 1024)
ITERATIONS = 2000
SEED = 0x504B53  # "PKS"
MIN_TRACE_SAMPLES = 10
DEFAULT_IDLE_FRACTION = 0.5

# The Dec 2020 review of the PKS series: a remote call costs 3-5 us to a busy CPU
# and about 100 us to one in a deep idle state, so a serial walk of 256 CPUs
# stalls the updater for 1-25 ms. Same shape as a calibration file.
REVIEW_CALIBRATION: dict[str, Any] = {
    "kind": "pkstrace-calibration",
    "version": 1,
    "host": {"note": "figures quoted in the Dec 2020 PKS review, not measured here"},
    "remote_ns": {"idle": [100_000.0], "busy": np.linspace(3_000, 5_000, 21).tolist()},
    "local_ns": [],
    "serial": [],
    "broadcast": [],
    "_source": "review",
}


# A round trip or stall longer than 1000 s is no measurement; sums of such values
# (1e308) overflow to inf and the projection's percentiles to NaN.
MAX_SAMPLE_NS = 1e12


def _num_list(v: Any, what: str, path: str) -> list[float]:
    if not isinstance(v, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and 0 <= x <= MAX_SAMPLE_NS for x in v):
        raise InputError(f"{path}: calibration {what} must be a list of non-negative "
                         f"numbers (at most {MAX_SAMPLE_NS:.0e} ns)")
    return [float(x) for x in v]


def load_calibration(path: str) -> dict[str, Any]:
    """Load and check a calibration file; "review" gives the review's built-in figures."""
    if path == "review":
        return dict(REVIEW_CALIBRATION)
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such calibration file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read calibration ({getattr(e, 'strerror', e)})") \
            from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: calibration is not JSON ({e.msg} at line {e.lineno})") \
            from None
    except RecursionError:  # arrays nested thousands deep
        raise InputError(f"{path}: calibration is not JSON (nested too deeply)") from None
    if not isinstance(d, dict) or d.get("kind") != "pkstrace-calibration":
        raise InputError(f"{path}: not a pkstrace calibration (kind != pkstrace-calibration)")
    if d.get("version") != 1:
        raise InputError(f"{path}: unsupported calibration version {d.get('version')!r} "
                         "(this pkstrace reads version 1)")
    remote = d.get("remote_ns")
    if not isinstance(remote, dict):
        raise InputError(f"{path}: calibration lacks remote_ns {{idle, busy}}")
    idle = _num_list(remote.get("idle", []), "remote_ns.idle", path)
    busy = _num_list(remote.get("busy", []), "remote_ns.busy", path)
    if not idle and not busy:
        raise InputError(f"{path}: calibration has no remote_ns samples")
    if not isinstance(d.get("host") or {}, dict):
        raise InputError(f"{path}: calibration host must be an object")
    out = {"kind": d["kind"], "version": 1, "host": d.get("host") or {},
           "remote_ns": {"idle": idle, "busy": busy},
           "local_ns": _num_list(d.get("local_ns", []), "local_ns", path),
           "_source": "calibration"}
    for design in ("serial", "broadcast"):
        rows = d.get(design, [])
        if not isinstance(rows, list):
            raise InputError(f"{path}: calibration {design} must be a list")
        clean = []
        for r in rows:
            if not isinstance(r, dict) or not isinstance(r.get("cpus"), int) \
                    or isinstance(r["cpus"], bool) or not 1 <= r["cpus"] <= 1 << 16:
                raise InputError(f"{path}: calibration {design} rows need an integer 'cpus' "
                                 "from 1 to 65536")
            clean.append({"cpus": r["cpus"],
                          "stall_ns": _num_list(r.get("stall_ns", []), f"{design}.stall_ns",
                                                path)})
        out[design] = clean
    return out


def _send_cost_from_broadcast(rows: list[dict[str, Any]]) -> float | None:
    """Per-target send cost: slope of median stall over CPUs in measured broadcasts."""
    pts = [(r["cpus"], float(np.median(r["stall_ns"]))) for r in rows if r["stall_ns"]]
    if len({c for c, _ in pts}) < 2:
        return None
    x, y = np.array([c for c, _ in pts], float), np.array([s for _, s in pts])
    slope = float(np.polyfit(x, y, 1)[0])
    return max(slope, 0.0)


def _project(remote: np.ndarray, idle_mask: np.ndarray | None, idle_fraction: float,
             local: np.ndarray, send_cost: float, source: str,
             rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for n in CPUS:
        k = n - 1
        if idle_mask is None:
            draws = remote[rng.integers(0, len(remote), size=(ITERATIONS, k))]
        else:
            idle_s, busy_s = remote[idle_mask], remote[~idle_mask]
            pick_idle = rng.random((ITERATIONS, k)) < idle_fraction
            if len(idle_s) == 0:
                pick_idle[:] = False
            if len(busy_s) == 0:
                pick_idle[:] = True
            draws = np.where(
                pick_idle,
                idle_s[rng.integers(0, max(len(idle_s), 1), size=(ITERATIONS, k))]
                if len(idle_s) else 0.0,
                busy_s[rng.integers(0, max(len(busy_s), 1), size=(ITERATIONS, k))]
                if len(busy_s) else 0.0)
        loc = local[rng.integers(0, len(local), size=ITERATIONS)] if len(local) else 0.0
        serial = draws.sum(axis=1) + loc
        broadcast = draws.max(axis=1) + k * send_cost + loc
        for design, v in (("serial", serial), ("broadcast", broadcast)):
            p50, p99 = np.percentile(v, [50, 99])
            rows.append({"cpus": n, "design": design, "p50_stall_ns": int(round(p50)),
                         "p99_stall_ns": int(round(p99)), "source": source})
        rows.append({"cpus": n, "design": "lazy", "p50_stall_ns": 0, "p99_stall_ns": 0,
                     "source": source})
    return rows


def projection(calls: pd.DataFrame, calibration: dict[str, Any] | None,
               send_gaps_ns: np.ndarray, notes: list[str]) -> pd.DataFrame:
    """Projection rows (PROJECTION_COLUMNS) from the trace and/or a calibration."""
    rng = np.random.default_rng(SEED)
    rows: list[dict[str, Any]] = []
    remote = calls[~calls["local"]] if len(calls) else calls
    rt = (remote["latency_ns"] + remote["handler_ns"]).to_numpy(dtype=float) if len(remote) \
        else np.zeros(0)
    ok = ~np.isnan(rt)
    rt = rt[ok]
    local = calls[calls["local"]]["handler_ns"].dropna().to_numpy(dtype=float) if len(calls) \
        else np.zeros(0)
    send_cost = float(np.median(send_gaps_ns)) if len(send_gaps_ns) else None
    if len(rt) >= MIN_TRACE_SAMPLES:
        # The trace's own distribution: idle/busy mix as measured (plain resampling).
        if send_cost is None:
            notes.append("projection: no broadcast in the trace, so the per-target send "
                         "cost of a broadcast is not measured and taken as 0")
        rows += _project(rt, None, 0.0, local, send_cost or 0.0, "trace", rng)
    elif calibration is None:
        notes.append(f"projection: fewer than {MIN_TRACE_SAMPLES} timed remote calls in the "
                     "trace and no calibration (--calibration FILE|review): no projection")
    if calibration is not None:
        source = calibration.get("_source", "calibration")
        idle_s = np.asarray(calibration["remote_ns"]["idle"], dtype=float)
        busy_s = np.asarray(calibration["remote_ns"]["busy"], dtype=float)
        samples = np.concatenate([idle_s, busy_s])
        mask = np.concatenate([np.ones(len(idle_s), bool), np.zeros(len(busy_s), bool)])
        frac = DEFAULT_IDLE_FRACTION
        cal_local = np.asarray(calibration.get("local_ns") or [], dtype=float)
        cal_send = _send_cost_from_broadcast(calibration.get("broadcast") or [])
        if cal_send is None:
            cal_send = send_cost or 0.0
        notes.append(f"projection ({source}): targets idle with probability {frac:.2f}")
        rows += _project(samples, mask, frac, cal_local, cal_send, source, rng)
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in PROJECTION_COLUMNS})
    return pd.DataFrame(rows)[PROJECTION_COLUMNS]
