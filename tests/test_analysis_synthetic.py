"""The analysis on small synthetic traces whose answers are known by construction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pkstrace import schema
from pkstrace.analysis import analyse
from pkstrace.analysis.projection import load_calibration
from pkstrace.errors import InputError

US = 1000
FUNC = "__wrmsr_on_cpu"
SITE = "generic_exec_single+0x36/0x150"


def build(rows: list[dict], **meta) -> schema.Trace:
    """A trace from event dicts (missing columns get their NA sentinel)."""
    keys = sorted({k for r in rows for k in r})
    cols: dict = {}
    for k in keys:
        c = schema.column(k)
        vals = [r.get(k, c.na) for r in rows]
        if c.dtype in ("category", "kind"):
            cols[k] = vals
        else:
            cols[k] = np.array(vals, dtype=c.dtype)
    return schema.Trace(schema.normalize(cols), schema.TraceMeta(**meta))


def call(rows: list[dict], t: int, src: int, tgt: int, csd: int, lat: int = 10 * US,
         handler: int = 2 * US, func: str = FUNC, site: str = SITE, depth: int = 1,
         pid: int = 100, comm: str = "walker", msr_write: tuple[int, int] | None = None,
         ipi: bool = False) -> int:
    """Append one remote call's events; returns when it completed (exit ts)."""
    rows.append(dict(ts=t, cpu=src, pid=pid, comm=comm, kind="csd_queue", target_cpu=tgt,
                     callsite=site, func=func, csd=csd, preempt_depth=depth))
    if ipi:
        rows.append(dict(ts=t + 1, cpu=src, pid=pid, comm=comm, kind="ipi_send",
                         target_cpu=tgt, callsite=site,
                         func="generic_smp_call_function_single_interrupt"))
    e = t + lat
    rows.append(dict(ts=e, cpu=tgt, pid=0, comm=f"swapper/{tgt}", kind="csd_entry",
                     func=func, csd=csd))
    if msr_write:
        rows.append(dict(ts=e + 1, cpu=tgt, pid=0, comm=f"swapper/{tgt}", kind="msr_write",
                         msr=msr_write[0], value=msr_write[1]))
    rows.append(dict(ts=e + handler, cpu=tgt, pid=0, comm=f"swapper/{tgt}",
                     kind="csd_exit", func=func, csd=csd))
    return e + handler


# --- cross-CPU matching -----------------------------------------------------

def test_csd_token_reuse_serial_walk_matches_each_call():
    rows: list[dict] = []
    t = 1_000 * US
    lats = [5, 7, 9, 11, 13, 15]
    for i, lat in enumerate(lats):  # two walks over CPUs 1-3, one on-stack csd for all
        t = call(rows, t, 0, 1 + i % 3, csd=0xABC, lat=lat * US) + 3 * US
    f = analyse(build(rows))
    c = f.calls
    assert len(c) == 6 and not c["local"].any()
    assert sorted(c["latency_ns"].astype(int)) == [x * US for x in lats]
    assert (c["handler_ns"] == 2 * US).all()
    assert f.cross_cpu_summary["unmatched_queue"] == 0
    assert f.cross_cpu_summary["unmatched_entry"] == 0
    assert f.cross_cpu_summary["p50_ns"] == 10 * US  # median of 5..15 us


def test_local_calls_with_csd_zero_are_local_not_paired():
    rows: list[dict] = []
    t = call(rows, 1000, 0, 1, csd=0x10)
    for k in range(3):  # the caller's own CPU runs the func itself: csd=(nil)
        rows.append(dict(ts=t + k * 100 + 10, cpu=0, pid=100, comm="walker", kind="csd_entry",
                         func=FUNC, csd=0))
        rows.append(dict(ts=t + k * 100 + 15, cpu=0, pid=100, comm="walker", kind="csd_exit",
                         func=FUNC, csd=0))
    f = analyse(build(rows))
    s = f.cross_cpu_summary
    assert (s["remote"], s["local"]) == (1, 3)
    local = f.calls[f.calls["local"]]
    assert local["latency_ns"].isna().all() and (local["handler_ns"] == 5).all()
    assert (local["source_cpu"] == local["target_cpu"]).all()


def test_lost_events_and_window_edges_are_unmatched_never_mispaired():
    rows: list[dict] = []
    # an entry+exit whose queue was before the window
    rows += [dict(ts=100, cpu=1, pid=0, kind="csd_entry", func=FUNC, csd=0x1),
             dict(ts=150, cpu=1, pid=0, kind="csd_exit", func=FUNC, csd=0x1)]
    t = call(rows, 1000, 0, 1, csd=0x1, lat=10 * US)  # a good call
    # call 2 lost its entry (CPU 1 lost events), call 3 lost its queue (CPU 0 lost):
    # the queue of 2 must not pair with the entry of 3 across the gap
    q2 = t + 100 * US
    rows.append(dict(ts=q2, cpu=0, pid=100, kind="csd_queue", target_cpu=1, func=FUNC,
                     callsite=SITE, csd=0x1))
    rows.append(dict(ts=q2 + 10 * US, cpu=1, pid=0, kind="csd_exit", func=FUNC, csd=0x1))
    rows.append(dict(ts=q2 + 500 * US, cpu=1, pid=0, kind="csd_entry", func=FUNC, csd=0x1))
    rows.append(dict(ts=q2 + 502 * US, cpu=1, pid=0, kind="csd_exit", func=FUNC, csd=0x1))
    # a queue at the end of the window
    rows.append(dict(ts=q2 + 900 * US, cpu=0, pid=100, kind="csd_queue", target_cpu=1,
                     func=FUNC, callsite=SITE, csd=0x1))
    f = analyse(build(rows, lost_events={0: 1, 1: 1}))
    s = f.cross_cpu_summary
    assert s["remote"] == 1
    assert f.calls.loc[~f.calls["local"], "latency_ns"].tolist() == [10 * US]
    assert s["unmatched_queue"] == 2
    assert s["unmatched_entry"] == 2
    assert s["unmatched_exit"] == 1
    assert s["cpus_with_lost_events"] == [0, 1]
    assert any("lost events" in n for n in f.notes)


def test_out_of_order_events_across_cpus_give_the_same_answer():
    rows: list[dict] = []
    t = 0
    for i in range(20):
        t = call(rows, t + 7 * US, 0, 1 + i % 3, csd=0x77 + i % 2, lat=(3 + i) * US) + US
    ordered = analyse(build(rows))
    # text traces interleave per-CPU buffers: CPU 0's events first, then the others
    by_cpu = sorted(rows, key=lambda r: (r["cpu"] != 0, r["cpu"]))
    shuffled = analyse(build(by_cpu))
    assert any("sorted by timestamp" in n for n in shuffled.notes)
    a = ordered.calls.sort_values("queue_ns")["latency_ns"].tolist()
    b = shuffled.calls.sort_values("queue_ns")["latency_ns"].tolist()
    assert a == b and len(a) == 20
    assert shuffled.cross_cpu_summary["unmatched_queue"] == 0


def test_equal_microsecond_timestamps_queue_sorts_before_entry():
    rows = [dict(ts=5000, cpu=1, pid=0, kind="csd_entry", func=FUNC, csd=0x5),
            dict(ts=5000, cpu=0, pid=9, kind="csd_queue", target_cpu=1, func=FUNC, csd=0x5),
            dict(ts=6000, cpu=1, pid=0, kind="csd_exit", func=FUNC, csd=0x5)]
    f = analyse(build(rows))
    assert f.cross_cpu_summary["remote"] == 1
    assert f.calls["latency_ns"].tolist() == [0.0]


def test_target_idle_from_sched_switch():
    rows = [dict(ts=10, cpu=1, pid=5, kind="sched_switch", next_pid=0),
            dict(ts=20, cpu=2, pid=0, kind="sched_switch", next_pid=77)]
    call(rows, 1000, 0, 1, csd=1)
    call(rows, 1000 + 50 * US, 0, 2, csd=2)
    f = analyse(build(rows))
    idle = dict(zip(f.calls["target_cpu"], f.calls["target_idle"], strict=True))
    assert idle == {1: True, 2: False}


# --- episodes, drift, isolation ---------------------------------------------

def v3_walk(cpus: int = 8, start_depth: int = 1) -> list[dict]:
    """update_global_pkrs() on CPU 0 walking CPUs 1..cpus-1 with wrmsrl_on_cpu(); each
    per_cpu_ptr()+put_cpu_ptr() pair leaks -1 of preempt count (depth is 4 bits)."""
    rows: list[dict] = []
    t = 10_000
    for i, tgt in enumerate(range(1, cpus)):
        depth = (start_depth - i) % 16
        t = call(rows, t, 0, tgt, csd=0xBEEF, lat=20 * US, depth=depth, ipi=True,
                 msr_write=(schema.MSR_PKRS, 0x4), pid=42, comm="pks_test",
                 site="smp_call_function_single+0x7a/0x120") + 2 * US
    return rows


def test_v3_serial_walk_episode_drift_and_isolation():
    f = analyse(build(v3_walk(), host={"isolated_cpus": [6, 7], "online_cpus": list(range(8))}))
    e = f.episodes
    assert len(e) == 1
    ep = e.iloc[0]
    assert (ep["mode"], ep["targets"], ep["target_cpus"]) == ("serial", 7, "1-7")
    assert ep["latency_sum_ns"] == 7 * 20 * US
    assert ep["stall_ns"] == 7 * 22 * US + 6 * 2 * US
    assert (f.calls["episode"] == 0).all()
    d = f.drift
    assert len(d) == 1
    assert d.iloc[0]["step"] == -1 and d.iloc[0]["calls"] == 7
    assert d.iloc[0]["depths"] == [1, 0, 15, 14, 13, 12, 11]
    # one violation per call: its queue, IPI, entry and MSR write are one interruption
    v = f.violations
    assert sorted(v["target_cpu"]) == [6, 7]
    assert set(v["via"]) == {"csd"} and not v["tracer_induced"].any()
    # each CPU is written once: nothing redundant
    assert f.present() == {"redundant": 0, "isolation": 2, "drift": 1, "lost": 0}


def test_isolated_override_and_unexplained_ipis():
    rows = v3_walk(4)
    rows.append(dict(ts=10, cpu=0, pid=1, comm="init", kind="ipi_send", target_cpu=2,
                     func="0x0", callsite="ttwu_queue_wakelist+0x11d"))
    rows.append(dict(ts=20, cpu=1, pid=1, comm="perf", kind="ipi_send", cpumask="2-3",
                     func="do_sync_core", callsite="text_poke_bp_batch+0x80"))
    f = analyse(build(rows, host={"isolated_cpus": [6]}), isolated=[2, 3])
    assert f.isolated_cpus == [2, 3]
    v = f.violations
    assert v["via"].tolist().count("csd") == 2  # the walk's calls to 2 and 3
    assert v["via"].tolist().count("ipi") == 3  # the reschedule IPI + mask to 2 and 3
    assert v[v["via"] == "ipi"]["tracer_induced"].tolist() == [False, True, True]


def test_depth_differences_without_repeating_step_are_not_drift():
    rows: list[dict] = []
    t = 0
    for i, depth in enumerate([1, 2, 1, 2, 1, 3, 1, 1, 1]):
        t = call(rows, t + US, 0, 1 + i % 4, csd=1, depth=depth) + US
    f = analyse(build(rows))
    assert len(f.drift) == 0
    rows = []
    for i in range(6):  # the same leak in calls far apart is not one walk
        call(rows, i * 50_000 * US, 0, 1 + i, csd=1, depth=5 - i)
    assert len(analyse(build(rows)).drift) == 0


def test_broadcast_episode():
    rows: list[dict] = []
    for k, tgt in enumerate((1, 2, 3)):  # queue to all, then they run
        rows.append(dict(ts=1000 + k * 100, cpu=0, pid=9, kind="csd_queue", target_cpu=tgt,
                         func="do_flush", callsite="smp_call_function_many_cond+0x1",
                         csd=0x100 + tgt))
    for k, tgt in enumerate((1, 2, 3)):
        rows.append(dict(ts=5000 + k * 10, cpu=tgt, pid=0, kind="csd_entry",
                         func="do_flush", csd=0x100 + tgt))
        rows.append(dict(ts=6000 + k * 10, cpu=tgt, pid=0, kind="csd_exit",
                         func="do_flush", csd=0x100 + tgt))
    f = analyse(build(rows))
    assert f.episodes["mode"].tolist() == ["broadcast"]
    assert f.episodes["stall_ns"].tolist() == [6020 - 1000]


# --- redundant writes and lost updates ---------------------------------------

def test_redundant_writes_but_never_command_msrs():
    rows = []
    for i, (kind, msr, val) in enumerate([
        ("msr_write", 0x48, 1), ("msr_write", 0x48, 1),  # redundant
        ("msr_write", 0x48, 2),
        ("msr_read", 0x6E0, 7), ("msr_write", 0x6E0, 7),  # same as last read: redundant
        ("msr_write", 0x830, 0xFB), ("msr_write", 0x830, 0xFB),  # ICR: a command
        ("msr_write", 0x80B, 0), ("msr_write", 0x80B, 0),  # EOI: a command
    ]):
        rows.append(dict(ts=i * 10, cpu=0, pid=3, comm="task", kind=kind, msr=msr, value=val))
    rows.append(dict(ts=200, cpu=1, pid=3, comm="task", kind="msr_write", msr=0x48, value=2))
    f = analyse(build(rows))
    assert f.redundant_total == 2
    by = {(r.cpu, r.msr): r.redundant for r in f.redundant_by_cpu_msr.itertuples()}
    assert by == {(0, 0x48): 1, (0, 0x6E0): 1, (0, 0x830): 0, (0, 0x80B): 0, (1, 0x48): 0}
    assert set(f.redundant_by_task["msr_name"]) >= {"IA32_SPEC_CTRL", "X2APIC_ICR"}


def wp(t: int, cpu: int, value: int, pid: int = 50, write: bool = True) -> list[dict]:
    """A write_pkrs call, followed by its MSR write unless the cache says it is not needed."""
    r = [dict(ts=t, cpu=cpu, pid=pid, comm="t", kind="write_pkrs", value=value)]
    if write:
        r.append(dict(ts=t + 100, cpu=cpu, pid=pid, comm="t", kind="msr_write",
                      msr=schema.MSR_PKRS, value=value))
    return r


def test_write_pkrs_cache_hits_and_a_correct_kernel_has_no_lost_updates():
    rows = wp(1000, 1, 0x4) + wp(2000, 1, 0x4, write=False) + wp(3000, 1, 0x8)
    rows += [dict(ts=3500, cpu=1, pid=50, kind="sched_switch", next_pid=51)]
    rows += wp(4000, 1, 0x8, pid=51, write=False)
    f = analyse(build(rows))
    w = f.write_pkrs.set_index("cpu").loc[1]
    assert (w["calls"], w["cache_hits"], w["msr_writes"]) == (4, 2, 2)
    assert len(f.lost_updates) == 0


def test_stale_cache_lost_update():
    rows = wp(1000, 1, 0x0)
    # a global update reaches CPU 1 and sets the MSR to 0x4 ...
    call(rows, 2000, 0, 1, csd=0x9, msr_write=(schema.MSR_PKRS, 0x4))
    call(rows, 40_000, 0, 2, csd=0x9, msr_write=(schema.MSR_PKRS, 0x4))
    # ... but CPU 1's cache still says 0x0: write_pkrs(0x0) skips the write
    rows += wp(90_000, 1, 0x0, write=False)
    f = analyse(build(rows))
    lu = f.lost_updates
    assert len(lu) == 1
    r = lu.iloc[0]
    assert (r["type"], r["cpu"], r["cached_value"], r["msr_value"]) == ("stale_cache", 1, 0, 4)
    assert r["episode"] == 0 and r["time_ns"] == 90_000


def test_remote_overwrite_lost_update():
    rows = [dict(ts=1000, cpu=1, pid=50, comm="t", kind="write_pkrs", value=0x0)]
    # the remote update lands between write_pkrs reading the cache and writing the MSR
    call(rows, 1100, 0, 1, csd=0x9, lat=200, handler=300, msr_write=(schema.MSR_PKRS, 0x4))
    call(rows, 2000, 0, 2, csd=0x9, lat=200, handler=300, msr_write=(schema.MSR_PKRS, 0x4))
    rows.append(dict(ts=1700, cpu=1, pid=50, comm="t", kind="msr_write",
                     msr=schema.MSR_PKRS, value=0x0))
    f = analyse(build(rows))
    lu = f.lost_updates
    assert lu["type"].tolist() == ["remote_overwrite"]
    r = lu.iloc[0]
    assert (r["cpu"], r["msr_value"], r["expected_value"], r["episode"]) == (1, 0, 4, 0)
    # the same writes in the safe order (write_pkrs after the update) are no race
    rows2 = [r for r in rows if r["kind"] != "write_pkrs"]
    rows2.append(dict(ts=1650, cpu=1, pid=50, comm="t", kind="write_pkrs", value=0x0))
    assert len(analyse(build(rows2)).lost_updates) == 0


# --- counts, projection -------------------------------------------------------

def test_counts_and_activity():
    rows = v3_walk(4)
    f = analyse(build(rows))
    c = f.counts
    assert c["count"].sum() == len(rows)
    assert c[c["kind"] == "msr_write"]["msr"].tolist() == [schema.MSR_PKRS] * 3
    assert c[c["kind"] != "msr_write"]["msr"].isna().all()
    a = f.activity
    assert a["bin_start_ns"].nunique() <= 200 and f.activity_bin_ns > 0
    per = a.groupby("series")["count"].sum().to_dict()
    assert per == {"csd_in": 3, "csd_out": 3, "ipi_in": 3, "msr_write": 3}
    doc = json.loads(json.dumps(f.to_json()))
    assert doc["counts"][0].keys() == {"cpu", "kind", "msr", "count"}


def test_review_calibration_lands_in_the_review_band():
    f = analyse(build(v3_walk(3)), calibration=load_calibration("review"))
    pr = f.projection
    r = pr[(pr["source"] == "review") & (pr["design"] == "serial") & (pr["cpus"] == 256)]
    assert len(r) == 1
    assert 1_000_000 <= int(r["p50_stall_ns"].iloc[0]) <= 25_000_000
    assert 1_000_000 <= int(r["p99_stall_ns"].iloc[0]) <= 25_000_000
    lazy = pr[pr["design"] == "lazy"]
    assert (lazy["p50_stall_ns"] == 0).all()
    # deterministic (seeded)
    g = analyse(build(v3_walk(3)), calibration=load_calibration("review"))
    pd.testing.assert_frame_equal(pr, g.projection)


def test_projection_from_trace_scales_with_cpus():
    rows: list[dict] = []
    t = 0
    for i in range(30):
        t = call(rows, t + US, 0, 1 + i % 3, csd=1, lat=10 * US, handler=0) + US
    pr = analyse(build(rows)).projection
    s = pr[(pr["source"] == "trace") & (pr["design"] == "serial")].set_index("cpus")
    assert s.loc[64, "p50_stall_ns"] == 63 * 10 * US  # every round trip is 10 us
    assert s.loc[1024, "p50_stall_ns"] == 1023 * 10 * US


def test_calibration_file(tmp_path):
    good = {"kind": "pkstrace-calibration", "version": 1, "host": {"cpus": 2},
            "remote_ns": {"idle": [50_000, 60_000], "busy": [30_000, 35_000]},
            "local_ns": [6000], "serial": [{"cpus": 2, "stall_ns": [40_000]}],
            "broadcast": [{"cpus": 2, "stall_ns": [40_000]}]}
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(good))
    cal = load_calibration(str(p))
    pr = analyse(build(v3_walk(3)), calibration=cal).projection
    s = pr[(pr["source"] == "calibration") & (pr["design"] == "serial")]
    assert len(s) == 3 and (s["p50_stall_ns"] > 0).all()


@pytest.mark.parametrize("text,msg", [
    ("not json", "not JSON"),
    ('{"kind": "other"}', "not a pkstrace calibration"),
    ('{"kind": "pkstrace-calibration", "version": 9}', "unsupported calibration version"),
    ('{"kind": "pkstrace-calibration", "version": 1, "remote_ns": {"idle": ["x"]}}',
     "non-negative numbers"),
    ('{"kind": "pkstrace-calibration", "version": 1, "remote_ns": {}}', "no remote_ns"),
])
def test_bad_calibration_is_one_line_input_error(tmp_path, text, msg):
    p = tmp_path / "cal.json"
    p.write_text(text)
    with pytest.raises(InputError, match=msg) as e:
        load_calibration(str(p))
    assert "\n" not in str(e.value)


def test_empty_trace_analyses_to_empty_findings():
    f = analyse(schema.Trace(schema.empty_events(), schema.TraceMeta()))
    assert f.present() == {"redundant": 0, "isolation": 0, "drift": 0, "lost": 0}
    assert len(f.counts) == 0 and len(f.calls) == 0


def test_hashed_grouping_is_exact():
    """The 64-bit mix groups exactly like the factorised key, input order kept."""
    from pkstrace.analysis.prep import dense_key, group_order, hashed_group_order

    rng = np.random.default_rng(1)
    cpu = rng.integers(0, 64, 50_000)
    csd = rng.integers(0, 2**63, 50_000, dtype=np.uint64) % np.uint64(997)
    func = rng.integers(0, 5, 50_000)
    key = dense_key(cpu, csd, func)

    def groups(order):
        return {int(key[g[0]]): g.tolist()
                for g in np.split(order, np.flatnonzero(np.diff(key[order])) + 1)}

    ga = groups(hashed_group_order(cpu, csd, func))
    assert ga == groups(group_order(key))
    assert len(ga) == len(np.unique(key))


def test_global_update_events_delimit_episodes_and_drift():
    """With update_global_pkrs kprobe events, a walk stalled for milliseconds between
    two calls (an emulated host) is still one update; interleaved calls of another
    func from the same callsite do not break its drift; a kworker waking two CPUs
    outside any update is not an episode."""
    rows: list[dict] = []
    for u, t0 in enumerate((0, 100_000 * US)):
        rows.append(dict(ts=t0, cpu=0, pid=42, comm="pks_updater", kind="global_update",
                         value=4, pkey=1, prot=1))
        t = t0 + 10 * US
        for i, tgt in enumerate(range(1, 5)):
            t = call(rows, t, 0, tgt, csd=0xBEEF, depth=7 - i, pid=42, comm="pks_updater")
            t += 5_000 * US if i == 1 else 2 * US  # a 5 ms stall mid-walk
            call(rows, t, 0, 1, csd=0xF00D + u, func="nohz_csd_func", depth=3, pid=42,
                 comm="pks_updater")
            t += 30 * US
    for k, tgt in enumerate((2, 3)):  # a kworker waking tasks on two CPUs
        call(rows, 300_000 * US + k * 50 * US, 1, tgt, csd=0x77 + k, pid=9, comm="kworker",
             func="sched_ttwu_pending", site="ttwu_queue_wakelist+0xdd")
    f = analyse(build(rows), episode_gap_ns=1_000_000)
    e = f.episodes
    assert e["targets"].tolist() == [4, 4] and set(e["func"]) == {FUNC}
    assert e["stall_ns"].min() > 5_000 * US
    assert [d for d in f.drift["depths"]] == [[7, 6, 5, 4], [7, 6, 5, 4]]


def test_self_ipi_on_isolated_cpu_is_not_a_violation():
    rows = [dict(ts=10, cpu=3, pid=0, kind="ipi_send", target_cpu=3, func="irq_work"),
            dict(ts=20, cpu=0, pid=5, kind="ipi_send", target_cpu=3, func="0x0")]
    v = analyse(build(rows), isolated=[3]).violations
    assert v["source_cpu"].tolist() == [0]


def test_remote_write_inside_write_pkrs_window_is_not_its_write():
    # write_pkrs(0x4) on CPU 1 hits the cache; a remote update's handler then writes
    # the MSR on CPU 1 in the same task's context: still a cache hit
    rows = wp(1000, 1, 0x4) + wp(2000, 1, 0x4, write=False)
    rows += [dict(ts=2050, cpu=1, pid=50, kind="csd_entry", func=FUNC, csd=0x9),
             dict(ts=2060, cpu=1, pid=50, kind="msr_write", msr=schema.MSR_PKRS, value=0x4),
             dict(ts=2070, cpu=1, pid=50, kind="csd_exit", func=FUNC, csd=0x9)]
    w = analyse(build(rows)).write_pkrs.set_index("cpu").loc[1]
    assert (w["calls"], w["cache_hits"], w["pkrs_msr_writes"]) == (2, 1, 2)


KIND_CHOICES = list(schema.KINDS)


@pytest.mark.parametrize("seed", range(40))
def test_random_traces_never_crash_and_stay_consistent(seed):
    """Any mix of events (also nonsense: exits without entries, queues to self,
    cpumask sends, huge values) analyses without error and with consistent counts."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    cpus = int(rng.integers(1, 6))
    cols = {
        "ts": np.sort(rng.integers(0, 10_000_000, n)),
        "cpu": rng.integers(0, cpus, n),
        "pid": rng.integers(0, 4, n),
        "comm": rng.choice(["a", "b", "<idle>"], n),
        "kind": rng.choice(KIND_CHOICES, n),
        "preempt_depth": rng.integers(-1, 16, n),
        "msr": rng.choice([0x6E1, 0x830, 0x48, -1], n),
        "value": rng.integers(0, 4, n).astype(np.uint64),
        "target_cpu": rng.integers(-1, cpus, n),
        "cpumask": rng.choice(["", "0-1", "2", "bogus"], n),
        "callsite": rng.choice(["", "x+0x1", "y+0x2"], n),
        "func": rng.choice(["", "f", "g"], n),
        "csd": rng.integers(0, 3, n).astype(np.uint64),
        "next_pid": rng.integers(-1, 4, n),
    }
    if seed % 2:  # out of order across CPUs
        order = np.lexsort((cols["ts"], cols["cpu"]))
        cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    f = analyse(schema.Trace(schema.normalize(cols), schema.TraceMeta()),
                isolated=[0], calibration=load_calibration("review"))
    assert f.counts["count"].sum() == n
    remote = f.calls[~f.calls["local"]]
    assert (remote["latency_ns"] >= 0).all()
    assert (f.calls["handler_ns"].dropna() >= 0).all()
    s = f.cross_cpu_summary
    assert s["remote"] + s["unmatched_queue"] == (cols["kind"] == "csd_queue").sum()
    json.dumps(f.to_json())


@pytest.mark.parametrize("inclusive", [False, True])
def test_asof_prev_matches_brute_force(inclusive):
    from pkstrace.analysis.prep import asof_prev

    rng = np.random.default_rng(7)
    n = 400
    lr = np.sort(rng.choice(n, 120, replace=False))
    rr = np.sort(rng.choice(n, 150, replace=False))
    lg, rg = rng.integers(0, 4, len(lr)), rng.integers(0, 4, len(rr))
    got = asof_prev(lg, lr, rg, rr, n, inclusive=inclusive)
    for i, (g, r) in enumerate(zip(lg, lr, strict=True)):
        cands = [j for j in range(len(rr)) if rg[j] == g and (rr[j] <= r if inclusive
                                                               else rr[j] < r)]
        want = max(cands, key=lambda j: rr[j]) if cands else -1
        assert got[i] == want
