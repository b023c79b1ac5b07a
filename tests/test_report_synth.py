"""Synthetic Findings for the views this host cannot produce (PKS, isolation, drift).

The host has no PKS, no isolated CPUs and no write_pkrs (see ENVIRONMENT.md), so the
report's PKS views are exercised with Findings shaped like those of the emulated
host's `v3` scenario (a serial wrmsrl_on_cpu walk over 7 CPUs, isolated 6-7) and
its `lazy` counterpart. Every table has exactly the documented columns. Hostile
strings sit in the trace-derived fields to test escaping.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkstrace.analysis import findings as fd
from pkstrace.analysis.findings import Findings

HOSTILE_COMM = "<img src=x onerror=alert(1)>"
HOSTILE_SYMBOL = "</script><script>alert(1)</script>"
HOSTILE_HOST = "<b>host</b>&amp;"


def _latency_table(calls: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    cols = [*by, *fd.LATENCY_TABLE_COLUMNS]
    if len(calls) == 0:
        return fd.empty(cols)
    g = calls.groupby(by, observed=True)["latency_ns"]
    out = pd.DataFrame({
        "count": g.size(), "p50_ns": g.quantile(0.5), "p90_ns": g.quantile(0.9),
        "p99_ns": g.quantile(0.99), "max_ns": g.max(), "mean_ns": g.mean()}).reset_index()
    return out[cols]


def synth_findings(variant: str = "v3", n_calls: int = 2800, seed: int = 1,
                   n_cpus: int = 8, isolated: tuple[int, ...] = (6, 7),
                   duration_ns: int = 500_000_000, activity_bin_ns: int = 1_000_000,
                   n_episodes: int = 400) -> Findings:
    """Findings of an emulated host. variant "v3": serial global updates via
    wrmsrl_on_cpu (remote calls, stalls, violations, drift); "lazy": none of those."""
    rng = np.random.default_rng(seed)
    start = 1_000_000_000
    lazy = variant == "lazy"
    cpus = np.arange(n_cpus)
    f = Findings()
    f.trace = {
        "host": {"hostname": HOSTILE_HOST, "kernel": "6.12.107-amd64",
                 "cpu_model": "QEMU TCG max", "online_cpus": cpus.tolist(),
                 "isolated_cpus": list(isolated), "nohz_full_cpus": list(isolated),
                 "pks": True, "emulated": True},
        "window": {"start_ns": start, "end_ns": start + duration_ns},
        "backend": "tracefs", "clock": "mono", "source": f"{variant}.pkstrace",
        "scenario": {"name": variant, "cpus": n_cpus},
        "probes": [{"name": "msr:write_msr", "required": True, "attached": True, "reason": ""},
                   {"name": "kprobe:write_pkrs", "required": False, "attached": True,
                    "reason": "tracefs kprobe"}],
        "lost_events": {}, "notes": [],
    }
    f.isolated_cpus = list(isolated)
    f.activity_bin_ns = activity_bin_ns
    n_calls = 0 if lazy else n_calls
    # Calls: the caller on CPU 0 walks CPUs 1..n-1 (serial), one at a time.
    funcs = np.array(["pks_update_remote", HOSTILE_SYMBOL, "do_sync_core"], dtype=object)
    target = rng.integers(1, n_cpus, n_calls)
    idle = rng.random(n_calls) < 0.5
    lat = (rng.lognormal(np.log(45_000), 0.35, n_calls) * np.where(idle, 1.4, 1.0)).astype(
        np.int64)
    handler = rng.integers(800, 3000, n_calls)
    # Synchronous calls, one at a time: each is queued after the previous one returned,
    # so handlers on one CPU never overlap (as in a real serial walk).
    busy = lat + handler + 2_000
    room = max(duration_ns - 1_000_000 - int(busy.sum()), n_calls)
    gaps = rng.random(n_calls)
    gaps = (gaps / gaps.sum() * room).astype(np.int64) if n_calls else gaps.astype(np.int64)
    queue = start + np.concatenate([[0], np.cumsum(busy + gaps)[:-1]]).astype(np.int64) \
        if n_calls else np.zeros(0, dtype=np.int64)
    func = funcs[rng.choice(3, n_calls, p=[0.8, 0.1, 0.1])]
    f.calls = pd.DataFrame({
        "queue_ns": queue, "entry_ns": queue + lat, "exit_ns": queue + lat + handler,
        "source_cpu": np.zeros(n_calls, dtype=np.int64), "target_cpu": target,
        "func": func, "callsite": np.where(func == "do_sync_core",
                                           "on_each_cpu_cond_mask+0x20/0x60",
                                           "wrmsrl_on_cpu+0x4c/0x80"),
        "comm": np.where(rng.random(n_calls) < 0.5, HOSTILE_COMM, "pks-test"),
        "pid": np.full(n_calls, 321), "local": np.zeros(n_calls, dtype=bool),
        "latency_ns": lat, "handler_ns": handler, "target_idle": idle,
        "episode": np.full(n_calls, -1),
    })[fd.CALLS_COLUMNS]
    remote = f.calls
    f.cross_cpu_summary = {
        "count": n_calls + 50, "remote": n_calls, "local": 50, "unmatched_queue": 0,
        "unmatched_entry": 0,
        **({k: float(np.quantile(lat, q)) for k, q in
            (("p50_ns", .5), ("p90_ns", .9), ("p99_ns", .99), ("max_ns", 1.0))}
           if n_calls else {}),
        "mean_ns": float(lat.mean()) if n_calls else None,
    }
    f.latency_per_target_cpu = _latency_table(remote, ["target_cpu"])
    f.latency_per_func = _latency_table(remote, ["func"])
    f.latency_per_callsite = _latency_table(remote, ["callsite"])
    f.latency_per_source_target = _latency_table(remote, ["source_cpu", "target_cpu"])
    # Activity: timer MSR writes everywhere, PKRS writes, calls arriving on targets.
    n_bins = duration_ns // activity_bin_ns
    rows = []
    for series, scale in (("msr_write", 6.0), ("csd_in", 0.0 if lazy else 3.0)):
        b, c = np.meshgrid(np.arange(n_bins), cpus, indexing="ij")
        cnt = rng.poisson(scale * (1 + np.sin(b / 30.0) ** 2), b.shape)
        if series == "csd_in":
            cnt[:, 0] = 0
        keep = cnt > 0
        rows.append(pd.DataFrame({"bin_start_ns": start + b[keep] * activity_bin_ns,
                                  "cpu": c[keep], "series": series, "count": cnt[keep]}))
    f.activity = pd.concat(rows, ignore_index=True)[fd.ACTIVITY_COLUMNS]
    f.counts = pd.DataFrame({
        "cpu": np.repeat(cpus, 2), "kind": ["msr_write", "csd_entry"] * n_cpus,
        "msr": [0x6E1, None] * n_cpus,
        "count": np.tile([40 if lazy else 400, 0 if lazy else n_calls // n_cpus], n_cpus)})
    # Redundant writes and write_pkrs cache.
    f.redundant_total = 12 if lazy else 1450
    f.redundant_by_task = pd.DataFrame({
        "comm": [HOSTILE_COMM, "pks-test", "kworker/0:1"],
        "callsite": [HOSTILE_SYMBOL, "pks_update_remote+0x1a/0x40", "write_pkrs+0x22/0x60"],
        "msr": [0x6E1] * 3, "msr_name": ["IA32_PKRS"] * 3,
        "writes": [1000, 600, 50] if not lazy else [10, 5, 2],
        "redundant": [900, 500, 50] if not lazy else [7, 3, 2]})[fd.REDUNDANT_BY_TASK_COLUMNS]
    f.redundant_by_cpu_msr = pd.DataFrame({
        "cpu": cpus, "msr": 0x6E1, "msr_name": "IA32_PKRS",
        "writes": rng.integers(100, 300, n_cpus),
        "redundant": rng.integers(10, 100, n_cpus)})[fd.REDUNDANT_BY_CPU_MSR_COLUMNS]
    calls_pk = rng.integers(3000, 6000, n_cpus)
    hits = (calls_pk * (0.9 if lazy else 0.6)).astype(int)
    f.write_pkrs = pd.DataFrame({"cpu": cpus, "calls": calls_pk, "cache_hits": hits,
                                 "msr_writes": calls_pk - hits,
                                 "pkrs_msr_writes": calls_pk - hits + 7})[fd.WRITE_PKRS_COLUMNS]
    # Global-update episodes: serial walks over CPUs 1..n-1.
    n_ep = 0 if lazy else n_episodes
    ep_start = np.sort(rng.integers(start, start + duration_ns - 2_000_000, n_ep))
    stall = (rng.lognormal(np.log(7 * 50_000), 0.3, n_ep)).astype(np.int64)
    f.episodes = pd.DataFrame({
        "episode": np.arange(n_ep), "start_ns": ep_start, "end_ns": ep_start + stall,
        "source_cpu": 0, "pid": 321, "comm": HOSTILE_COMM, "func": "pks_update_remote",
        "callsite": "wrmsrl_on_cpu+0x4c/0x80", "mode": "serial", "targets": n_cpus - 1,
        "target_cpus": f"1-{n_cpus - 1}", "stall_ns": stall,
        "latency_sum_ns": (stall * 0.9).astype(np.int64), "calls": n_cpus - 1,
    })[fd.EPISODE_COLUMNS]
    proj = []
    for design, per_cpu, base in (("serial", 50_000, 0), ("broadcast", 400, 60_000),
                                  ("lazy", 0, 300)):
        for n in (n_cpus, 64, 256, 1024):
            p50 = base + per_cpu * (n - 1)
            proj.append({"cpus": n, "design": design, "p50_stall_ns": float(p50),
                         "p99_stall_ns": float(p50 * 1.6 + 1000),
                         "source": "calibration" if design != "lazy" else "model"})
    f.projection = pd.DataFrame(proj)[fd.PROJECTION_COLUMNS]
    # Isolation: the walk reaches 6-7; attaching the tracer sent do_sync_core there.
    if lazy:
        vt = np.array([start + 10_000, start + 11_000])
        vcpu = np.array(list(isolated)[:2] or [0, 0])
        tracer = np.array([True, True])
    else:
        m = np.isin(target, isolated)
        vt = np.concatenate([queue[m][:300], [start + 10_000, start + 11_000]])
        vcpu = np.concatenate([target[m][:300], list(isolated)[:2]])
        tracer = np.concatenate([np.zeros(min(300, m.sum()), bool), [True, True]])
    f.violations = pd.DataFrame({
        "time_ns": vt, "source_cpu": 0, "target_cpu": vcpu,
        "func": np.where(tracer, "do_sync_core", HOSTILE_SYMBOL),
        "callsite": np.where(tracer, "on_each_cpu_cond_mask+0x20/0x60",
                             "wrmsrl_on_cpu+0x4c/0x80"),
        "comm": np.where(tracer, "pkstrace", HOSTILE_COMM), "pid": 321,
        "tracer_induced": tracer, "via": "csd"})[fd.VIOLATION_COLUMNS]
    if lazy:
        f.drift = fd.empty(fd.DRIFT_COLUMNS)
        f.lost_updates = fd.empty(fd.LOST_UPDATE_COLUMNS)
    else:
        f.drift = pd.DataFrame({
            "cpu": [0, 0, 3], "pid": [321, 321, 400], "comm": [HOSTILE_COMM] * 2 + ["pks-test"],
            "callsite": ["wrmsrl_on_cpu+0x4c/0x80"] * 3,
            "start_ns": [start + 1000, start + 5_000_000, start + 9_000_000],
            "end_ns": [start + 400_000, start + 5_300_000, start + 9_200_000],
            "calls": [7, 7, 4], "depths": ["1,0,-1,-2,-3,-4,-5", "1,0,-1,-2,-3,-4,-5",
                                           "2,1,0,-1"],
            "step": [-1, -1, -1]})[fd.DRIFT_COLUMNS]
        f.lost_updates = pd.DataFrame({
            "time_ns": [start + 7_000_000], "cpu": [5], "type": ["stale_cache"],
            "cached_value": [0x55555554], "msr_value": [0x55555550],
            "expected_value": [0x55555550], "episode": [3],
            "detail": ["remote cache update raced with a local write_pkrs"]})[
                fd.LOST_UPDATE_COLUMNS]
    f.notes = [f"synthetic findings ({variant}) for report tests"]
    return f


def test_synthetic_tables_have_documented_columns() -> None:
    for variant in ("v3", "lazy"):
        f = synth_findings(variant)
        assert list(f.calls.columns) == fd.CALLS_COLUMNS
        assert list(f.episodes.columns) == fd.EPISODE_COLUMNS
        assert list(f.violations.columns) == fd.VIOLATION_COLUMNS
        assert list(f.drift.columns) == fd.DRIFT_COLUMNS
        assert list(f.activity.columns) == fd.ACTIVITY_COLUMNS
        f.to_json()  # the JSON form must accept every table
